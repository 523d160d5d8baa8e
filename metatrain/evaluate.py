"""Meta-test over a fixed task set: mean accuracy, 95% confidence interval and
the top-k checkpoint ensemble (MAML++ averages the members' logits per task).

`evaluate_pair` gives the two numbers the papers quote, the single model and
the ensemble, from one pass over the members: each member's logits are
computed once and serve both."""

import math

import torch

from metatrain import distributed
from metatrain.algorithms import MetaLearner
from metatrain.data.tasks import FixedTasks


def mean_ci95(per_task_acc: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval, in percent."""
    a = per_task_acc.double() * 100
    n = a.numel()
    half = 1.96 * a.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.nan
    return a.mean().item(), half


def _all_logits(learner: MetaLearner, tasks: FixedTasks, batch: int) -> torch.Tensor:
    # (tasks, ways*queries, ways), detached, on the training device; in a distributed
    # run each rank adapts whole batches in turn and all gather them (the same numbers)
    return torch.cat(distributed.gather_batches(learner.predict, tasks.batches(batch)))


def _labels(tasks: FixedTasks, batch: int) -> torch.Tensor:
    return torch.cat([b.yq for b in tasks.batches(batch)])


def evaluate(
    learner: MetaLearner, tasks: FixedTasks, batch: int, members: list[dict] | None = None
) -> dict:
    """Accuracy of the current network, or of the ensemble of `members` (network
    state dicts) whose query logits are averaged per task."""
    if members:
        saved = {k: v.clone() for k, v in learner.net.state_dict().items()}
        logits = 0
        for m in members:
            learner.net.load_state_dict(m)
            logits = logits + _all_logits(learner, tasks, batch)
        logits = logits / len(members)
        learner.net.load_state_dict(saved)
    else:
        logits = _all_logits(learner, tasks, batch)
    per_task = (logits.argmax(-1) == _labels(tasks, batch)).float().mean(-1)
    acc, ci = mean_ci95(per_task.cpu())
    return {"acc": acc, "ci95": ci, "tasks": len(tasks)}


def _score(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    per_task = (logits.argmax(-1) == labels).float().mean(-1)
    acc, ci = mean_ci95(per_task.cpu())
    return {"acc": acc, "ci95": ci, "tasks": per_task.numel()}


def evaluate_pair(
    learner: MetaLearner, tasks: FixedTasks, batch: int, members: list[dict], single_first: bool
) -> dict:
    """{"single": ..., "ensemble": ...}: the ensemble averages the query logits of
    `members` (network state dicts, best first); the single model is the first
    member when `single_first`, else the learner's current network (the last
    parameters). With no members both are the current network."""
    labels = _labels(tasks, batch)
    saved = {k: v.clone() for k, v in learner.net.state_dict().items()}
    current = None if single_first and members else _all_logits(learner, tasks, batch)
    first, total = current, 0
    for i, m in enumerate(members):
        learner.net.load_state_dict(m)
        logits = _all_logits(learner, tasks, batch)
        first = logits if i == 0 and single_first else first
        total = total + logits
    learner.net.load_state_dict(saved)
    ensemble = total / len(members) if members else current
    return {"single": _score(first, labels), "ensemble": _score(ensemble, labels)}
