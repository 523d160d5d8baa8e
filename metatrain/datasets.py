"""Find the configured dataset's reader (metatrain.registry.DATASETS) and its files.

A reader is registered as `reader(dataset_cfg, root) -> FewShotSplits` by its
module in metatrain/data/, with the schema of conf/dataset/<name>.yaml.
"""

import os
from pathlib import Path

import torch

from metatrain.data import FewShotSplits, store
from metatrain.data.cache import cache_path
from metatrain.registry import DATASETS


def dataset_root(cfg) -> Path:
    """dataset.root, else $METATRAIN_DATA/<name>, else ~/.cache/metatrain/<name>."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    if os.environ.get("METATRAIN_DATA"):
        return Path(os.environ["METATRAIN_DATA"]).expanduser() / cfg.name
    return Path.home() / ".cache" / "metatrain" / cfg.name


def load_splits(cfg, limit: int | None = None) -> FewShotSplits:
    """The reader's splits; a cache file larger than `limit` bytes stays memory-mapped."""
    with store.loading(limit):
        return DATASETS.get(cfg.name).target(cfg, dataset_root(cfg))


def load_placed(cfg, device: torch.device, names=("train", "val", "test")) -> FewShotSplits:
    """The named splits, their images placed as dataset.in_memory says (data/store.py): in
    memory on `device`, or memory-mapped on CPU. Only the placed tensors are kept, so a split
    a reader built in RAM and that was then mapped is freed."""
    limit = store.budget(getattr(cfg, "in_memory", "auto"), device)
    splits = load_splits(cfg, limit)
    scratch = cache_path(dataset_root(cfg), "store").parent
    splits.images = store.place(splits, limit, device, scratch, names)
    return splits
