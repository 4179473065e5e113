"""Atomic file writes: a reader sees the old file or the new one, never half of one; and
``check_out_dir``, the probe that output-writing commands run before any work.

The payload goes to a uniquely named temporary file in the destination folder (same file
system, so the final ``os.replace`` is atomic), created with mode 0666 so the usual umask
applies, as for any new file; on failure the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


def check_out_dir(out: Path) -> None:
    """Fail now, not after minutes of work, when ``out`` cannot be written: create and remove a
    probe file in the nearest existing folder (nothing is left behind; no folder is created)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; pass another --out")
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    else:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".lowbit-probe-"):
                pass
        except OSError as err:
            problem = f"{existing} is not writable ({err.strerror or err})"
    if problem:
        raise ValueError(f"cannot write to output folder {out}: {problem}; pass another --out")


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
