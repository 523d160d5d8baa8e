"""Meta-learning algorithms behind one interface used by the run loop.

Each learner module registers its class and config schema in
metatrain.registry.LEARNERS under the name that conf/algorithm/*.yaml gives as
`name`; build_learner looks it up. What evaluation, the inert-setting warnings and
`metatrain-eval` need to know of a learner, its class declares (eval_keys,
eval_protocol, check_eval, inert_settings): no module outside the learner's own
names it.
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
    # Keys of the algorithm's config that set how a trained network adapts at test, not
    # what was trained: `metatrain-eval` may set them (algorithm.<key>).
    eval_keys: tuple[str, ...] = ()

    @classmethod
    def eval_protocol(cls, algo_cfg) -> dict:
        """The algorithm's settings that define an evaluation's numbers, for its record."""
        return {k: algo_cfg[k] for k in cls.eval_keys}

    @classmethod
    def check_eval(cls, trained_algo, keys: list[str]) -> None:
        """Refuse (MetatrainError) evaluation overrides, by dotted key, that the network
        trained under `trained_algo` cannot run."""

    @classmethod
    def inert_settings(cls, cfg) -> list[str]:
        """One line for each of the algorithm's settings in `cfg` that is on but cannot
        change the run (metatrain/inert.py)."""
        return []

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

    def apply_meta_gradient(self, stats: torch.Tensor, batch: TaskBatch, iteration: int):
        """The outer update once .grad holds this shard's meta-gradient: average it and
        the batch statistics over a distributed run's shards, clip element-wise
        (algorithm.grad_clip > 0) the network's gradients only, as both published MAML
        implementations clip (MAML++'s meta_update clamps its classifier's gradients,
        not its learned inner rates'), step the optimiser at this iteration's meta rate
        (meta_lr), and fold the statistics into the running ones."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        self.average_over_ranks([*grads, stats], batch)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.meta_lr(iteration)
        self.optimizer.step()
        self.model.update_running_stats(stats)

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

    def head_keys(self) -> tuple[str, ...]:
        """The keys of net's state dict indexed by output unit (rows of the head): what
        a test with fewer ways narrows (eval_run.narrow_head)."""
        model = self.net["model"]
        return tuple(f"model.{model.state_name(n)}" for n in model.head_names)

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
