"""Reptile.

Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms", 2018.
For each task, k steps of an inner optimiser (Adam with beta1 = 0, or SGD) on
minibatches of the task's examples, starting from phi, give W; then
phi <- phi + eps * mean_tasks(W - phi) (batched), or phi <- phi + eps (W - phi)
after each task in turn (serial). eps falls linearly from meta_step to
meta_step_final over the run. There is no support/query split in
meta-training: each task draws train_shots examples per class.

The inner Adam restarts for every task (`inner_state=reset`), or, as the
authors' code runs it (`inner_state=carry`), keeps its moments and step count
from task to task through all of meta-training, every evaluation task starting
from the end-of-training state (their Adam slots are restored around each test
task but never around a training task). Carried state makes the tasks of a
meta-batch sequential. Tasks run one at a time (loop), together under
torch.func.vmap, or together as channel groups of one network (groups,
models/task_groups.py).

Non-transductive evaluation as the authors run it (`model.bn_eval=
support_plus_query`): each query is predicted by one forward pass over the
support set plus that query alone, with batch statistics (query_norm.py).
"""

import math
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metatrain.algorithms import MetaLearner, eval_mode, query_norm
from metatrain.algorithms.inner import GRADS, adam_steps_, pick_backend, requested_backend
from metatrain.config import AlgorithmConfig
from metatrain.models import task_groups
from metatrain.naming import bn_eval_mode
from metatrain.registry import LEARNERS
from metatrain.task_batch import TaskBatch


class InnerOptimizer(Enum):
    adam = "adam"
    sgd = "sgd"


class InnerState(Enum):
    reset = "reset"  # a fresh inner Adam for every task
    carry = "carry"  # one Adam state through meta-training; evaluation starts from it


@dataclass
class ReptileConfig(AlgorithmConfig):
    name: str = "reptile"
    meta_batch: int = 5
    meta_lr: float = 0.0  # unused: Reptile steps with meta_step below
    inner_optimizer: InnerOptimizer = InnerOptimizer.adam
    inner_lr: float = 1e-3
    inner_batch: int = 10
    inner_iters: int = 5
    train_shots: int = 10  # examples per class drawn for each meta-training task
    meta_step: float = 1.0  # eps at the first iteration
    meta_step_final: float = 0.0  # eps at the last iteration (linear in between)
    eval_iters: int = 50
    eval_batch: int = 5
    serial: bool = False  # update phi after each task (Algorithm 1) instead of averaging
    inner_state: InnerState = InnerState.reset


INNER_BETAS = (0.0, 0.999)  # beta1 = 0 as published: no momentum across minibatches


class Moments(NamedTuple):
    """The inner Adam's first and second moments, by parameter name."""

    m: dict
    v: dict


class Trained(NamedTuple):
    """What inner training leaves, per task; a leading task dimension over a batch."""

    weights: dict  # W, the trained weights
    adam: Moments  # the inner optimiser's final moments
    stats: torch.Tensor  # the minibatches' normalisation statistics, (iters, blocks, 2, C)
    # logits on the last minibatch of the weights trained on all the others (before
    # its own step), (batch, ways): the accuracy of the adapted weights, at no cost
    last: torch.Tensor

    @staticmethod
    def stack(parts: list["Trained"]) -> "Trained":
        """Tasks trained one at a time, stacked as a batched run returns them."""

        def dicts(get):
            return {k: torch.stack([get(p)[k] for p in parts]) for k in parts[0].weights}

        return Trained(
            dicts(lambda p: p.weights),
            Moments(dicts(lambda p: p.adam.m), dicts(lambda p: p.adam.v)),
            torch.stack([p.stats for p in parts]),
            torch.stack([p.last for p in parts]),
        )


def minibatch_ids(n: int, iters: int, batch: int, generator: torch.Generator, tasks: int):
    """(tasks, iters, batch) example ids: passes over shuffled data, as in epochs."""
    passes = math.ceil(iters * batch / n)
    dev = generator.device
    keys = torch.rand(tasks, passes, n, generator=generator, device=dev)
    ids = keys.argsort(-1).reshape(tasks, passes * n)  # (tasks, passes*n) concatenated shuffles
    return ids[:, : iters * batch].reshape(tasks, iters, batch)


class AdamState(nn.Module):
    """The inner Adam's moments and step count carried across tasks (inner_state=carry),
    as buffers, so that last.pt, the best-k checkpoints and the ensemble keep them
    with the network they belong to."""

    def __init__(self, params: dict):
        super().__init__()
        self.names = list(params)
        for n, p in params.items():
            self.register_buffer(self._key("m", n), torch.zeros_like(p))
            self.register_buffer(self._key("v", n), torch.zeros_like(p))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"{kind}__{name.replace('.', '__')}"

    def get(self) -> tuple[dict, dict, int]:
        """(m, v, steps taken): the tensors themselves; callers copy before updating."""
        m = {n: getattr(self, self._key("m", n)) for n in self.names}
        v = {n: getattr(self, self._key("v", n)) for n in self.names}
        return m, v, int(self.step)

    def set(self, m: dict, v: dict, step: int) -> None:
        for n in self.names:
            getattr(self, self._key("m", n)).copy_(m[n])
            getattr(self, self._key("v", n)).copy_(v[n])
        self.step.fill_(step)


@LEARNERS.register("reptile", ReptileConfig)
class Reptile(MetaLearner):
    positive_keys = ("inner_iters", "inner_batch", "train_shots", "eval_iters", "eval_batch")
    eval_keys = ("eval_iters", "eval_batch", "inner_lr")

    @classmethod
    def inert_settings(cls, cfg) -> list[str]:
        a = cfg.algorithm
        lines = []
        if a.meta_lr != 0:
            lines.append(
                f"algorithm.meta_lr={a.meta_lr} is unused by Reptile, whose outer step is "
                "algorithm.meta_step"
            )
        if a.grad_clip > 0:
            lines.append("algorithm.grad_clip is unused by Reptile")
        if a.inner_state.value == "carry" and a.inner_optimizer.value != "adam":
            lines.append("algorithm.inner_state=carry changes nothing: SGD keeps no state")
        return lines

    @classmethod
    def from_config(cls, cfg, model, device):
        return cls(
            cfg.algorithm, model, cfg.train, bn_eval_mode(cfg.model.bn_eval), device, cfg.seed
        )

    def __init__(self, cfg, model, train_cfg, bn_eval: str, device: torch.device, seed: int = 0):
        self.cfg, self.model, self.train_cfg = cfg, model, train_cfg
        self.bn_eval = bn_eval_mode(bn_eval)
        self.device = device
        self.net = nn.ModuleDict({"model": model})
        self.carry = cfg.inner_state.value == "carry" and cfg.inner_optimizer.value == "adam"
        if self.carry:
            self.net["adam"] = AdamState(model.params())
        self.net.to(device)
        self.generator = torch.Generator(device=device).manual_seed(seed + 7919)
        if cfg.meta_batch < 1:
            raise ValueError("meta_batch")

    def train_shape(self, shots: int, queries: int) -> tuple[int, int]:
        return self.cfg.train_shots, 0

    def meta_step_size(self, iteration: int) -> float:
        frac = iteration / max(self.train_cfg.iterations, 1)
        return (1 - frac) * self.cfg.meta_step + frac * self.cfg.meta_step_final

    def backend(self, xs: torch.Tensor | None = None, batch: int = 0) -> str:
        """The backend for inner loops on minibatches of `batch` of the tasks' images
        xs (tasks, N, C, H, W): train.backend, or with `auto` the faster one for this
        device and minibatch size (pick_backend)."""
        ok = task_groups.supports(self.model)
        requested = requested_backend(self.train_cfg, ok)
        pixels = None if xs is None else min(batch, xs.shape[1]) * xs.shape[-2] * xs.shape[-1]
        return pick_backend(requested, self.device, False, pixels, groups_ok=ok)

    def _update(self, fast: dict, grads: dict, m: dict, v: dict, step: int, lr: float):
        """One inner step of the configured optimiser on every tensor of `fast` (its
        own tensors, updated in place unless under a torch.func transform); `step` is
        Adam's 1-based step count."""
        names = list(grads)
        if self.cfg.inner_optimizer.value == "adam":
            ps, ms, vs = [fast[n] for n in names], [m[n] for n in names], [v[n] for n in names]
            adam_steps_(ps, [grads[n] for n in names], ms, vs, step, lr, INNER_BETAS)
            for n, p, mn, vn in zip(names, ps, ms, vs):
                fast[n], m[n], v[n] = p, mn, vn
        else:
            for n in names:
                fast[n] = fast[n] - lr * grads[n]

    def backend_for(self, batch: TaskBatch, iteration: int, evaluation: bool = False) -> str:
        size = self.cfg.eval_batch if evaluation else self.cfg.inner_batch
        return self.backend(batch.xs, size)

    def _inner(self, params, xs, ys, ids, *, lr: float, grads_fn, start) -> Trained:
        """Train one task from params on minibatches xs[ids[i]], the optimiser starting
        at `start` = (m, v, steps taken), its gradients taken by grads_fn (inner.GRADS)."""
        fast = {n: p.clone() for n, p in params.items()}  # updated in place: phi's own copy
        m0, v0, t0 = start
        m = {n: t.clone() for n, t in m0.items()}
        v = {n: t.clone() for n, t in v0.items()}
        stats, last = [], None
        for i in range(ids.shape[0]):
            x, y = xs[ids[i]], ys[ids[i]]

            def loss_fn(p, x=x, y=y):
                out, s = self.model(p, x)
                return F.cross_entropy(out, y), (s, out.detach())

            grads, (s, out) = grads_fn(loss_fn, fast, False)
            stats.append(s)
            last = out
            self._update(fast, grads, m, v, t0 + i + 1, lr)
        return Trained(fast, Moments(m, v), torch.stack(stats), last)

    def _inner_groups(self, params, xs, ys, ids, *, lr: float, start) -> Trained:
        """_inner for every task at once, tasks as channel groups: the result stacked over
        tasks (statistics (tasks, iters, blocks, 2, C))."""
        tasks = ids.shape[0]
        fast = task_groups.stack(params, tasks)
        m0, v0, t0 = start
        m, v = task_groups.stack(m0, tasks), task_groups.stack(v0, tasks)
        rows = torch.arange(tasks, device=ids.device)[:, None]
        stats, last = [], None
        for i in range(ids.shape[1]):
            # (tasks, batch, C, H, W) and (tasks, batch): each task's minibatch i
            x, y = xs[rows, ids[:, i]], ys[rows, ids[:, i]]
            grads, s, out = task_groups.grads(self.model, fast, list(fast), x, y)
            stats.append(s)
            last = out
            self._update(fast, grads, m, v, t0 + i + 1, lr)
        return Trained(fast, Moments(m, v), torch.stack(stats, 1), last)

    def _fresh_state(self, params) -> tuple[dict, dict, int]:
        zeros = {n: torch.zeros_like(p) for n, p in params.items()}
        return zeros, dict(zeros), 0

    def _train_tasks(
        self, params, xs, ys, *, iters: int, batch: int, generator, start=None, shard=None
    ):
        """W for every task: dict of (tasks, *shape) tensors; the optimiser's final
        (m, v), stacked the same way; the mean statistics; and the logits on the last
        minibatch of the weights trained on those before it, with its labels, (tasks,
        batch, ways) and (tasks, batch). Every task's optimiser starts at `start`
        (m, v, steps taken), fresh if None. A distributed shard (first task, full
        batch's tasks) draws the full batch's minibatches and keeps its own, as one
        process would draw them."""
        tasks, n = ys.shape
        first, drawn = (0, tasks) if shard is None else shard
        ids = minibatch_ids(n, iters, min(batch, n), generator, drawn)[first : first + tasks]
        backend = self.backend(xs, batch)
        grads_fn = GRADS.get(backend)
        lr = self.cfg.inner_lr
        start = self._fresh_state(params) if start is None else start
        if backend == "groups":
            out = self._inner_groups(params, xs, ys, ids, lr=lr, start=start)
        else:

            def one(x, y, i):
                return self._inner(params, x, y, i, lr=lr, grads_fn=grads_fn, start=start)

            if backend == "loop":
                out = Trained.stack([one(xs[t], ys[t], ids[t]) for t in range(tasks)])
            else:
                out = torch.func.vmap(one)(xs, ys, ids)
        last_labels = torch.gather(ys, 1, ids[:, -1])
        w = {k: t.detach() for k, t in out.weights.items()}
        return w, out.adam, out.stats.mean(0), (out.last, last_labels)

    def _tasks_in_turn(self, phi, xs, ys, serial: bool, eps: float):
        """Meta-training tasks one after another: with `serial` (Algorithm 1) phi moves
        after each task and the next starts there; under inner_state=carry each task's
        inner Adam starts where the previous task left it. Returns phi (moved only
        under `serial`), every task's W (tasks, *shape), the tasks' statistics
        (tasks, iters, blocks, 2, C) and the last-minibatch logits and labels."""
        state = self.net["adam"] if self.carry else None
        ws, stats, lasts = [], [], []
        for t in range(xs.shape[0]):
            start = state.get() if state is not None else None
            w, (m, v), s, last = self._train_tasks(
                phi, xs[t : t + 1], ys[t : t + 1], iters=self.cfg.inner_iters,
                batch=self.cfg.inner_batch, generator=self.generator, start=start,
            )  # fmt: skip
            if state is not None:
                state.set({k: x[0] for k, x in m.items()}, {k: x[0] for k, x in v.items()},
                          start[2] + self.cfg.inner_iters)  # fmt: skip
            if serial:
                phi = {n: phi[n] + eps * (w[n][0] - phi[n]) for n in phi}
            ws.append(w)
            stats.append(s)
            lasts.append(last)
        w = {k: torch.cat([x[k] for x in ws]) for k in phi}
        last = tuple(torch.cat(parts) for parts in zip(*lasts))
        return phi, w, torch.stack(stats), last

    def sequential(self) -> str | None:
        if self.cfg.serial:
            return "algorithm.serial=true moves phi after each task in turn"
        if self.carry:
            return "algorithm.inner_state=carry passes the inner Adam from task to task"
        return None

    @torch.no_grad()
    def meta_step(self, batch: TaskBatch, iteration: int) -> dict[str, torch.Tensor]:
        params = self.model.params()
        phi = {n: p.detach() for n, p in params.items()}
        eps = self.meta_step_size(iteration)
        if self.carry or self.cfg.serial:
            moved, w, stats, last = self._tasks_in_turn(
                phi, batch.xs, batch.ys, self.cfg.serial, eps
            )
            if self.cfg.serial:
                phi = moved
                for s in stats:  # (iters, blocks, 2, C) per task, in order
                    self.model.update_running_stats(s.mean(0, keepdim=True))
            else:  # Algorithm 2 over tasks run in turn (carried Adam)
                phi = {n: phi[n] + eps * (w[n].mean(0) - phi[n]) for n in phi}
                self.model.update_running_stats(stats.mean(0).mean(0, keepdim=True))
        else:
            # Algorithm 2: the mean of the tasks' displacements, tasks batched.
            w, _, stats, last = self._train_tasks(
                phi, batch.xs, batch.ys, iters=self.cfg.inner_iters, batch=self.cfg.inner_batch,
                generator=self.generator, shard=batch.shard,
            )  # fmt: skip
            mean_w, stats = {n: w[n].mean(0) for n in phi}, stats.mean(0, keepdim=True)
            self.average_over_ranks([*mean_w.values(), stats], batch)  # a distributed run
            phi = {n: phi[n] + eps * (mean_w[n] - phi[n]) for n in phi}
            self.model.update_running_stats(stats)
        for n, p in params.items():
            p.copy_(phi[n])
        # For the log: the loss and accuracy on each task's last inner minibatch of the
        # weights trained on the minibatches before it, which the inner loop computed
        # anyway (a separate pass over every task's examples cost 15-20% of a
        # meta-iteration). Minibatches are passes over the shuffled task, so the last one
        # holds examples not yet trained on while inner_iters * inner_batch fits in one
        # pass. The starting weights' accuracy would be chance on every task (each draws
        # its own labels) and show none of the learning.
        logits, labels = last
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc}

    @torch.no_grad()
    @eval_mode
    def predict(self, batch: TaskBatch) -> torch.Tensor:
        phi = {n: p.detach() for n, p in self.model.params().items()}
        # A fixed generator: the fine-tuning minibatches of a task set never vary.
        g = torch.Generator(device=self.device).manual_seed(0)
        # Carried state: every evaluation task starts from the end-of-training optimiser
        # and leaves it as it was (the authors restore it after each test task).
        start = self.net["adam"].get() if self.carry else None
        w, _, _, _ = self._train_tasks(
            phi, batch.xs, batch.ys, iters=self.cfg.eval_iters, batch=self.cfg.eval_batch,
            generator=g, start=start,
        )  # fmt: skip
        running = self.bn_eval == "running"
        groups = self.backend(batch.xs, self.cfg.eval_batch) == "groups"
        if self.bn_eval == "support_plus_query":
            return query_norm.logits_per_query(self.model, w, batch.xs, batch.xq, groups)
        if groups:
            return task_groups.forward(self.model, w, batch.xq, running=running)[0]

        def query_logits(p, x):
            return self.model(p, x, running=running)[0]

        return torch.func.vmap(query_logits)(w, batch.xq)

    def head_keys(self) -> tuple[str, ...]:
        # The carried inner Adam keeps moments of the head's tensors too.
        heads = self.model.head_names if self.carry else ()
        moments = tuple(f"adam.{AdamState._key(k, n)}" for k in ("m", "v") for n in heads)
        return super().head_keys() + moments

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.generator.set_state(state["generator"])
