"""Conv4's block with group norm in place of batch norm: conv3x3 -> group norm ->
activation -> 2x2 max-pool.

Wu, He. "Group Normalization", ECCV 2018: each example's channels are split into G
groups of C/G, each normalised by its own mean and variance over (C/G, H, W), then a
per-channel affine map. No statistic crosses examples, so there are no running
statistics, support and query sets are normalised alike at test, and the batched
backends need nothing special: under channel groups (tasks stacked as channel
groups, models/task_groups.py) a group never straddles two tasks when each task's C
channels hold G whole groups, so one group_norm of T*G groups over T*C channels is
every task's own. F.group_norm is exact under torch.func transforms to second order
(DESIGN.md, decision 3).
"""

import torch
import torch.nn.functional as F

from metatrain.models.kernels import conv3x3


def check_groups(channels: int, groups: int) -> str | None:
    """Why `groups` cannot split `channels` channels, or None."""
    if groups < 1 or channels % groups:
        return f"model.norm_groups={groups} must be at least 1 and divide model.filters={channels}"
    return None


def gn_block(
    x, w, b, *, gamma, beta, norm_groups: int, stride: int = 1, pool: bool = True,
    groups: int = 1, slope: float = 0.0, eps: float = 1e-5, ceil: bool = False,
    same: bool = False,
) -> torch.Tensor:  # fmt: skip
    """conv3x3 (`groups` convolution groups: tasks) -> group norm of `norm_groups`
    groups over all channels, affine gamma/beta (C,) -> ReLU, or leaky ReLU of slope
    `slope` -> 2x2 max-pool if `pool` (`ceil`: an odd edge pooled on its own)."""
    y = conv3x3(x, w, b, stride=stride, groups=groups, same=same)  # (N, C, H, W)
    y = F.group_norm(y, norm_groups, gamma, beta, eps)
    y = y.relu() if slope == 0.0 else F.leaky_relu(y, slope)
    return F.max_pool2d(y, 2, ceil_mode=ceil) if pool else y
