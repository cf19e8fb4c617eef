"""Shared command-line behaviour of the pipeline scripts (the ``deblur`` command is ``deblur.cli.main``)."""

from __future__ import annotations

import sys
from typing import Callable

from deblur.core.errors import DeblurError
from deblur.core.reproducible import pin_vector_unit

pin_vector_unit()   # before any stage imports torch: same bytes on AVX2 and AVX-512 machines


def fail_cleanly(fn: Callable, *args) -> int:
    """Run ``fn``; a user error becomes one clear line on stderr and exit code 1."""
    try:
        fn(*args)
    except (DeblurError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
