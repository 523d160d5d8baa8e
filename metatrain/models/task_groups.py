"""Tasks as channel groups: one pass of a backbone for a whole batch of tasks, no vmap.

T tasks, each with its own parameters, run as one network of T*C channels whose
convolutions have T groups: task t owns channels t*C .. (t+1)*C - 1 of every
layer, so the grouped convolutions, the per-channel batch statistics and the
pooling never mix tasks, and the head is a batched matmul. The sum over tasks of
the per-task losses then has, in task t's slice of the stacked parameters,
exactly task t's own gradient. A per-task loop of inner steps (evaluation,
Reptile) becomes one loop over steps on dense oneDNN/cuDNN kernels, with the
per-task loop's maths (tests/test_task_groups.py checks it in float64).

Parameters are stacked per task: {name: (T, *shape)}. A backbone runs here when it
declares `channel_groups` and gives the grouped pass of its trunk (grouped_trunk;
Conv4 does); the rest keep the per-task loop and vmap.
"""

import torch
import torch.nn.functional as F


def supports(model) -> bool:
    """Whether `model` declares a channel-groups pass of its own maths."""
    return bool(getattr(model, "channel_groups", False))


def to_groups(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """(T, N, C, H, W) -> (N, T*C, H, W), task-major channels; NHWC in memory unless
    asked otherwise (oneDNN runs these convolutions and pools faster on NHWC)."""
    t, n, c, h, w = x.shape
    if channels_last:
        # .contiguous(): with C = 1 the reshape is a view of x's own (NCHW) memory, and
        # from NCHW input oneDNN runs the whole network NCHW (measured 2-6x slower).
        y = x.permute(1, 3, 4, 0, 2).reshape(n, h, w, t * c).contiguous()  # (N, H, W, T*C)
        return y.permute(0, 3, 1, 2)  # (N, T*C, H, W) view, channels-last strides
    return x.transpose(0, 1).reshape(n, t * c, h, w)


def stack(params: dict, tasks: int) -> dict:
    """Each parameter repeated for `tasks` tasks: (T, *shape), a fresh tensor."""
    return {n: p.detach().unsqueeze(0).expand(tasks, *p.shape).clone() for n, p in params.items()}


def forward(model, params: dict, x: torch.Tensor, step: int = 0, running: bool = False):
    """Logits (T, N, ways) and batch statistics (T, ...) of T tasks' networks `params`
    {name: (T, *shape)} on their inputs x (T, N, C, H, W): per task, the value of
    model(params[t], x[t], step, running)."""
    if not supports(model):
        raise ValueError(f"{type(model).__name__} declares no channel-groups pass")
    feats, stats = model.grouped_trunk(params, x, step, running)  # (T, N, F), (T, ...)
    head_w, head_b = params["head.weight"], params["head.bias"]  # (T, ways, F), (T, ways)
    logits = torch.baddbmm(head_b.unsqueeze(1), feats, head_w.transpose(1, 2))
    return logits, stats


def grads(model, params: dict, wrt: list[str], x, y, step: int = 0, running=False):
    """First-order gradients of every task's mean cross-entropy on (x (T, N, C, H, W),
    y (T, N)) with respect to params[n] for n in wrt, stacked (T, *shape), detached;
    the batch statistics (T, blocks, 2, C) and the logits (T, N, ways), detached."""
    leaves = {n: params[n].detach().requires_grad_() for n in wrt}
    with torch.enable_grad():
        logits, stats = forward(model, {**params, **leaves}, x, step, running)
        # sum over tasks of each task's mean: task t's slice gets task t's gradient
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
        g = torch.autograd.grad(loss, [leaves[n] for n in wrt])
    return dict(zip(wrt, g)), stats, logits.detach()
