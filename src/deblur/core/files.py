"""Files: the sha256 of a file, and writing a file or a folder whole or not at all.

Every write here goes to a temporary sibling first and is renamed over the target, so a reader
(or a run that crashes half-way) never sees a half-written file or folder. Temporary names
start with ``.`` and end in ``.tmp`` (files) or hold ``.tmp-`` (folders): a leftover is never
taken for an image, a checkpoint or a serving artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CHUNK = 1 << 20   # bytes read at a time while hashing


def update_from_file(digest, path: str | Path, chunk: int = CHUNK) -> None:
    """Feed the bytes of ``path`` into ``digest`` (a hashlib object), ``chunk`` bytes at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """The sha256 of the bytes of ``path``, as 64 hex digits (callers that keep fewer cut it themselves)."""
    digest = hashlib.sha256()
    update_from_file(digest, path, chunk)
    return digest.hexdigest()


def write_atomically(path: str | Path, writer: Callable[[Path], object]) -> None:
    """Call ``writer(tmp)`` to write a temporary sibling of ``path``, then rename it to ``path``
    (mode 0644; parent folders are made). On any error the temporary file is removed and
    ``path`` is left as it was. ``deblur.models.checkpoint_file.save_atomic`` uses it for ``torch.save``
    (through a file object: given the temporary name, torch would write that random name into the archive)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``write_atomically``)."""
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``write_atomically``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """Yield a new empty sibling folder of ``out_dir`` (mode 0755) to write into; on success it
    replaces ``out_dir`` whole (``replace_dir``), on error it is removed and ``out_dir`` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging.chmod(0o755)
        yield staging
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Swap folder ``new`` in as ``target`` (renames only); the old ``target``, if any, is removed after the swap."""
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
