"""Backbones, each registered by its module in metatrain.registry.BACKBONES under
the name that conf/model/<name>.yaml gives, with that file's schema."""

import torch

from metatrain.registry import BACKBONES


def build_model(cfg, device: torch.device):
    """The backbone cfg.model names, shaped for the dataset and for the batch-norm
    rows the algorithm asks for (per-step weights or statistics)."""
    from metatrain.algorithms import learner_class

    weight_steps, stat_steps = learner_class(cfg.algorithm.name).bn_steps(cfg.algorithm)
    model = BACKBONES.get(cfg.model.name).target.from_config(
        cfg.model,
        in_channels=cfg.dataset.channels,
        ways=cfg.dataset.ways,
        image_size=cfg.dataset.image_size,
        bn_weight_steps=weight_steps,
        bn_stat_steps=stat_steps,
    )
    return model.to(device)
