"""Tasks as channel groups: one pass of Conv4 for a whole batch of tasks, no vmap.

T tasks, each with its own parameters, run as one Conv4 of T*C channels whose
convolutions have T groups: task t owns channels t*C .. (t+1)*C - 1 of every
layer, so the grouped convolutions, the per-channel batch statistics and the
pooling never mix tasks, and the head is a batched matmul. The sum over tasks of
the per-task losses then has, in task t's slice of the stacked parameters,
exactly task t's own gradient. A per-task loop of inner steps (evaluation,
Reptile) becomes one loop over steps on dense oneDNN/cuDNN kernels, with the
per-task loop's maths (tests/test_task_groups.py checks it in float64).

Parameters are stacked per task: {name: (T, *shape)}.
"""

import torch
import torch.nn.functional as F

from metatrain.models.conv4 import BLOCKS, Conv4
from metatrain.models.kernels import conv_block


def supports(model) -> bool:
    """Whether `model` can run as channel groups: Conv4 only (other backbones keep
    the per-task loop and vmap)."""
    return isinstance(model, Conv4)


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


def _row(p: torch.Tensor, step: int, per_step_dim: int) -> torch.Tensor:
    """The step's row of a per-step tensor (dim() == per_step_dim), else p itself."""
    if p.dim() == per_step_dim:
        return p.select(per_step_dim - 2, min(step, p.shape[per_step_dim - 2] - 1))
    return p


def forward(model: Conv4, params: dict, x: torch.Tensor, step: int = 0, running: bool = False):
    """Logits (T, N, ways) and batch statistics (T, blocks, 2, C) of T tasks' networks
    `params` {name: (T, *shape)} on their inputs x (T, N, C, H, W): per task, the
    value of model(params[t], x[t], step, running)."""
    tasks, n = x.shape[:2]
    h = to_groups(x)
    stats = []
    for i in range(BLOCKS):
        w = params[f"conv{i}.weight"]  # (T, C_out, C_in, 3, 3)
        c = w.shape[1]
        if f"bn{i}.weight" in params:
            gamma = _row(params[f"bn{i}.weight"], step, 3).reshape(tasks * c)
        else:  # a shift-only norm's constant ones, shared by every task: (C,) -> (T*C,)
            gamma = _row(model.gamma(params, i), step, 2).repeat(tasks)
        beta = _row(params[f"bn{i}.bias"], step, 3).reshape(tasks * c)
        mean = var = None
        if running:  # shared by every task: (C,) -> (T*C,)
            rm, rv = model.running_stats(i)
            mean, var = _row(rm, step, 2).repeat(tasks), _row(rv, step, 2).repeat(tasks)
        h, s = conv_block(
            h,
            w.reshape(tasks * c, *w.shape[2:]),
            params[f"conv{i}.bias"].reshape(tasks * c),
            gamma=gamma,
            beta=beta,
            mean=mean,
            var=var,
            groups=tasks,
            **model.block_options(),
        )
        stats.append(s.view(2, tasks, c))
    if model.head_mean:  # (N, T*C) -> (T, N, C): each task's channel means
        feats = h.mean((2, 3)).reshape(n, tasks, c).transpose(0, 1)
    else:  # (N, T*C, h, w) -> (T, N, C*h*w): each task's features in Conv4's flatten order
        _, _, hh, ww = h.shape
        feats = h.reshape(n, tasks, c, hh, ww).transpose(0, 1).reshape(tasks, n, c * hh * ww)
    head_w, head_b = params["head.weight"], params["head.bias"]  # (T, ways, F), (T, ways)
    logits = torch.baddbmm(head_b.unsqueeze(1), feats, head_w.transpose(1, 2))
    return logits, torch.stack(stats).permute(2, 0, 1, 3)  # (T, N, ways), (T, blocks, 2, C)


def grads(model: Conv4, params: dict, wrt: list[str], x, y, step: int = 0, running=False):
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
