"""Running a network over images of any size: the tiled torch runner, the tile cost model."""
