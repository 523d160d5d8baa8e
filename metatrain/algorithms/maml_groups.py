"""MAML's task function for a whole task batch at once, tasks as channel groups.

The same maths as Maml._task (Finn et al. 2017; the MAML++ switches of Antoniou
et al. 2019) for T tasks in one pass of a T-group network (models/task_groups.py):
the support losses summed over tasks give each task's own inner gradient in its
slice of the stacked fast weights, to any derivative order (the grouped
convolutions keep Conv3x3's exact double backward). The meta-parameters enter
expanded to (T, *shape), so the outer backward sums the tasks' contributions.
"""

import torch
import torch.nn.functional as F

from metatrain.algorithms import query_norm
from metatrain.models import task_groups


def run_tasks(
    learner, params, rates, xs, ys, xq, yq, steps, weights, create_graph, running, per_query=False
):
    """Per task: weighted query loss (T,), final accuracy (T,), final query logits
    (T, Nq, ways) and the support batches' statistics (T, steps, blocks, 2, C).
    `per_query`: each query normalised with the support set alone (query_norm.py)."""
    tasks, model = xs.shape[0], learner.model
    fast = {n: p.unsqueeze(0).expand(tasks, *p.shape) for n, p in params.items()}
    # (T, N, F) support features of the stacked weights
    fast = learner.task_start(fast, xs, ys, lambda p, x: model.grouped_trunk(p, x, 0, running)[0])
    # Evaluation (no meta-gradient): every step starts from detached weights.
    meta = any(p.requires_grad for p in params.values())
    losses = xq.new_zeros(tasks)
    stats, logits = [], None
    for i in range(steps):
        adapted = {
            n: fast[n] if meta else fast[n].detach().requires_grad_() for n in learner.adapted
        }
        with torch.enable_grad():
            out, s = task_groups.forward(model, {**fast, **adapted}, xs, i, running)
            # sum over tasks of each task's mean: task t's slice gets task t's gradient
            loss = F.cross_entropy(out.flatten(0, 1), ys.flatten(), reduction="sum") / ys.shape[1]
            loss = loss * learner.loss_scale(ys.shape[1])
            names = list(adapted)
            g = torch.autograd.grad(loss, [adapted[n] for n in names], create_graph=create_graph)
        stats.append(s)
        for n, gn in zip(names, g):
            fast[n] = learner._sgd(adapted[n], gn, n, i, rates)
            if not meta:
                fast[n] = fast[n].detach()
        if weights[i] != 0.0 or i == steps - 1:
            if per_query:
                logits = query_norm.grouped(model, fast, xs, xq, i)  # (T, Nq, ways)
            else:
                logits, _ = task_groups.forward(model, fast, xq, i, running)  # (T, Nq, ways)
            if weights[i] != 0.0:
                ce = F.cross_entropy(logits.flatten(0, 1), yq.flatten(), reduction="none")
                ce = ce.view(tasks, -1).mean(1) * learner.loss_scale(yq.shape[1])
                losses = losses + weights[i] * ce
    acc = (logits.argmax(-1) == yq).float().mean(1)
    return losses, acc, logits, torch.stack(stats, 1)
