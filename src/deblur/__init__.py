"""deblur: single-image deblurring with a DVC pipeline, MLflow tracking and an HTTP service."""

__version__ = "0.1.0"
