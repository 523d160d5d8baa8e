"""MAML's task function for a whole task batch at once, tasks as channel groups.

The same maths as maml_task.task_loss (Finn et al. 2017; the MAML++ switches of
Antoniou et al. 2019) for T tasks in one pass of a T-group network
(models/task_groups.py): the support losses summed over tasks give each task's own
inner gradient in its slice of the stacked fast weights, to any derivative order (the
grouped convolutions keep Conv3x3's exact double backward). The meta-parameters enter
expanded to (T, *shape), so the outer backward sums the tasks' contributions.
"""

from dataclasses import replace

import torch.nn.functional as F

from metatrain.algorithms import query_norm
from metatrain.algorithms.inner import grads_autograd
from metatrain.algorithms.maml_task import InnerLoop, Passes, TaskOut, task_loss
from metatrain.models import task_groups


def grouped_passes(model, xs, xq, run: InnerLoop) -> Passes:
    """The network over T tasks at once: xs (T, Ns, C, H, W), xq (T, Nq, C, H, W),
    fast weights {name: (T, *shape)}; logits (T, N, ways)."""

    def support(fast, i):
        return task_groups.forward(model, fast, xs, i, run.running)

    def query(fast, i):
        if run.per_query:  # each query normalised with the support set alone
            return query_norm.grouped(model, fast, xs, xq, i), None
        return task_groups.forward(model, fast, xq, i, run.running)

    return Passes(support, query)


def grouped_tasks(xs, ys, xq, yq, *, learner, params, rates, run: InnerLoop) -> TaskOut:
    """Per task: weighted query loss (T,), final accuracy (T,), final query logits
    (T, Nq, ways) and the support batches' statistics (T, steps, blocks, 2, C)."""
    tasks, scale = xs.shape[0], learner.loss_scale

    def support_loss(out, y):
        # sum over tasks of each task's mean: task t's slice gets task t's gradient
        return (
            F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")
            / y.shape[1]
            * (scale(y.shape[1]))
        )

    def query_loss(logits, y):
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return ce.view(tasks, -1).mean(1) * scale(y.shape[1])  # (T,)

    # Autograd takes the inner gradients; evaluation's detached weights become leaves.
    rule = replace(
        learner.rule(rates), support_loss=support_loss, query_loss=query_loss, grads=grads_autograd
    )
    fast = {n: p.unsqueeze(0).expand(tasks, *p.shape) for n, p in params.items()}

    def features(p, x):  # (T, N, F) support features of the stacked weights
        return learner.model.grouped_trunk(p, x, 0, run.running)[0]

    fast = learner.task_start(fast, xs, ys, features)
    passes = grouped_passes(learner.model, xs, xq, run)
    out = task_loss(fast, ys, yq, passes=passes, rule=rule, run=run)
    # (steps, T, blocks, 2, C) -> (T, steps, blocks, 2, C)
    return out._replace(stats=out.stats.transpose(0, 1).contiguous())
