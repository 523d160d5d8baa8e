"""What every backbone shares: a functional network over a flat params dict.

`model(params, x, step, running)` returns (logits, stats): the trunk's features
go through a linear head. `stats` holds the batch's normalisation statistics in
whatever shape the backbone's `update_running_stats` folds in (an empty tensor
where it keeps none); learners only stack them over inner steps and average them
over tasks.

Normalisation is the backbone's own choice. A batch-norm backbone
(BatchNormBackbone) takes the learner's rows of per-step tensors: affine
parameters (C,), or (steps, C) with per-step weights (MAML++ BNWB); running
statistics (1, C) or (steps, C) (BNRS); `step` picks the row. A backbone without
batch norm takes none of that and its running-statistics update does nothing.
Fast paths declare what runs on them: `channel_groups` (models/task_groups.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from metatrain.config import BatchNormConfig
from metatrain.errors import MetatrainError
from metatrain.naming import bn_eval_mode

HEAD = ("head.weight", "head.bias")


def step_row(t: torch.Tensor, step: int) -> torch.Tensor:
    """Row `step` of per-step parameters or statistics (the last one past the end);
    a (C,) tensor is shared by every step and returned as is."""
    if t.dim() == 1:
        return t
    return t[min(step, t.shape[0] - 1)]


class Backbone(nn.Module):
    # Whether grouped_trunk runs T tasks' networks as channel groups of one network
    # (models/task_groups.py) with this backbone's maths. A subclass that redefines
    # trunk or head has not said so of its own maths: it is False there unless its
    # class sets it again.
    channel_groups: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        redefined = "trunk" in cls.__dict__ or "head" in cls.__dict__
        if redefined and "channel_groups" not in cls.__dict__:
            cls.channel_groups = False

    def __init__(self):
        super().__init__()
        self._dotted: dict[str, str] = {}  # nn.Module name -> dotted name
        self.norm_names: list[str] = []  # batch-norm affine parameters, by dotted name

    @staticmethod
    def state_name(name: str) -> str:
        """The state-dict key of the tensor with dotted name `name` ("head.weight" ->
        "head_weight"): dotted names keep the params dict flat and readable, and
        nn.Module forbids dots, so tensors are stored under a dot-free alias."""
        return name.replace(".", "_")

    def register_parameter(self, name, param):
        alias = self.state_name(name)
        if param is not None and hasattr(self, "_dotted"):
            self._dotted[alias] = name
        super().register_parameter(alias, param)

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(self.state_name(name), tensor, persistent)

    def buffer(self, name: str) -> torch.Tensor:
        return getattr(self, self.state_name(name))

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
        """Whether trunk() depends on `step` (per-step normalisation tensors)."""
        return False

    def grouped_trunk(self, params: dict, x: torch.Tensor, step: int, running: bool):
        """T tasks' trunks as channel groups: features (T, N, features) and statistics
        (T, ...) of params {name: (T, *shape)} on x (T, N, C, H, W); only where
        `channel_groups` is declared."""
        raise NotImplementedError(f"{type(self).__name__} declares no channel-groups pass")

    def update_running_stats(self, stats: torch.Tensor) -> None:
        """Fold a meta-step's statistics into running averages; nothing to fold here."""

    @classmethod
    def from_config(
        cls, cfg, *, in_channels: int, ways: int, image_size: int, bn_weight_steps: int = 0,
        bn_stat_steps: int = 1,
    ) -> "Backbone":  # fmt: skip
        """The backbone for model config `cfg` on this data; `bn_*`: the rows of per-step
        normalisation tensors the learner asks for (MAML++ BNWB, BNRS), which only a
        backbone that normalises per step takes (norm_options)."""
        return cls(
            in_channels=in_channels,
            ways=ways,
            image_size=image_size,
            **cls.norm_options(cfg, bn_weight_steps, bn_stat_steps),
            **cls.options(cfg),
        )

    @classmethod
    def norm_options(cls, cfg, weight_steps: int, stat_steps: int) -> dict:
        """The constructor arguments of this backbone's normalisation: none here."""
        return {}

    @classmethod
    def options(cls, cfg) -> dict:
        """This backbone's own constructor arguments from its model config."""
        raise NotImplementedError

    @classmethod
    def inert_settings(cls, cfg) -> list[str]:
        """One line for each model setting of `cfg` that is on but cannot change the run
        (metatrain/inert.py)."""
        return []


class BatchNormBackbone(Backbone):
    """A backbone normalised by batch norm (models/norm.py), with MAML++'s per-step
    rows: its schema extends config.BatchNormConfig (bn_momentum, bn_eps)."""

    @classmethod
    def norm_options(cls, cfg, weight_steps: int, stat_steps: int) -> dict:
        if cfg.bn_eps <= 0:
            raise MetatrainError(f"model.bn_eps={cfg.bn_eps} must be positive (1e-5 is PyTorch's)")
        return {
            "bn_weight_steps": weight_steps,
            "bn_stat_steps": stat_steps,
            "bn_momentum": cfg.bn_momentum,
            "bn_eps": cfg.bn_eps,
        }

    @classmethod
    def inert_settings(cls, cfg) -> list[str]:
        mode = bn_eval_mode(cfg.model.bn_eval)
        if mode != "running" and cfg.model.bn_momentum != BatchNormConfig.bn_momentum:
            line = (
                "model.bn_momentum changes nothing: evaluation normalises with batch "
                f"statistics (model.bn_eval={mode}), never the running ones"
            )
            return [line]
        return []

    def add_norm(
        self, name: str, channels: int, weight_steps: int, stat_steps: int, scale: bool = True
    ) -> None:
        """Batch norm `name`: weight/bias (C,) or (weight_steps, C), and running
        mean/var (stat_steps, C). Without `scale` the weight is a constant buffer of
        ones (a shift-only norm), not a parameter."""
        self.add_affine(name, channels, weight_steps, scale)
        self.register_buffer(f"{name}.running_mean", torch.zeros(stat_steps, channels))
        self.register_buffer(f"{name}.running_var", torch.ones(stat_steps, channels))

    def add_affine(self, name: str, channels: int, weight_steps: int, scale: bool) -> None:
        """A norm's affine parameters `name`.weight/bias, (C,) or (weight_steps, C), with
        no running statistics (group norm has none); without `scale` the weight is a
        constant buffer of ones."""
        shape = (weight_steps, channels) if weight_steps else (channels,)
        if scale:
            self.register_parameter(f"{name}.weight", nn.Parameter(torch.ones(shape)))
        else:
            self.register_buffer(f"{name}.weight", torch.ones(shape))
        self.register_parameter(f"{name}.bias", nn.Parameter(torch.zeros(shape)))
        self.norm_names += [f"{name}.weight"] * scale + [f"{name}.bias"]

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

    @torch.no_grad()
    def fold_running(self, layer: str, s: torch.Tensor) -> None:
        """Fold batch norm `layer`'s batch statistics s (steps, 2, C) into its running
        averages (momentum bn_momentum): the steps averaged into one row, or with one
        row per step (BNRS) each row following its own step."""
        rm, rv = self.buffer(f"{layer}.running_mean"), self.buffer(f"{layer}.running_var")
        if rm.shape[0] == 1:
            s = s.mean(0, keepdim=True)
        n = min(rm.shape[0], s.shape[0])
        rm[:n].lerp_(s[:n, 0], self.bn_momentum)
        rv[:n].lerp_(s[:n, 1], self.bn_momentum)
