"""The maths of one MAML task: inner SGD steps on the support set, then the query loss.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017: theta_{i+1} = theta_i - alpha * grad L_support(theta_i), and the
task's loss is the query loss at theta_k. With the multi-step loss of Antoniou,
Edwards, Storkey ("How to train your MAML", ICLR 2019) it is sum_i w_i * L_query(theta_i).

`task_loss` is that, once, with named inputs and a named result. Everything about
execution stays outside it: the backend (per-task loop, vmap, tasks as channel groups),
compiled or eager models, memory layouts and chunking are chosen by the caller
(maml.py, maml_groups.py), which hands in the network's passes over the task's data
(`Passes`) and the inner update (`InnerRule`). recompute.py replays `inner_step` for
its memory-bounded second-order gradient.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class InnerLoop:
    """The settings of one call: how many steps, and how the result is used."""

    steps: int
    weights: tuple[float, ...]  # query-loss weight after each step (MSL), one per step
    create_graph: bool = False  # differentiate through the inner gradients (second order)
    running: bool = False  # normalise with running statistics (model.bn_eval=running)
    per_query: bool = False  # each query normalised with the support set alone


class Passes(NamedTuple):
    """The network over one task's data (or a grouped batch of tasks), as a backend runs it."""

    support: Callable  # (fast weights, step i) -> (support logits, statistics)
    query: Callable  # (fast weights, step i) -> (query logits, statistics or None)
    prepare: Callable = lambda i: None  # called before step i's gradient (ANIL's features)


@dataclass(frozen=True)
class InnerRule:
    """How a task adapts: which weights, with what update, descending which losses."""

    adapted: tuple[str, ...]  # the parameter names the inner loop changes
    sgd: Callable  # (p, g, name, step) -> p - rate * g
    support_loss: Callable  # (logits, labels) -> the loss the inner step descends
    query_loss: Callable  # (logits, labels) -> the task's query loss
    grads: Callable  # (loss_fn, params, create_graph) -> (grads, aux), see inner.GRADS


class TaskOut(NamedTuple):
    """One task's result; every field gains a leading task dimension over a batch."""

    loss: torch.Tensor  # weighted query loss, ()
    acc: torch.Tensor  # query accuracy after the last step, ()
    logits: torch.Tensor  # query logits after the last step, (Nq, ways)
    stats: torch.Tensor  # the support passes' statistics, (steps, *statistics shape)
    # the task's meta-gradient where it is computed by value (recompute.py), else {}:
    # vmap returns tensors only, so no None
    grads: dict

    def map(self, f) -> "TaskOut":
        """f on loss, acc, logits and stats; the gradients as they are."""
        return TaskOut(f(self.loss), f(self.acc), f(self.logits), f(self.stats), self.grads)

    @staticmethod
    def cat(parts: list["TaskOut"]) -> "TaskOut":
        """Chunks' results joined along the task dimension (their gradients left out)."""
        fields = ("loss", "acc", "logits", "stats")
        return TaskOut(*(torch.cat([getattr(p, f) for p in parts]) for f in fields), grads={})


def inner_step(
    fast: dict, i: int, ys: torch.Tensor, *, passes: Passes, rule: InnerRule, create_graph: bool
) -> tuple[dict, torch.Tensor]:
    """Inner step i from the weights `fast` on support labels ys: (the next weights,
    the support pass's statistics)."""
    passes.prepare(i)

    def support_loss(adapted):
        out, s = passes.support({**fast, **adapted}, i)
        return rule.support_loss(out, ys), s

    grads, stats = rule.grads(support_loss, {n: fast[n] for n in rule.adapted}, create_graph)
    return {**fast, **{n: rule.sgd(fast[n], grads[n], n, i) for n in rule.adapted}}, stats


def task_loss(
    params: dict,
    ys: torch.Tensor,
    yq: torch.Tensor,
    *,
    passes: Passes,
    rule: InnerRule,
    run: InnerLoop,
) -> TaskOut:
    """Adapt `params` to one task's support labels ys, and score the queries yq."""
    fast, loss, stats, logits = dict(params), None, [], None
    for i in range(run.steps):
        fast, s = inner_step(fast, i, ys, passes=passes, rule=rule, create_graph=run.create_graph)
        stats.append(s)
        w = run.weights[i]
        # The query pass runs where the loss uses it, and at the last step for the
        # accuracy and logits; never twice for one step.
        if w != 0.0 or i == run.steps - 1:
            logits, _ = passes.query(fast, i)
            if w != 0.0:
                term = w * rule.query_loss(logits, yq)
                loss = term if loss is None else loss + term
    acc = (logits.argmax(-1) == yq).float().mean(-1)
    if loss is None:  # no step weighted (evaluation)
        loss = torch.zeros_like(acc)
    return TaskOut(loss, acc, logits, torch.stack(stats), grads={})
