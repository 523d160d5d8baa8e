"""Where preprocessed uint8 image caches live, and when they are rebuilt.

A cache sits beside the data it was built from. Data folders are often
read-only (a shared mount), so then the cache goes under METATRAIN_CACHE or
~/.cache/metatrain instead, in a folder named after the data path.
"""

import hashlib
import os
from pathlib import Path

import torch

from metatrain.files import is_writable_dir, save_torch

CACHE_VERSION = 1


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
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a truncated or foreign file is simply rebuilt
        return None
    if not isinstance(blob, dict) or blob.get("version") != CACHE_VERSION:
        return None
    if blob.get("fingerprint") != [list(x) for x in expected_fingerprint]:
        return None
    return blob


def store_cache(path: Path, fp, **tensors) -> None:
    save_torch({"version": CACHE_VERSION, "fingerprint": [list(x) for x in fp], **tensors}, path)
