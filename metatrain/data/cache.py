"""Where preprocessed uint8 image caches live, and when they are rebuilt.

A cache sits beside the data it was built from. Data folders are often
read-only (a shared mount), so then the cache goes under METATRAIN_CACHE or
~/.cache/metatrain instead, in a folder named after the data path.

Inside `mapped_above(n)` a cache file larger than n bytes is opened with
torch.load(mmap=True): its tensors stay backed by the file and are read page by page as
they are indexed (data/store.py decides n from dataset.in_memory).
"""

import contextlib
import contextvars
import hashlib
import os
from pathlib import Path

import torch

from metatrain.files import is_writable_dir, save_torch

CACHE_VERSION = 1
_MAP_ABOVE: contextvars.ContextVar[int | None] = contextvars.ContextVar("map_above", default=None)


@contextlib.contextmanager
def mapped_above(n_bytes: int):
    token = _MAP_ABOVE.set(n_bytes)
    try:
        yield
    finally:
        _MAP_ABOVE.reset(token)


def cache_path(data_dir: Path, name: str) -> Path:
    data_dir = Path(data_dir).resolve()
    if is_writable_dir(data_dir):
        return data_dir / name
    base = Path(os.environ.get("METATRAIN_CACHE", Path.home() / ".cache" / "metatrain"))
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    return base / f"{data_dir.name}-{digest}" / name


def fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Name, size and mtime of each source file: any change marks the cache stale."""
    out = []
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return out


def load_cache(path: Path, expected_fingerprint) -> dict | None:
    """The cached dict, or None when it is missing, stale or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    limit = _MAP_ABOVE.get()
    mmap = limit is not None and path.stat().st_size > limit
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply rebuilt
        return None
    if not isinstance(blob, dict) or blob.get("version") != CACHE_VERSION:
        return None
    if blob.get("fingerprint") != [list(x) for x in expected_fingerprint]:
        return None
    return blob


def store_cache(path: Path, fp, **tensors) -> None:
    save_torch({"version": CACHE_VERSION, "fingerprint": [list(x) for x in fp], **tensors}, path)
