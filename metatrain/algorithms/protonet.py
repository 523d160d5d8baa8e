"""Prototypical Networks.

Snell, Swersky, Zemel. "Prototypical Networks for Few-shot Learning", NeurIPS 2017.
The backbone's trunk embeds every image; a class's prototype is the mean embedding
of its support examples, c_k = mean_{i: y_i = k} f(x_i); a query's logits are its
negative squared Euclidean distances to the prototypes, -||f(x) - c_k||^2. The
trunk is meta-learned with Adam on the query cross-entropy of each task batch;
there is no inner loop, and the backbone's linear head is never used.

The support and the query set are embedded in separate passes, so batch norm
follows `model.bn_eval` as for every learner: the query batch with its own
statistics (transductive), each query with the support set alone, or running
statistics. Tasks run one at a time (loop), vmapped, or as channel groups of one
network where the backbone declares them (models/task_groups.py): the same maths.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metatrain.algorithms import MetaLearner, eval_mode, query_norm
from metatrain.algorithms.inner import pick_backend, requested_backend, task_pixels
from metatrain.config import AlgorithmConfig
from metatrain.models import task_groups
from metatrain.naming import bn_eval_mode
from metatrain.registry import LEARNERS
from metatrain.task_batch import TaskBatch


@dataclass
class ProtoNetConfig(AlgorithmConfig):
    name: str = "protonet"
    # Halve meta_lr every this many iterations (Snell et al.: every 2,000 episodes);
    # 0 keeps it constant.
    lr_halve_every: int = 0


def prototypes(h: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """Mean embedding per class: h (..., N, F), labels y (..., N) in [0, ways) ->
    (..., ways, F). Differentiable, and free of data-dependent shapes (vmap-able)."""
    onehot = F.one_hot(y, ways).to(h.dtype)  # (..., N, ways)
    counts = onehot.sum(-2).unsqueeze(-1)  # (..., ways, 1)
    return onehot.transpose(-1, -2) @ h / counts


def distance_logits(hq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """-||hq_i - c_k||^2 for queries hq (..., Q, F) and prototypes c (..., ways, F)
    -> (..., Q, ways); the difference itself, not the expanded square, so no
    cancellation between large norms."""
    d = hq.unsqueeze(-2) - c.unsqueeze(-3)  # (..., Q, ways, F)
    return -(d * d).sum(-1)


@LEARNERS.register("protonet", ProtoNetConfig)
class ProtoNet(MetaLearner):
    # Nothing adapts at test: no algorithm key changes how a trained network is tested.
    eval_keys = ()

    @classmethod
    def from_config(cls, cfg, model, device):
        return cls(cfg.algorithm, model, cfg.train, bn_eval_mode(cfg.model.bn_eval), device)

    @classmethod
    def inert_settings(cls, cfg) -> list[str]:
        every, iterations = cfg.algorithm.lr_halve_every, cfg.train.iterations
        if 0 < iterations <= every:
            line = f"algorithm.lr_halve_every={every} changes nothing in a run of {iterations}"
            return [line + " iterations"]
        return []

    def __init__(self, cfg, model, train_cfg, bn_eval: str, device: torch.device):
        self.cfg, self.model, self.train_cfg, self.device = cfg, model, train_cfg, device
        self.bn_running = bn_eval == "running"
        self.per_query = bn_eval == "support_plus_query"
        self.net = nn.ModuleDict({"model": model})
        self.net.to(device)
        # The trunk alone is meta-learned: the head never enters a prototypical logit.
        trunk = [p for n, p in model.params().items() if n not in model.head_names]
        self.optimizer = torch.optim.Adam(trunk, lr=cfg.meta_lr)

    def meta_lr(self, iteration: int) -> float:
        every = self.cfg.lr_halve_every
        return self.cfg.meta_lr * (0.5 ** (iteration // every) if every > 0 else 1.0)

    def backend_for(self, batch: TaskBatch, iteration: int, evaluation: bool = False) -> str:
        groups_ok = task_groups.supports(self.model)
        requested = requested_backend(self.train_cfg, groups_ok)
        pixels = task_pixels(batch.xs, batch.xq)
        return pick_backend(requested, self.device, False, pixels, groups_ok)

    # -- embeddings ---------------------------------------------------------

    def _features(self, params, batch: TaskBatch, backend: str, running: bool, per_query: bool):
        """Support and query embeddings (T, S, F), (T, Q, F) and the statistics of the
        batch-statistic passes (T, passes, *statistics shape)."""
        model = self.model

        def trunk(x):  # one task's images -> (features, statistics)
            return model.trunk(params, x, 0, running)

        def per_query_feats(xs, xq):  # one task's queries, each with the support set alone
            return query_norm.one_task(lambda b: model.trunk(params, b, 0, False)[0], xs, xq)

        if backend == "groups":
            tasks = len(batch)
            stacked = {n: p.unsqueeze(0).expand(tasks, *p.shape) for n, p in params.items()}
            hs, ss = model.grouped_trunk(stacked, batch.xs, 0, running)
            if per_query:
                return hs, torch.func.vmap(per_query_feats)(batch.xs, batch.xq), ss.unsqueeze(1)
            hq, sq = model.grouped_trunk(stacked, batch.xq, 0, running)
            return hs, hq, torch.stack([ss, sq], 1)

        def one(xs, xq):
            hs, ss = trunk(xs)
            if per_query:
                return hs, per_query_feats(xs, xq), ss.unsqueeze(0)
            hq, sq = trunk(xq)
            return hs, hq, torch.stack([ss, sq])

        if backend == "vmap":
            randomness = "different" if model.stochastic else "error"
            return torch.func.vmap(one, randomness=randomness)(batch.xs, batch.xq)
        outs = [one(batch.xs[t], batch.xq[t]) for t in range(len(batch))]
        return tuple(torch.stack(parts) for parts in zip(*outs))

    def logits(self, params, batch: TaskBatch, backend: str, running=False, per_query=False):
        """Query logits (T, ways*queries, ways) of the prototypical classifier and the
        passes' statistics (T, passes, ...)."""
        ways = int(batch.ys.max()) + 1  # labels are 0..ways-1 in every task
        hs, hq, stats = self._features(params, batch, backend, running, per_query)
        return distance_logits(hq, prototypes(hs, batch.ys, ways)), stats

    # -- the run loop's interface -------------------------------------------

    def meta_step(self, batch: TaskBatch, iteration: int) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        backend = self.backend_for(batch, iteration)
        logits, stats = self.logits(self.model.params(), batch, backend)  # (T, Q, ways)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.yq.flatten())  # mean over tasks
        loss.backward()
        stats = stats.mean(0)  # (T, passes, ...) -> (passes, ...): each folded as a step's
        self.apply_meta_gradient(stats, batch, iteration)
        acc = (logits.argmax(-1) == batch.yq).float().mean()
        return {"loss": loss.detach(), "acc": acc}

    @eval_mode
    @torch.no_grad()
    def predict(self, batch: TaskBatch) -> torch.Tensor:
        backend = self.backend_for(batch, 0, evaluation=True)
        params = {n: p.detach() for n, p in self.model.params().items()}
        return self.logits(params, batch, backend, self.bn_running, self.per_query)[0]

    def state_dict(self) -> dict:
        # The meta learning rate is a function of the iteration: no schedule state.
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
