"""Pick and load the configured dataset, resolving where its files live."""

import os
from pathlib import Path

from metatrain.data import FewShotSplits
from metatrain.errors import MetatrainError


def dataset_root(cfg) -> Path:
    """dataset.root, else $METATRAIN_DATA/<name>, else ~/.cache/metatrain/<name>."""
    if cfg.root:
        return Path(cfg.root).expanduser()
    if os.environ.get("METATRAIN_DATA"):
        return Path(os.environ["METATRAIN_DATA"]).expanduser() / cfg.name
    return Path.home() / ".cache" / "metatrain" / cfg.name


def load_splits(cfg) -> FewShotSplits:
    root = dataset_root(cfg)
    if cfg.name == "omniglot":
        from metatrain.data.omniglot import load_omniglot_images, split_omniglot

        images, names = load_omniglot_images(root, cfg.image_size, cfg.download)
        return split_omniglot(
            images, names, cfg.split_seed, cfg.train_classes, cfg.val_classes, cfg.rotations
        )
    if cfg.name == "miniimagenet":
        from metatrain.data.miniimagenet import load_miniimagenet

        return load_miniimagenet(root, cfg.image_size, cfg.layout)
    raise MetatrainError(f"unknown dataset {cfg.name!r}; use dataset=omniglot or miniimagenet")
