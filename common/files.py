"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

The one way FedHydra replaces a file: write a temporary file in the same folder (same file system, so the
rename is atomic), then os.replace it into place; on any failure the temporary file is removed and the old
file stays. `atomic_path` serves writers that want a path of their own (safetensors, matplotlib);
`write_atomic` writes text or bytes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", mode: int | None = None,
                durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block ends without an error.

    `suffix`: the temporary file's ending (matplotlib picks the image format from it). `mode`: the file's
    permissions (the temporary file starts as 0600, as tempfile.mkstemp makes it). `durable`: fsync the file
    and its folder after the rename, so the new file survives a crash of the machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        for target in (path, path.parent):
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_atomic(path: str | os.PathLike, data: str | bytes, mode: int | None = None, durable: bool = False) -> None:
    """Write `data` (text as UTF-8 with "\\n" line ends, or bytes) to `path` atomically; `mode` and `durable`
    as in atomic_path."""
    with atomic_path(path, mode=mode, durable=durable) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(data)
