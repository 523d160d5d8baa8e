"""Meta-test over a fixed task set: mean accuracy, 95% confidence interval and
the top-k checkpoint ensemble (MAML++ averages the members' logits per task)."""

import math

import torch

from metatrain.algorithms import MetaLearner
from metatrain.data.tasks import FixedTasks


def mean_ci95(per_task_acc: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval, in percent."""
    a = per_task_acc.double() * 100
    n = a.numel()
    half = 1.96 * a.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.nan
    return a.mean().item(), half


def _all_logits(learner: MetaLearner, tasks: FixedTasks, batch: int) -> torch.Tensor:
    # (tasks, ways*queries, ways), detached, on the training device
    return torch.cat([learner.predict(b) for b in tasks.batches(batch)])


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
