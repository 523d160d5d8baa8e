"""A batch of few-shot tasks: the plain tensors that samplers produce and learners
consume. Kept outside the data package so that no algorithm imports a reader."""

from dataclasses import dataclass

import torch


@dataclass
class TaskBatch:
    xs: torch.Tensor  # (tasks, ways*shots, C, H, W) support inputs, normalised floats
    ys: torch.Tensor  # (tasks, ways*shots) labels in [0, ways)
    xq: torch.Tensor  # (tasks, ways*queries, C, H, W)
    yq: torch.Tensor  # (tasks, ways*queries)
    # A distributed run's shard of a meta-batch: (its first task, the full batch's
    # tasks); None for a whole batch (metatrain/distributed.py)
    shard: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.xs.shape[0]

    def task(self, t: int) -> "TaskBatch":
        return TaskBatch(
            self.xs[t : t + 1], self.ys[t : t + 1], self.xq[t : t + 1], self.yq[t : t + 1]
        )
