"""Learned inner learning rates, meta-learned with the weights.

LSLR (Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019): one rate
per parameter tensor per inner step, shape (steps,).

Meta-SGD (Li, Zhou, Chen, Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", 2017): one rate per parameter element, shaped like the parameter, the
same at every step: theta' = theta - alpha * grad (element-wise). Both start at
the configured inner rate.
"""

import torch
from torch import nn


def key(name: str) -> str:
    return name.replace(".", "-")  # ParameterDict keys cannot hold dots


class InnerRates(nn.Module):
    def __init__(
        self, shapes: dict[str, tuple[int, ...]], steps: int, init: float, per_element: bool,
        dtype=torch.float32,
    ):  # fmt: skip
        """shapes: adapted parameter name -> its shape. per_element: Meta-SGD, else LSLR."""
        super().__init__()
        self.per_element = per_element
        self.rates = nn.ParameterDict(
            {
                key(n): nn.Parameter(
                    torch.full(shape if per_element else (steps,), float(init), dtype=dtype)
                )
                for n, shape in shapes.items()
            }
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The rates by parameter name, for functional use."""
        return {n.replace("-", "."): r for n, r in self.rates.items()}

    def pick(self, rate: torch.Tensor, step: int) -> torch.Tensor:
        """The rate applied at inner step `step` (LSLR: that step's row, the last one
        past the end; Meta-SGD: the same tensor every step)."""
        if self.per_element:
            return rate
        return rate[min(step, rate.shape[0] - 1)]

    def get(self, name: str, step: int) -> torch.Tensor:
        return self.pick(self.rates[key(name)], step)
