"""Crash-safe file writes shared by checkpoints, data caches and results."""

import json
import os
import tempfile
from pathlib import Path

import torch


def _replace_atomically(path: Path, write) -> None:
    """Write through a temp file in the same directory, then rename over `path`:
    a reader (or a resumed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj, path: Path) -> None:
    _replace_atomically(path, lambda f: torch.save(obj, f))


def save_json(obj, path: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    _replace_atomically(path, lambda f: f.write(text.encode()))


def is_writable_dir(path: Path) -> bool:
    """True if files can be created in `path` (created if missing). A folder with
    no write bit counts as read-only even for root, who could write there anyway:
    shared data mounts are marked that way on purpose."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        if not Path(path).stat().st_mode & 0o222:
            return False
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False
