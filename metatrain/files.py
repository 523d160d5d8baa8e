"""Crash-safe file writes shared by checkpoints, data caches and results."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from metatrain.errors import NO_SPACE, DiskFull


def out_of_space(e: BaseException, directory: Path | None = None) -> bool:
    """Whether `e` (or what it wraps) is a full disk. torch.save reports a failed
    write as a RuntimeError ("unexpected pos", "file write failed"), so for those
    the free space of `directory` decides."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    if isinstance(e, RuntimeError) and directory and ("write" in text or "unexpected pos" in text):
        try:
            st = os.statvfs(directory)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < 1 << 20  # under 1 MiB left
    return False


def _replace_atomically(path: Path, write) -> None:
    """Write through a temp file in the same directory, then rename over `path`:
    a reader (or a resumed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; honour the user's umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = out_of_space(e, path.parent)  # asked before the temp file frees its space
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFull(path) from None
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def save_torch(obj, path: Path) -> None:
    _replace_atomically(path, lambda f: torch.save(obj, f))


def save_text(text: str, path: Path) -> None:
    _replace_atomically(path, lambda f: f.write(text.encode()))


def save_json(obj, path: Path) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


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


def remove_if_nothing_kept(run_dir: Path, created: Path | None = None) -> bool:
    """Delete a run directory that holds nothing but Hydra's files (.hydra/, logs)
    and its lock file,
    as after a run that failed before its first iteration; then the folders up to
    `created` (the first one this run made) if that left them empty."""
    run_dir = Path(run_dir)
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return False
    if any(e.name not in (".hydra", "run.lock") and e.suffix != ".log" for e in entries):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    if created is not None and run_dir.is_relative_to(created):
        parent = run_dir.parent
        while parent.is_relative_to(created):
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break
            parent = parent.parent
    return True
