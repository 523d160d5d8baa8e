"""What every backbone shares: a functional network over a flat params dict.

`model(params, x, step, running)` returns (logits, stats): the trunk's features
go through a linear head. `stats` holds the batch's normalisation statistics in
whatever shape the backbone's `update_running_stats` folds in; learners only
stack them over inner steps and average them over tasks. Batch-norm affine
parameters are (C,), or (steps, C) with per-step weights (MAML++ BNWB);
running statistics (1, C) or (steps, C) (BNRS); `step` picks the row.
"""

import torch
import torch.nn.functional as F
from torch import nn

from metatrain.errors import MetatrainError

HEAD = ("head.weight", "head.bias")


def step_row(t: torch.Tensor, step: int) -> torch.Tensor:
    """Row `step` of per-step parameters or statistics (the last one past the end);
    a (C,) tensor is shared by every step and returned as is."""
    if t.dim() == 1:
        return t
    return t[min(step, t.shape[0] - 1)]


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self._dotted: dict[str, str] = {}  # nn.Module name -> dotted name
        self.norm_names: list[str] = []  # batch-norm affine parameters, by dotted name

    def register_parameter(self, name, param):
        # Dotted names keep the params dict flat and readable ("conv0.weight");
        # nn.Module forbids dots, so store under a dot-free alias.
        alias = name.replace(".", "_")
        if param is not None and hasattr(self, "_dotted"):
            self._dotted[alias] = name
        super().register_parameter(alias, param)

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(name.replace(".", "_"), tensor, persistent)

    def buffer(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "_"))

    def add_norm(
        self, name: str, channels: int, weight_steps: int, stat_steps: int, scale: bool = True
    ) -> None:
        """Batch norm `name`: weight/bias (C,) or (weight_steps, C), and running
        mean/var (stat_steps, C). Without `scale` the weight is a constant buffer of
        ones (a shift-only norm), not a parameter."""
        shape = (weight_steps, channels) if weight_steps else (channels,)
        if scale:
            self.register_parameter(f"{name}.weight", nn.Parameter(torch.ones(shape)))
        else:
            self.register_buffer(f"{name}.weight", torch.ones(shape))
        self.register_parameter(f"{name}.bias", nn.Parameter(torch.zeros(shape)))
        self.register_buffer(f"{name}.running_mean", torch.zeros(stat_steps, channels))
        self.register_buffer(f"{name}.running_var", torch.ones(stat_steps, channels))
        self.norm_names += [f"{name}.weight"] * scale + [f"{name}.bias"]

    def add_head(self, in_channels: int, image_size: int, ways: int) -> None:
        """The linear head, sized by running the trunk (built first) on a probe batch,
        in eval mode: the probe draws no random numbers (DropBlock), so the initial
        weights do not depend on training-only options."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x = torch.zeros(2, in_channels, image_size, image_size)
            features = self.trunk(self.params(), x, 0, False)[0].shape[1]
        self.train(was_training)
        head = torch.empty(ways, features)
        nn.init.xavier_uniform_(head)
        self.register_parameter("head.weight", nn.Parameter(head))
        self.register_parameter("head.bias", nn.Parameter(torch.zeros(ways)))

    def params(self) -> dict[str, nn.Parameter]:
        """The meta-learned parameters by dotted name, in a fixed order."""
        return {self._dotted[n]: p for n, p in self.named_parameters()}

    @property
    def stochastic(self) -> bool:
        """Whether a forward pass in the current mode draws random numbers."""
        return False

    @property
    def head_names(self) -> tuple[str, ...]:
        return HEAD

    def trunk(self, params, x, step: int, running: bool):
        """Features (N, features) and this batch's normalisation statistics."""
        raise NotImplementedError

    def head(self, params, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, params["head.weight"], params["head.bias"])

    def forward(self, params, x, step: int = 0, running: bool = False):
        """Logits (N, ways) and this batch's normalisation statistics."""
        h, stats = self.trunk(params, x, step, running)
        return self.head(params, h), stats

    def trunk_varies_with_step(self, running: bool) -> bool:
        """Whether trunk() depends on `step`: per-step affine parameters, or per-step
        running statistics when they are used."""
        per_step_w = any(self.params()[n].dim() == 2 for n in self.norm_names)
        per_step_stats = running and any(
            self.buffer(n.rsplit(".", 1)[0] + ".running_mean").shape[0] > 1 for n in self.norm_names
        )
        return per_step_w or per_step_stats

    def update_running_stats(self, stats: torch.Tensor) -> None:
        raise NotImplementedError

    @classmethod
    def from_config(
        cls, cfg, *, in_channels: int, ways: int, image_size: int, bn_weight_steps: int,
        bn_stat_steps: int,
    ) -> "Backbone":  # fmt: skip
        """The backbone for model config `cfg` on this data and these MAML++ switches."""
        if cfg.bn_eps <= 0:
            raise MetatrainError(f"model.bn_eps={cfg.bn_eps} must be positive (1e-5 is PyTorch's)")
        return cls(
            in_channels=in_channels,
            ways=ways,
            image_size=image_size,
            bn_weight_steps=bn_weight_steps,
            bn_stat_steps=bn_stat_steps,
            bn_momentum=cfg.bn_momentum,
            bn_eps=cfg.bn_eps,
            **cls.options(cfg),
        )

    @classmethod
    def options(cls, cfg) -> dict:
        """This backbone's own constructor arguments from its model config."""
        raise NotImplementedError
