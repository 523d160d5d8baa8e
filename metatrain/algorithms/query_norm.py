"""Evaluation that normalises each query with the support set alone.

Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms", 2018: the
non-transductive test predicts each query from one forward pass over the task's
support set plus that one query, batch norm in training mode, so the statistics
are those of the N*K support images and the query, and no query sees another.
`model.bn_eval=support_plus_query` selects it for any learner; the passes of a
task's queries run as one batch of Q small batches, each (support + 1) images.
"""

import torch

from metatrain.models import task_groups

# Images per forward call, beyond which the queries are taken in chunks: one chunk's
# activations (e.g. 4,096 MiniImageNet images of 32 x 84 x 84 floats, 3.6 GB for
# the first block) then bound the memory whatever the task count.
MAX_IMAGES = 4096


def with_support(xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """(..., S, C, H, W) support and (..., Q, C, H, W) queries -> (..., Q, S+1, C, H, W):
    for each query, the support set followed by that query."""
    *lead, s, c, h, w = xs.shape
    q = xq.shape[-4]
    support = xs.unsqueeze(-5).expand(*lead, q, s, c, h, w)
    return torch.cat([support, xq.unsqueeze(-4)], dim=-4)


def _chunks(queries: int, per_query: int) -> int:
    """Queries per forward call so that at most MAX_IMAGES images go in at once."""
    return max(1, min(queries, MAX_IMAGES // max(per_query, 1)))


def one_task(forward, xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Query logits (Q, ways) of one task: forward(x (S+1, C, H, W)) -> (S+1, ways) is
    the network with the task's weights; the last row of each pass is its query's."""
    x = with_support(xs, xq)  # (Q, S+1, C, H, W)
    step = _chunks(x.shape[0], x.shape[1])
    last = torch.func.vmap(lambda xi: forward(xi)[-1])
    return torch.cat([last(x[i : i + step]) for i in range(0, x.shape[0], step)])


def grouped(model, params: dict, xs: torch.Tensor, xq: torch.Tensor, step: int = 0):
    """Query logits (T, Q, ways) of T tasks at once as channel groups (task_groups.py):
    params {name: (T, *shape)}, xs (T, S, C, H, W), xq (T, Q, C, H, W). Each (task,
    query) pair is a group of its own, with its task's weights."""
    x = with_support(xs, xq)  # (T, Q, S+1, C, H, W)
    tasks, queries = x.shape[:2]
    step_q = _chunks(queries, tasks * x.shape[2])
    out = []
    for i in range(0, queries, step_q):
        part = x[:, i : i + step_q]  # (T, q, S+1, C, H, W)
        q = part.shape[1]
        # each task's weights once per query of the chunk: (T*q, *shape)
        p = {n: t.repeat_interleave(q, dim=0) for n, t in params.items()}
        logits, _ = task_groups.forward(model, p, part.flatten(0, 1), step)  # (T*q, S+1, ways)
        out.append(logits[:, -1].view(tasks, q, -1))
    return torch.cat(out, dim=1)


def logits_per_query(model, params: dict, xs, xq, groups: bool, step: int = 0):
    """Query logits (T, Q, ways) for stacked per-task weights params {name: (T, ...)}:
    channel groups where the backbone runs them, else vmapped over tasks."""
    if groups:
        return grouped(model, params, xs, xq, step)

    def task(p, s, q):
        return one_task(lambda x: model(p, x, step=step)[0], s, q)

    return torch.func.vmap(task)(params, xs, xq)
