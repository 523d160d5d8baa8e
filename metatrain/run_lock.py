"""One owner per run directory: RUN_DIR/run.lock, held with flock(2) for the run's life.

A second process started on a directory that is being trained is refused before it
reads or writes anything there. The kernel drops a flock when the process holding it
ends, however it ends (kill -9 and power loss included), so a lock is never stale: the
file a crashed run leaves behind is simply taken by the next start. The pid, host and
start time written into the file serve only the message that names the holder.

Within one process the lock is re-entrant (the CLI takes it before Hydra writes the
run's .hydra/ files, then train() takes it again), and only rank 0 of a distributed
run takes it: the other ranks run under rank 0's lock (`rank`).
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from metatrain.errors import MetatrainError

NAME = "run.lock"

# Locks this process holds: {resolved run directory: [open file, holds]}.
_held: dict[Path, list] = {}


class RunLocked(MetatrainError):
    """Another process holds the run directory."""


def _key(run_dir: Path) -> Path:
    return Path(run_dir).resolve()


def _holder(handle) -> str:
    """'pid 123 on host since 2024-...' from the lock file, as far as it was written."""
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"  # it has the lock but has not written its name yet
    return f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}"


def take(run_dir: Path, rank: int = 0) -> None:
    """Hold `run_dir` for this process until `release` (or the process ends).
    Raises RunLocked, naming the holder, when another process holds it."""
    if rank != 0:
        return
    key = _key(run_dir)
    if key in _held:
        _held[key][1] += 1
        return
    key.mkdir(parents=True, exist_ok=True)
    path = key / NAME
    while True:
        # r+ then a+: open without truncating, so a refused process changes no byte.
        try:
            handle = open(path, "r+", encoding="utf-8")  # noqa: SIM115 - kept while held
        except FileNotFoundError:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - kept while held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise RunLocked(
                f"{key} is being trained by {holder} ({path}); wait for it to end or stop "
                "that process, or choose another directory with hydra.run.dir=..."
            ) from None
        try:  # the file may have been removed (a run that kept nothing) while we waited
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
    handle.write("\n")
    handle.flush()
    _held[key] = [handle, 1]


def release(run_dir: Path, rank: int = 0) -> None:
    """Give back one hold of `run_dir`; the last one unlocks it."""
    if rank != 0:
        return
    key = _key(run_dir)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        fcntl.flock(entry[0], fcntl.LOCK_UN)
        entry[0].close()  # the file stays: removing it would race with the next start


def held(run_dir: Path) -> bool:
    """Whether this process holds `run_dir`."""
    return _key(run_dir) in _held


@contextlib.contextmanager
def hold(run_dir: Path, rank: int = 0):
    """`take` for the block, `release` after it, however it ends."""
    take(run_dir, rank)
    try:
        yield
    finally:
        release(run_dir, rank)
