"""ResNet-12, the backbone of most few-shot papers since TADAM and MetaOptNet.

Oreshkin, Rodriguez, Lacoste, "TADAM: Task dependent adaptive metric for improved
few-shot learning", NeurIPS 2018; Lee, Maji, Ravichandran, Soatto, "Meta-Learning
with Differentiable Convex Optimization" (MetaOptNet), CVPR 2019. Four residual
stages; each is three conv3x3 -> batch norm -> leaky ReLU (0.1) with the last
activation after the shortcut sum, a 1x1 conv -> batch norm shortcut, then a 2x2
max-pool. Widths 64-160-320-640 times `width`. DropBlock (Ghiasi, Lin, Le,
NeurIPS 2018) after the pooling of the last two stages, off by default. The head
is linear on the flattened features, as in conv4.

Called functionally like conv4, `model(params, x, step)`, with the same per-step
batch-norm rows (MAML++ BNWB, BNRS). Convolutions carry no bias: batch norm's
shift follows each. The statistics returned are every batch norm's (2, C)
concatenated along C, in `norm_names` order: (2, sum of C).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metatrain.config import BatchNormConfig
from metatrain.models.backbone import BatchNormBackbone, step_row
from metatrain.models.kernels import conv3x3
from metatrain.models.norm import EPS, batch_stats
from metatrain.registry import BACKBONES

WIDTHS = (64, 160, 320, 640)
SLOPE = 0.1  # leaky ReLU
DROPBLOCK_STAGES = (2, 3)


@dataclass
class ResNet12Config(BatchNormConfig):
    name: str = "resnet12"
    width: float = 1.0  # multiplies the stage widths 64-160-320-640
    dropblock: float = 0.0  # DropBlock drop probability in training; 0 turns it off
    dropblock_size: int = 5


def norm(y, gamma, beta, mean=None, var=None, eps: float = EPS):
    """Batch norm of y (N, C, H, W) with the batch's statistics, or the given ones.
    Returns the output and the batch's (2, C) statistics, detached."""
    batch_mean, batch_var = batch_stats(y)
    if mean is None:
        mean, var = batch_mean, batch_var
    scale = gamma * torch.rsqrt(var + eps)  # (C,)
    shift = torch.addcmul(beta, mean, scale, value=-1)  # beta - mean * scale
    out = torch.addcmul(shift.view(-1, 1, 1), y, scale.view(-1, 1, 1))
    return out, torch.stack([batch_mean, batch_var]).detach()


def drop_block(x: torch.Tensor, p: float, size: int) -> torch.Tensor:
    """DropBlock: zero size x size squares whose centres are drawn so that a fraction
    p of the units is dropped, and rescale the rest (Ghiasi et al. 2018, Alg. 1)."""
    h, w = x.shape[-2:]
    size = min(size, h, w)
    # Bernoulli rate of block centres, corrected for the valid centre region.
    gamma = p / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
    centres = (torch.rand_like(x) < gamma).to(x.dtype)  # (N, C, H, W)
    pad = size // 2
    blocks = F.max_pool2d(centres, size, stride=1, padding=pad)[..., :h, :w]
    keep = 1.0 - blocks
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


@BACKBONES.register("resnet12", ResNet12Config)
class ResNet12(BatchNormBackbone):
    def __init__(
        self,
        in_channels: int,
        ways: int,
        image_size: int,
        *,
        width: float = 1.0,
        dropblock: float = 0.0,
        dropblock_size: int = 5,
        bn_weight_steps: int = 0,
        bn_stat_steps: int = 1,
        bn_momentum: float = 0.1,
        bn_eps: float = EPS,
    ):
        super().__init__()
        self.widths = [max(1, round(c * width)) for c in WIDTHS]
        self.dropblock, self.dropblock_size = dropblock, dropblock_size
        self.bn_momentum, self.bn_eps = bn_momentum, bn_eps
        c = in_channels
        for s, out in enumerate(self.widths):
            for j, (cin, k) in enumerate([(c, 3), (out, 3), (out, 3), (c, 1)]):
                name = f"stage{s}.conv{j}" if j < 3 else f"stage{s}.shortcut"
                w = torch.empty(out, cin, k, k)
                nn.init.kaiming_normal_(w, a=SLOPE, mode="fan_out", nonlinearity="leaky_relu")
                self.register_parameter(f"{name}.weight", nn.Parameter(w))
                self.add_norm(f"{name}.bn", out, bn_weight_steps, bn_stat_steps)
            c = out
        self.add_head(in_channels, image_size, ways)

    @classmethod
    def options(cls, cfg) -> dict:
        return {
            "width": cfg.width,
            "dropblock": cfg.dropblock,
            "dropblock_size": cfg.dropblock_size,
        }

    @property
    def stochastic(self) -> bool:
        return self.dropblock > 0 and self.training

    def _norm(self, params, name, y, step, running):
        gamma = step_row(params[f"{name}.bn.weight"], step)
        beta = step_row(params[f"{name}.bn.bias"], step)
        mean = var = None
        if running:
            mean = step_row(self.buffer(f"{name}.bn.running_mean"), step)
            var = step_row(self.buffer(f"{name}.bn.running_var"), step)
        return norm(y, gamma, beta, mean, var, self.bn_eps)

    def trunk(self, params, x, step: int, running: bool):
        stats = []

        def conv_bn(name, h, k):
            w = params[f"{name}.weight"]
            y = conv3x3(h, w, None) if k == 3 else F.conv2d(h, w)
            y, s = self._norm(params, name, y, step, running)
            stats.append(s)
            return y

        for s in range(len(self.widths)):
            h = F.leaky_relu(conv_bn(f"stage{s}.conv0", x, 3), SLOPE)
            h = F.leaky_relu(conv_bn(f"stage{s}.conv1", h, 3), SLOPE)
            h = conv_bn(f"stage{s}.conv2", h, 3)
            h = F.leaky_relu(h + conv_bn(f"stage{s}.shortcut", x, 1), SLOPE)
            x = F.max_pool2d(h, 2)  # (N, C, H/2, W/2)
            if self.stochastic and s in DROPBLOCK_STAGES:
                x = drop_block(x, self.dropblock, self.dropblock_size)
        return x.flatten(1), torch.cat(stats, dim=1)  # (N, features), (2, sum of C)

    def update_running_stats(self, stats: torch.Tensor) -> None:
        """Fold batch statistics (steps, 2, sum of C) into the running averages."""
        start = 0
        for name in self.norm_names[::2]:  # "<layer>.bn.weight"
            layer = name.rsplit(".", 1)[0]
            c = self.buffer(f"{layer}.running_mean").shape[1]
            self.fold_running(layer, stats[:, :, start : start + c])  # (steps, 2, C)
            start += c
