"""Few-shot datasets held in memory as uint8 class-major tensors."""

from dataclasses import dataclass

import torch


@dataclass
class FewShotSplits:
    """A dataset after loading: per split, images grouped by class.

    images[split] is uint8 with shape (classes, per_class, C, H, W); every class
    has the same number of images so that episodes are sampled by indexing.
    classes[split] names each class in that order.
    """

    images: dict[str, torch.Tensor]
    classes: dict[str, list[str]]
