"""The four-block convolutional backbone shared by MAML, Reptile and MAML++.

Each block: conv3x3 (stride 1 then 2x2 max-pool, or stride 2 as in MAML's
Omniglot net), batch norm, ReLU. The network is called functionally,
`model(params, x, step)`, with the parameters in a dict, so inner loops can
run on adapted copies. Batch-norm affine parameters are (C,) or, with per-step
weights (MAML++ BNWB), (steps, C); running statistics are (1, C) or, with
per-step statistics (MAML++ BNRS), (steps, C). `step` picks the row.
"""

import torch
import torch.nn.functional as F
from torch import nn

from metatrain.models.norm import batch_norm

BLOCKS = 4


class Conv4(nn.Module):
    def __init__(
        self,
        in_channels: int,
        ways: int,
        image_size: int,
        filters: int = 64,
        downsample: str = "pool",
        bn_weight_steps: int = 0,
        bn_stat_steps: int = 1,
        bn_momentum: float = 0.1,
    ):
        """bn_weight_steps = 0 gives shared (C,) affine parameters; n > 0 gives (n, C)."""
        super().__init__()
        self.downsample = downsample
        self.bn_momentum = bn_momentum
        self.bn_weight_shape = (bn_weight_steps, filters) if bn_weight_steps else (filters,)
        c = in_channels
        for i in range(BLOCKS):
            w = torch.empty(filters, c, 3, 3)
            nn.init.xavier_uniform_(w)
            self.register_parameter(f"conv{i}.weight", nn.Parameter(w))
            self.register_parameter(f"conv{i}.bias", nn.Parameter(torch.zeros(filters)))
            self.register_parameter(f"bn{i}.weight", nn.Parameter(torch.ones(self.bn_weight_shape)))
            self.register_parameter(f"bn{i}.bias", nn.Parameter(torch.zeros(self.bn_weight_shape)))
            self.register_buffer(f"bn{i}.running_mean", torch.zeros(bn_stat_steps, filters))
            self.register_buffer(f"bn{i}.running_var", torch.ones(bn_stat_steps, filters))
            c = filters
        features = self._features(in_channels, image_size)
        head = torch.empty(ways, features)
        nn.init.xavier_uniform_(head)
        self.register_parameter("head.weight", nn.Parameter(head))
        self.register_parameter("head.bias", nn.Parameter(torch.zeros(ways)))

    def register_parameter(self, name, param):
        # Dotted names keep the params dict flat and readable ("conv0.weight");
        # nn.Module forbids dots, so store under a dot-free alias.
        super().register_parameter(name.replace(".", "_"), param)

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(name.replace(".", "_"), tensor, persistent)

    def params(self) -> dict[str, nn.Parameter]:
        """The meta-learned parameters by dotted name, in a fixed order."""
        return {n.replace("_", ".", 1): p for n, p in self.named_parameters()}

    def running_stats(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"bn{i}_running_mean"), getattr(self, f"bn{i}_running_var")

    def _features(self, in_channels: int, image_size: int) -> int:
        with torch.no_grad():
            x = torch.zeros(2, in_channels, image_size, image_size)
            return self.trunk(self.params(), x, 0, False)[0].shape[1]

    def trunk(self, params, x, step: int, running: bool):
        stats = []
        stride = 2 if self.downsample == "stride" else 1
        for i in range(BLOCKS):
            x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride, 1)
            w, b = params[f"bn{i}.weight"], params[f"bn{i}.bias"]
            if w.dim() == 2:  # per-step affine parameters: (steps, C) -> (C,)
                w, b = w[min(step, w.shape[0] - 1)], b[min(step, b.shape[0] - 1)]
            mean = var = None
            if running:
                rm, rv = self.running_stats(i)
                mean, var = rm[min(step, rm.shape[0] - 1)], rv[min(step, rv.shape[0] - 1)]
            x, s = batch_norm(x, w, b, mean, var)
            stats.append(s)
            x = F.relu(x)
            if self.downsample == "pool":
                x = F.max_pool2d(x, 2)
        return x.flatten(1), torch.stack(stats)  # (N, features), (blocks, 2, C)

    def forward(self, params, x, step: int = 0, running: bool = False):
        """Logits (N, ways) and this batch's normalisation statistics (blocks, 2, C)."""
        h, stats = self.trunk(params, x, step, running)
        return F.linear(h, params["head.weight"], params["head.bias"]), stats

    @torch.no_grad()
    def update_running_stats(self, stats: torch.Tensor) -> None:
        """Fold batch statistics (steps, blocks, 2, C) into the running averages.

        With one row of running statistics the steps are averaged; with one row
        per step (BNRS) each row follows its own step.
        """
        m = self.bn_momentum
        for i in range(BLOCKS):
            rm, rv = self.running_stats(i)
            s = stats[:, i]  # (steps, 2, C)
            if rm.shape[0] == 1:
                s = s.mean(0, keepdim=True)
            n = min(rm.shape[0], s.shape[0])
            rm[:n].lerp_(s[:n, 0], m)
            rv[:n].lerp_(s[:n, 1], m)
