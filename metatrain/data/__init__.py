"""Few-shot datasets as uint8 class-major tensors (in memory or memory-mapped: data/store.py)."""

from dataclasses import dataclass, field

import torch


@dataclass
class FewShotSplits:
    """A dataset after loading: per split, images grouped by class.

    images[split] is uint8 with shape (classes, per_class, C, H, W) so that episodes are
    sampled by indexing. Where classes hold different numbers of images, per_class is the
    largest, counts[split] (int64, (classes,)) holds each class's own count, and a class's
    images are its first counts[c] rows (the rest is zero padding, never drawn). A split
    without counts has every class full. classes[split] names each class in that order.
    """

    images: dict[str, torch.Tensor]
    classes: dict[str, list[str]]
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


def pad_classes(per_class: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack classes of unequal sizes, each (n_c, C, H, W), into (classes, max n_c, C, H, W)
    with zero padding, and their counts (classes,)."""
    counts = torch.tensor([len(x) for x in per_class], dtype=torch.int64)
    out = torch.zeros(
        (len(per_class), int(counts.max()), *per_class[0].shape[1:]), dtype=torch.uint8
    )
    for c, x in enumerate(per_class):
        out[c, : len(x)] = x
    return out, counts
