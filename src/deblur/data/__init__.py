"""Data: ingest sources, blur synthesis, reading pairs, training datasets."""
