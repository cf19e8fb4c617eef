"""Why training stops: the two errors every training module may raise."""

from __future__ import annotations

from deblur.core.errors import DeblurError


class TrainingError(DeblurError, RuntimeError):
    """Training cannot go on (non-finite loss, bad init checkpoint, no data)."""


class TrainingInterrupted(TrainingError):
    """A signal stopped training; ``last.pt`` holds the step it reached."""
