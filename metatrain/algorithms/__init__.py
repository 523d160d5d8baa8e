"""Meta-learning algorithms behind one interface used by the run loop.

Each learner module registers its class and config schema in
metatrain.registry.LEARNERS under the name that conf/algorithm/*.yaml gives as
`name`; build_learner looks it up.
"""

import functools

import torch
from torch import nn

from metatrain import distributed
from metatrain.registry import LEARNERS
from metatrain.task_batch import TaskBatch


class MetaLearner:
    """What the run loop needs from an algorithm.

    `net` holds everything that is meta-learned (the model, plus e.g. learned
    inner rates); its state_dict is what a best-k checkpoint stores and what
    the test-time ensemble swaps in and out.
    """

    net: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    # Integer keys of the algorithm's config that must be at least 1.
    positive_keys: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg, model, device: torch.device) -> "MetaLearner":
        """The learner for the composed run config `cfg`, around `model`."""
        raise NotImplementedError

    @classmethod
    def bn_steps(cls, algo_cfg) -> tuple[int, int]:
        """Rows of batch-norm (affine parameters, running statistics) the backbone
        needs: (0, 1) is shared (C,) parameters and one set of statistics."""
        return 0, 1

    def meta_step(self, batch: TaskBatch, iteration: int) -> dict[str, torch.Tensor]:
        """One meta-update from a task batch; returns detached scalar metrics."""
        raise NotImplementedError

    def average_over_ranks(self, tensors: list[torch.Tensor], batch: TaskBatch) -> None:
        """In a distributed run, replace each tensor (in place) by its mean over the
        whole meta-batch, `batch` being this rank's shard: what meta_step calls on the
        shard's meta-gradients, displacements and statistics before applying them. A
        no-op in one process."""
        distributed.mean_(tensors, distributed.share(batch))

    def sequential(self) -> str | None:
        """Why this learner's tasks cannot be split across processes (each task
        depends on the one before), or None when they can."""
        return None

    def predict(self, batch: TaskBatch) -> torch.Tensor:
        """Adapt to each task's support set; query logits (tasks, ways*queries, ways)."""
        raise NotImplementedError

    def backend_for(self, batch: TaskBatch, iteration: int, evaluation: bool = False) -> str:
        """The execution backend that meta_step (or, evaluating, predict) uses on batch."""
        raise NotImplementedError

    def train_shape(self, shots: int, queries: int) -> tuple[int, int]:
        """Support and query examples per class that meta-training tasks need."""
        return shots, queries

    def state_dict(self) -> dict:
        """Full training state: network, optimiser and schedules."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def eval_mode(predict):
    """`predict` run with the learner's network in eval mode, its mode restored after:
    what draws random numbers only in training (ResNet-12's DropBlock) stays off, so
    a task set's logits are the same on every call."""

    @functools.wraps(predict)
    def wrapped(self, batch):
        was_training = self.net.training
        self.net.eval()
        try:
            return predict(self, batch)
        finally:
            self.net.train(was_training)

    return wrapped


def learner_class(name: str) -> type[MetaLearner]:
    return LEARNERS.get(name).target


def build_learner(cfg, model, device) -> MetaLearner:
    return learner_class(cfg.algorithm.name).from_config(cfg, model, device)
