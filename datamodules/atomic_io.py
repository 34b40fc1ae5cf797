"""Atomic file writes: a same-directory temp file, fsync, then ``os.replace``.

Readers (a dashboard, a resumed run) see either the old or the new file, never a truncated one,
even if the process is killed or serialisation raises half-way.
"""
import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path, write: Callable[[IO], None], binary: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        stream = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
        with stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Persist the rename itself; not every filesystem allows fsync on a directory.
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda stream: stream.write(text))


def file_sha256(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoints and audio can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
