"""The four-block convolutional backbone shared by MAML, Reptile and MAML++.

Each block: conv3x3 (stride 1 then 2x2 max-pool, or stride 2 as in MAML's
Omniglot net), batch norm, ReLU or leaky ReLU (MAML++'s authors' code: slope 0.01).
The pooling drops an odd edge row/column (PyTorch's floor) or, as TF's 'same'
padding in Reptile's authors' code, pools it on its own. The network is called functionally,
`model(params, x, step)`, with the parameters in a dict, so inner loops can
run on adapted copies. Batch-norm affine parameters are (C,) or, with per-step
weights (MAML++ BNWB), (steps, C); running statistics are (1, C) or, with
per-step statistics (MAML++ BNRS), (steps, C). `step` picks the row.
"""

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from metatrain.config import BatchNormConfig
from metatrain.errors import MetatrainError
from metatrain.models.backbone import BatchNormBackbone, step_row
from metatrain.models.group_norm import check_groups, gn_block
from metatrain.models.kernels import conv_block
from metatrain.models.norm import EPS
from metatrain.models.task_groups import to_groups
from metatrain.naming import bn_eval_mode
from metatrain.registry import BACKBONES

BLOCKS = 4


class Downsample(Enum):
    pool = "pool"  # 2x2 max-pool after each block (MAML++, Reptile, MiniImageNet)
    stride = "stride"  # stride-2 convolutions (MAML's Omniglot network)


class Activation(Enum):
    relu = "relu"
    leaky_relu = "leaky_relu"  # slope model.activation_slope below zero (MAML++'s code)


class ConvPadding(Enum):
    symmetric = "symmetric"  # one zero row/column on every side (PyTorch's padding=1)
    same = "same"  # TF's 'SAME': stride-2 convolutions on even sizes pad bottom/right only


class HeadInput(Enum):
    flatten = "flatten"  # the last feature map flattened (C * h * w features)
    mean = "mean"  # its spatial mean, C features (MAML's Omniglot network)


class HeadInit(Enum):
    xavier = "xavier"  # Glorot uniform
    normal = "normal"  # standard normal entries (MAML's Omniglot head, tf.random_normal)


class Norm(Enum):
    batch = "batch"  # batch norm (models/norm.py): the published Conv4s
    group = "group"  # group norm (Wu & He 2018; models/group_norm.py): no batch statistics


class PoolPadding(Enum):
    # TF's names. 84 -> 42 -> 21 -> 10 -> 5 (valid) or -> 11 -> 6 (same).
    valid = "valid"  # an odd edge row/column is dropped (PyTorch's default)
    same = "same"  # an odd edge row/column is pooled on its own (Reptile's TF code)


@dataclass
class Conv4Config(BatchNormConfig):
    name: str = "conv4"
    filters: int = 64
    downsample: Downsample = Downsample.pool
    activation: Activation = Activation.relu
    activation_slope: float = 0.01  # leaky_relu's slope for negative inputs; relu ignores it
    pool_padding: PoolPadding = PoolPadding.valid  # read under downsample=pool only
    conv_padding: ConvPadding = ConvPadding.symmetric  # differs only for stride-2 convs
    # Batch norm with a learned scale gamma, or shift only (TF's tf.contrib batch_norm
    # default, MAML's code): then gamma is the constant 1
    bn_scale: bool = True
    head_input: HeadInput = HeadInput.flatten
    head_init: HeadInit = HeadInit.xavier
    # Group norm instead (model.norm=group): norm_groups groups of filters/norm_groups
    # channels, 32 as Wu & He's default (2 channels each at 64 filters); its eps is
    # bn_eps, its scale follows bn_scale, and per-step weights (BNWB) apply as to batch
    # norm; bn_eval, bn_momentum and running statistics have nothing to act on.
    norm: Norm = Norm.batch
    norm_groups: int = 32


@BACKBONES.register("conv4", Conv4Config)
class Conv4(BatchNormBackbone):
    channel_groups = True  # grouped_trunk below is trunk's maths for T tasks at once

    def __init__(
        self,
        in_channels: int,
        ways: int,
        image_size: int,
        filters: int = 64,
        *,
        downsample: str = "pool",
        leaky_slope: float = 0.0,
        pool_padding: str = "valid",
        conv_padding: str = "symmetric",
        bn_scale: bool = True,
        head_input: str = "flatten",
        head_init: str = "xavier",
        bn_weight_steps: int = 0,
        bn_stat_steps: int = 1,
        bn_momentum: float = 0.1,
        bn_eps: float = EPS,
        norm: str = "batch",
        norm_groups: int = 32,
    ):
        """bn_weight_steps = 0 gives shared (C,) affine parameters; n > 0 gives (n, C).
        leaky_slope = 0 is ReLU; s > 0 a leaky ReLU of slope s below zero."""
        super().__init__()
        if leaky_slope < 0:
            # A negative slope is not increasing: it would not commute with max-pooling.
            raise MetatrainError(
                f"model.activation_slope={leaky_slope} must be at least 0 (0 is ReLU)"
            )
        self.downsample = downsample
        self.leaky_slope, self.pool_ceil = float(leaky_slope), pool_padding == "same"
        self.bn_momentum, self.bn_eps = bn_momentum, bn_eps
        self.conv_same, self.head_mean = conv_padding == "same", head_input == "mean"
        self.group_norm, self.norm_groups = norm == "group", norm_groups
        if self.group_norm and (why := check_groups(filters, norm_groups)):
            raise MetatrainError(why)
        c = in_channels
        for i in range(BLOCKS):
            w = torch.empty(filters, c, 3, 3)
            nn.init.xavier_uniform_(w)
            self.register_parameter(f"conv{i}.weight", nn.Parameter(w))
            self.register_parameter(f"conv{i}.bias", nn.Parameter(torch.zeros(filters)))
            if self.group_norm:
                self.add_affine(f"gn{i}", filters, bn_weight_steps, bn_scale)
            else:
                self.add_norm(f"bn{i}", filters, bn_weight_steps, bn_stat_steps, bn_scale)
            c = filters
        self.add_head(in_channels, image_size, ways)
        if head_init == "normal":
            with torch.no_grad():
                self.params()["head.weight"].normal_()

    @classmethod
    def options(cls, cfg) -> dict:
        leaky = cfg.activation == Activation.leaky_relu
        return {
            "filters": cfg.filters,
            "downsample": cfg.downsample.value,
            "leaky_slope": cfg.activation_slope if leaky else 0.0,
            "pool_padding": cfg.pool_padding.value,
            "conv_padding": cfg.conv_padding.value,
            "bn_scale": cfg.bn_scale,
            "head_input": cfg.head_input.value,
            "head_init": cfg.head_init.value,
            "norm": cfg.norm.value,
            "norm_groups": cfg.norm_groups,
        }

    @classmethod
    def inert_settings(cls, cfg) -> list[str]:
        m = cfg.model
        if m.norm.value == "group":
            lines = [
                f"model.{k} changes nothing under model.norm=group: group norm keeps no "
                "batch or running statistics"
                for k, changed in (
                    ("bn_eval", bn_eval_mode(m.bn_eval) != "transductive"),
                    ("bn_momentum", m.bn_momentum != Conv4Config.bn_momentum),
                )
                if changed
            ]
        else:
            lines = super().inert_settings(cfg)
            if m.norm_groups != Conv4Config.norm_groups:
                lines.append("model.norm_groups changes nothing with model.norm=batch")
        if m.activation.value == "relu" and m.activation_slope != Conv4Config.activation_slope:
            lines.append(
                "model.activation_slope changes nothing with model.activation=relu "
                "(set model.activation=leaky_relu)"
            )
        if m.pool_padding.value == "same" and m.downsample.value == "stride":
            lines.append("model.pool_padding=same changes nothing with model.downsample=stride")
        return lines

    def block_options(self) -> dict:
        """conv_block's keyword arguments that every block of this network shares."""
        return {
            "stride": 2 if self.downsample == "stride" else 1,
            "pool": self.downsample == "pool",
            "slope": self.leaky_slope,
            "eps": self.bn_eps,
            "ceil": self.pool_ceil,
            "same": self.conv_same,
        }

    def norm_name(self, i: int) -> str:
        return f"gn{i}" if self.group_norm else f"bn{i}"

    def trunk_varies_with_step(self, running: bool) -> bool:
        if self.group_norm:  # per-step affine parameters only: no statistics to index
            return any(self.params()[n].dim() == 2 for n in self.norm_names)
        return super().trunk_varies_with_step(running)

    def gamma(self, params: dict, i: int) -> torch.Tensor:
        """Block i's norm scale: learned, or the constant ones of a shift-only norm."""
        name = f"{self.norm_name(i)}.weight"
        return params[name] if name in params else self.buffer(name)

    def running_stats(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffer(f"bn{i}.running_mean"), self.buffer(f"bn{i}.running_var")

    def _gn_options(self) -> dict:
        """gn_block's keyword arguments: conv_block's, with group norm's groups."""
        options = self.block_options()
        options["norm_groups"] = self.norm_groups
        return options

    def trunk(self, params, x, step: int, running: bool):
        if self.group_norm:  # no batch statistics: `running` has nothing to read
            for i in range(BLOCKS):
                x = gn_block(
                    x, params[f"conv{i}.weight"], params[f"conv{i}.bias"],
                    gamma=step_row(self.gamma(params, i), step),
                    beta=step_row(params[f"gn{i}.bias"], step), **self._gn_options(),
                )  # fmt: skip
            h = x.mean((2, 3)) if self.head_mean else x.flatten(1)  # (N, features)
            return h, x.new_zeros(0)
        stats = []
        for i in range(BLOCKS):
            # per-step affine parameters and statistics: (steps, C) -> (C,)
            w, b = step_row(self.gamma(params, i), step), step_row(params[f"bn{i}.bias"], step)
            mean = var = None
            if running:
                rm, rv = self.running_stats(i)
                mean, var = step_row(rm, step), step_row(rv, step)
            x, s = conv_block(
                x,
                params[f"conv{i}.weight"],
                params[f"conv{i}.bias"],
                gamma=w,
                beta=b,
                mean=mean,
                var=var,
                **self.block_options(),
            )
            stats.append(s)
        h = x.mean((2, 3)) if self.head_mean else x.flatten(1)  # (N, features)
        return h, torch.stack(stats)  # (N, features), (blocks, 2, C)

    def grouped_trunk(self, params: dict, x: torch.Tensor, step: int = 0, running: bool = False):
        """Features (T, N, features) and batch statistics (T, blocks, 2, C) of T tasks'
        networks `params` {name: (T, *shape)} on x (T, N, C, H, W): per task, the value
        of trunk(params[t], x[t], step, running), as one network of T channel groups
        (models/task_groups.py)."""
        tasks, n = x.shape[:2]
        h = to_groups(x)
        stats = []
        for i in range(BLOCKS):
            w = params[f"conv{i}.weight"]  # (T, C_out, C_in, 3, 3)
            c = w.shape[1]
            norm = self.norm_name(i)
            if f"{norm}.weight" in params:
                gamma = _task_row(params[f"{norm}.weight"], step, 3).reshape(tasks * c)
            else:  # a shift-only norm's constant ones, shared by every task: (C,) -> (T*C,)
                gamma = _task_row(self.gamma(params, i), step, 2).repeat(tasks)
            beta = _task_row(params[f"{norm}.bias"], step, 3).reshape(tasks * c)
            if self.group_norm:  # each task's G groups: T*G groups over T*C channels
                options = {**self._gn_options(), "norm_groups": tasks * self.norm_groups}
                h = gn_block(
                    h, w.reshape(tasks * c, *w.shape[2:]),
                    params[f"conv{i}.bias"].reshape(tasks * c),
                    gamma=gamma, beta=beta, groups=tasks, **options,
                )  # fmt: skip
                continue
            mean = var = None
            if running:  # shared by every task: (C,) -> (T*C,)
                rm, rv = self.running_stats(i)
                mean, var = (
                    _task_row(rm, step, 2).repeat(tasks),
                    _task_row(rv, step, 2).repeat(tasks),
                )
            h, s = conv_block(
                h,
                w.reshape(tasks * c, *w.shape[2:]),
                params[f"conv{i}.bias"].reshape(tasks * c),
                gamma=gamma,
                beta=beta,
                mean=mean,
                var=var,
                groups=tasks,
                **self.block_options(),
            )
            stats.append(s.view(2, tasks, c))
        stats = torch.stack(stats).permute(2, 0, 1, 3) if stats else h.new_zeros(tasks, 0)
        if self.head_mean:  # (N, T*C) -> (T, N, C): each task's channel means
            feats = h.mean((2, 3)).reshape(n, tasks, c).transpose(0, 1)
        else:  # (N, T*C, h, w) -> (T, N, C*h*w): each task's features in trunk's flatten order
            _, _, hh, ww = h.shape
            feats = h.reshape(n, tasks, c, hh, ww).transpose(0, 1).reshape(tasks, n, c * hh * ww)
        return feats, stats  # (T, N, F), (T, blocks, 2, C) or (T, 0) under group norm

    def update_running_stats(self, stats: torch.Tensor) -> None:
        """Fold batch statistics (steps, blocks, 2, C) into the running averages."""
        if self.group_norm:
            return  # none kept
        for i in range(BLOCKS):
            self.fold_running(f"bn{i}", stats[:, i])  # (steps, 2, C)


def _task_row(p: torch.Tensor, step: int, per_step_dim: int) -> torch.Tensor:
    """The step's row of a per-step tensor (dim() == per_step_dim), else p itself."""
    if p.dim() == per_step_dim:
        return p.select(per_step_dim - 2, min(step, p.shape[per_step_dim - 2] - 1))
    return p
