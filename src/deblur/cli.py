"""Shared command-line behaviour of the pipeline scripts."""

from __future__ import annotations

import sys
from typing import Callable

from deblur.checkpoints import CheckpointError
from deblur.config import ConfigError
from deblur.imageio import ImageError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ImageError, CheckpointError, FileNotFoundError)


def fail_cleanly(fn: Callable, *args) -> int:
    """Run ``fn``; a user error becomes one clear line on stderr and exit code 1."""
    from deblur.data.ingest import IngestError
    from deblur.data.pairs import PairsError
    from deblur.training import TrainingError

    try:
        fn(*args)
    except (*USER_ERRORS, IngestError, PairsError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
