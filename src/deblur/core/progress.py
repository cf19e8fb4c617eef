"""Progress bars that stay readable in log files.

On a terminal this is plain ``tqdm``. When stderr is redirected (``dvc repro > log``, CI,
``nohup``), tqdm would redraw the bar with carriage returns into one endless line; instead
each refresh becomes its own line, at most every ``LOG_INTERVAL_S`` seconds.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class _LineWriter:
    """File-like wrapper that writes each tqdm refresh as one line, without carriage returns."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, one line per refresh when stderr is not a terminal."""
    stream = kwargs.pop("file", None) or sys.stderr
    if not stream.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("ncols", 100)
        stream = _LineWriter(stream)
    return tqdm(iterable, file=stream, **kwargs)
