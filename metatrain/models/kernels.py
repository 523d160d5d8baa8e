"""Kernels shared by the backbones and the fast paths: a channels-last layout, a 3x3
convolution with a hand-written double backward, and the fused conv -> batch norm ->
activation -> max-pool block. Conv4 (models/conv4.py), ResNet-12 (models/resnet12.py),
the task-groups backend (models/task_groups.py) and MAML (algorithms/maml.py) use them.
"""

import torch
import torch.nn.functional as F

from metatrain.models.norm import EPS, batch_stats, under_transform


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x (..., C, H, W) with the same values, stored so that every (N, C, H, W)
    slice is NHWC. The network keeps the layout of its input: convolutions,
    statistics and pooling all run NHWC, which oneDNN does 1.3-20x faster on CPU."""
    if x.shape[-3] == 1:
        # One channel: NCHW and NHWC are the same bytes, and .contiguous() keeps the
        # NCHW strides, from which oneDNN picks NCHW for the whole network. Strides
        # with C innermost say NHWC.
        x = x.contiguous()
        strides = list(x.stride())
        strides[-3] = 1
        return x.as_strided(x.shape, strides)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.movedim(-3, -1).contiguous().movedim(-1, -3)  # (..., H, W, C) in memory


def _conv_backward(gy, x, w, *, stride: int, mask: list[bool], groups: int = 1, padding=(1, 1)):
    """(grad x, grad w, grad b) of conv2d(x, w, b, stride, padding, groups=groups) for
    output grad gy, from the backend's own backward kernels; `mask` picks which are
    computed."""
    pad = list(padding)  # (rows, columns)
    return torch.ops.aten.convolution_backward(
        gy, x, w, [w.shape[0]], [stride, stride], pad, [1, 1], False, [0, 0], groups, mask
    )


class Conv3x3(torch.autograd.Function):
    """conv2d(x, w, b, stride, padding=1) with a hand-written double backward.

    Second-order MAML differentiates the convolutions' backward pass. PyTorch's
    generic formula computes the weight term of that as a convolution with an
    (H, W)-sized kernel, which oneDNN runs at a fraction of its speed; written out,
    every term is a plain convolution forward, backward-data or backward-weights
    (ConvGrad.backward), and the conv part of the double backward takes half the
    time (measured, 64 filters on 14x14). Same values, any device, vmap-able.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, stride, groups, padding):
        return F.conv2d(x, w, b, stride, padding, 1, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, stride, groups, padding = inputs
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.groups, ctx.padding = stride, groups, padding

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = ConvGrad.apply(gy, x, w, ctx.stride, need_x, ctx.groups, ctx.padding)
        return gx, gw if need_w else None, gb if need_b else None, None, None, None


class ConvGrad(torch.autograd.Function):
    """(gx, gw, gb) = the backward of Conv3x3 at (x, w) for output grad gy; gx is
    None unless need_x (the network's input needs no gradient). Grouped convolutions
    (tasks as channel groups) keep every formula below, group by group."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gy, x, w, stride, need_x, groups, padding):
        mask = [need_x, True, True]
        return _conv_backward(gy, x, w, stride=stride, mask=mask, groups=groups, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        gy, x, w, stride, need_x, groups, padding = inputs
        ctx.save_for_backward(gy, x, w)
        ctx.stride, ctx.need_x, ctx.groups, ctx.padding = stride, need_x, groups, padding

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        # gx = conv_transpose(gy, w), gw = corr(x, gy), gb = sum(gy): all linear in gy;
        # gx is linear in w and gw in x. Their adjoints, for upstream (ggx, ggw, ggb):
        #   d/dgy = conv(ggx, w) + conv(x, ggw) + ggb
        #   d/dx  = backward-data of a conv with weight ggw, at gy
        #   d/dw  = backward-weights of a conv with input ggx, at gy
        gy, x, w = ctx.saved_tensors
        s, g, p = ctx.stride, ctx.groups, ctx.padding
        use_gx = ctx.need_x and ggx is not None
        d_gy = F.conv2d(x, ggw, ggb, s, p, 1, g)
        if use_gx:
            d_gy = d_gy + F.conv2d(ggx, w, None, s, p, 1, g)
        d_x = d_w = None
        if ctx.needs_input_grad[1]:
            d_x = _conv_backward(
                gy, x, ggw, stride=s, mask=[True, False, False], groups=g, padding=p
            )
            d_x = d_x[0]
        if ctx.needs_input_grad[2] and use_gx:
            d_w = _conv_backward(
                gy, ggx, w, stride=s, mask=[False, True, False], groups=g, padding=p
            )
            d_w = d_w[1]
        return d_gy, d_x, d_w, None, None, None, None


def conv3x3(x, w, b, *, stride: int = 1, groups: int = 1, same: bool = False):
    """conv2d(x, w, b, stride, padding=1, groups=groups): Conv3x3, except under torch.func transforms
    (vmap runs convolution_backward of batched weights 3x slower than its own
    batched conv rules; measured), under autocast (whose casts it would repeat) and
    in torch.compile'd code (which derives its own backward, for first order only).

    `same` pads as TensorFlow's 'SAME': where a stride-2 convolution meets an even
    size, TF pads one row and column at the bottom and right only, so the windows
    start at 0, 2, 4, ... (PyTorch's symmetric padding starts them at -1, 1, ...);
    everywhere else the two paddings agree."""
    padding = (1, 1)  # (rows, columns)
    if same and stride == 2:
        even_h, even_w = x.shape[-2] % 2 == 0, x.shape[-1] % 2 == 0
        if even_h or even_w:
            # (..., H+1, W+1) where even: the bottom/right zeros of 'SAME', no top/left
            x = F.pad(x, (0, int(even_w), 0, int(even_h)))
            padding = (1 - int(even_h), 1 - int(even_w))
    if (
        torch.compiler.is_compiling()
        or torch.is_autocast_enabled(x.device.type)
        or under_transform(w)
    ):
        return F.conv2d(x, w, b, stride, padding, 1, groups)
    return Conv3x3.apply(x, w, b, stride, groups, padding)


def _flip_needed(gamma: torch.Tensor) -> bool:
    """Whether some channel's gamma may be negative. Read from memory for a plain CPU
    tensor (no device sync there); assumed under torch.func transforms, where
    control flow cannot depend on values, on GPUs, where reading would sync, and
    while compiling."""
    if torch.compiler.is_compiling() or gamma.device.type != "cpu" or under_transform(gamma):
        return True
    return bool((gamma < 0).any())


def conv_block(
    x,
    w,
    b,
    *,
    gamma,
    beta,
    mean=None,
    var=None,
    stride: int = 1,
    pool: bool = True,
    groups: int = 1,
    slope: float = 0.0,
    eps: float = EPS,
    ceil: bool = False,
    same: bool = False,
):
    """conv3x3 -> batch norm (eps `eps`) -> ReLU, or leaky ReLU of negative-side slope
    `slope` > 0 -> 2x2 max-pool (if `pool`; `ceil` pools an odd edge on its own, as
    TF's 'same' padding): the value of batch_norm() followed by the activation and
    F.max_pool2d, with fewer full-size passes.

    Batch norm is an increasing per-channel affine map where gamma >= 0, so it
    commutes with max-pooling; where gamma < 0 it is decreasing, and flipping the
    sign of that channel's filter (sign * conv(x) = conv(x, sign * w)) makes it
    increasing again. ReLU and leaky ReLU (slope >= 0) are increasing and commute
    with max too, over full windows and over ceil mode's partial edge windows alike.
    So the pooling runs first, on the conv output, and the affine map and the
    activation on a quarter of the elements. The gradients agree wherever
    max-pooling's is defined (no ties in a window).
    Returns the output and the batch's (2, C) statistics of the unflipped conv.
    With `groups` > 1 (tasks stacked as channel groups, models/task_groups.py) every
    per-channel step above is already per task.
    """
    sign = None
    if pool and _flip_needed(gamma):
        sign = torch.where(gamma >= 0, 1.0, -1.0).to(gamma.dtype).detach()  # (C,)
        w, b, gamma = w * sign.view(-1, 1, 1, 1), b * sign, gamma * sign
        if mean is not None:
            mean = mean * sign
    y = conv3x3(
        x, w, b, stride=stride, groups=groups, same=same
    )  # (N, C, H, W), times sign if flipped
    batch_mean, batch_var = batch_stats(y)
    if mean is None:
        mean, var = batch_mean, batch_var
    scale = gamma * torch.rsqrt(var + eps)  # (C,); > 0 where pooling follows
    shift = torch.addcmul(beta, mean, scale, value=-1)  # beta - mean * scale
    if pool:
        y = F.max_pool2d(y, 2, ceil_mode=ceil)  # (N, C, H/2, W/2), rounded down or up
    out = torch.addcmul(shift.view(-1, 1, 1), y, scale.view(-1, 1, 1))
    out = out.relu() if slope == 0.0 else F.leaky_relu(out, slope)
    if sign is not None:
        batch_mean = batch_mean * sign
    return out, torch.stack([batch_mean, batch_var]).detach()
