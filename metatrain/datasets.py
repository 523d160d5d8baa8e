"""Find the configured dataset's reader (metatrain.registry.DATASETS) and its files.

A reader is registered as `reader(dataset_cfg, root) -> FewShotSplits` by its
module in metatrain/data/, with the schema of conf/dataset/<name>.yaml.
"""

import os
from pathlib import Path

from metatrain.data import FewShotSplits
from metatrain.registry import DATASETS


def dataset_root(cfg) -> Path:
    """dataset.root, else $METATRAIN_DATA/<name>, else ~/.cache/metatrain/<name>."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    if os.environ.get("METATRAIN_DATA"):
        return Path(os.environ["METATRAIN_DATA"]).expanduser() / cfg.name
    return Path.home() / ".cache" / "metatrain" / cfg.name


def load_splits(cfg) -> FewShotSplits:
    return DATASETS.get(cfg.name).target(cfg, dataset_root(cfg))
