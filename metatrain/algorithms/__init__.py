"""Meta-learning algorithms behind one interface used by the run loop."""

import torch
from torch import nn

from metatrain.data.tasks import TaskBatch


class MetaLearner:
    """What the run loop needs from an algorithm.

    `net` holds everything that is meta-learned (the model, plus e.g. learned
    inner rates); its state_dict is what a best-k checkpoint stores and what
    the test-time ensemble swaps in and out.
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer | None = None

    def meta_step(self, batch: TaskBatch, iteration: int) -> dict[str, torch.Tensor]:
        """One meta-update from a task batch; returns detached scalar metrics."""
        raise NotImplementedError

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """Adapt to each task's support set; query logits (tasks, ways*queries, ways)."""
        raise NotImplementedError

    def train_shape(self, shots: int, queries: int) -> tuple[int, int]:
        """Support and query examples per class that meta-training tasks need."""
        return shots, queries

    def state_dict(self) -> dict:
        """Full training state: network, optimiser and schedules."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def build_learner(cfg, model, device) -> MetaLearner:
    from metatrain.algorithms.maml import Maml
    from metatrain.algorithms.reptile import Reptile

    name = cfg.algorithm.name
    if name == "maml":
        return Maml(cfg.algorithm, model, cfg.train, cfg.model.bn_eval.value, device)
    if name == "reptile":
        return Reptile(cfg.algorithm, model, cfg.train, cfg.model.bn_eval.value, device, cfg.seed)
    raise ValueError(f"unknown algorithm {name}")
