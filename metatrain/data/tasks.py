"""N-way K-shot episodes drawn by tensor indexing from class-major images.

Images stay uint8 on the training device, shaped (classes, per_class, C, H, W).
A task picks `ways` classes and, within each, shots + queries distinct images;
the task's label j is its j-th randomly drawn class, so labels are permuted
per task. Evaluation task sets are drawn once from a seeded CPU generator, so
they are the same on every device, for every algorithm and run.

With `rotate` (MAML++'s Omniglot augmentation), `sample` turns each class of a
task by its own random multiple of 90 degrees, the same for all of that class's
images in the task, drawn anew for every task. It is one gather through a
precomputed pixel permutation, on device. Evaluation tasks (`FixedTasks`) are
upright unless built with `rotate=True` (MAML's code turns validation and test
tasks too): their quarter turns are then drawn once, with the task set, from the
same seeded generator, after the classes and images, so a rotated task set has
the classes and images of the upright one and stays fixed by eval.seed.
"""

import torch

from metatrain.errors import MetatrainError
from metatrain.task_batch import TaskBatch


class EpisodeSampler:
    def __init__(
        self,
        images: torch.Tensor,
        ways: int,
        shots: int,
        queries: int,
        mean: list[float],
        std: list[float],
        split: str = "train",
        rotate: bool = False,
    ):
        classes, per_class = images.shape[:2]
        if ways < 2:
            raise MetatrainError(f"dataset.ways={ways}: a task needs at least 2 classes")
        if shots < 1:
            raise MetatrainError(
                f"dataset.shots={shots}: each class needs at least 1 support example"
            )
        if queries < 0:
            raise MetatrainError(f"dataset.queries={queries} must not be negative")
        if ways > classes:
            raise MetatrainError(
                f"dataset.ways={ways} exceeds the {classes} classes of the {split} split; lower it"
            )
        if shots + queries > per_class:
            raise MetatrainError(
                f"shots + queries = {shots + queries} exceeds the {per_class} images per class "
                f"of the {split} split; lower dataset.shots or dataset.queries"
            )
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries
        self.rotate = rotate
        h, w = images.shape[-2:]
        if rotate and h != w:
            raise MetatrainError(
                f"dataset.augment_rotation needs square images, not {h}x{w}; switch it off"
            )
        # out.flatten()[p] = img.flatten()[index[k, p]] is torch.rot90(img, k): (4, H*W)
        grid = torch.arange(h * w, device=images.device).view(h, w)
        self.rot_index = torch.stack([torch.rot90(grid, k).reshape(-1) for k in range(4)])
        c = images.shape[2]
        if len(mean) != c or len(std) != c:
            raise MetatrainError(f"dataset.mean and dataset.std need {c} values, one per channel")
        # Normalisation as one fused multiply-add on the uint8 batch: x * scale + shift.
        std_t = torch.tensor(std, device=images.device)
        self.scale = (1.0 / (255.0 * std_t)).view(c, 1, 1)
        self.shift = (-torch.tensor(mean, device=images.device) / std_t).view(c, 1, 1)

    def draw(self, tasks: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids (tasks, ways) and image ids (tasks, ways, shots + queries)."""
        classes, per_class = self.images.shape[:2]
        dev = generator.device
        # top-k of uniform noise is a uniformly random subset without replacement
        cls = torch.rand(tasks, classes, generator=generator, device=dev).topk(self.ways).indices
        noise = torch.rand(tasks, self.ways, per_class, generator=generator, device=dev)
        ids = noise.topk(self.shots + self.queries).indices
        return cls, ids

    def draw_rotations(self, tasks: int, generator: torch.Generator) -> torch.Tensor:
        """Quarter turns (tasks, ways) in {0, 1, 2, 3}, one per class of each task."""
        return torch.randint(4, (tasks, self.ways), generator=generator, device=generator.device)

    def gather(
        self, cls: torch.Tensor, ids: torch.Tensor, rot: torch.Tensor | None = None
    ) -> TaskBatch:
        """The task batch of class ids `cls`, image ids `ids` and optional quarter
        turns `rot` (tasks, ways), each applied to all of that class's images."""
        cls, ids = cls.to(self.images.device), ids.to(self.images.device)
        tasks, ways, n = ids.shape
        x = self.images[cls[..., None], ids]  # (tasks, ways, shots+queries, C, H, W) uint8
        if rot is not None:
            flat = x.flatten(-2)  # (tasks, ways, n, C, H*W)
            index = self.rot_index[rot.to(x.device)]  # (tasks, ways, H*W)
            index = index[:, :, None, None, :].expand_as(flat)
            x = flat.gather(-1, index).view_as(x)
        x = torch.addcmul(self.shift, x.to(self.scale.dtype), self.scale)  # one pass
        labels = torch.arange(ways, device=x.device)[None, :, None].expand(tasks, ways, n)
        s = self.shots
        img = x.shape[3:]
        return TaskBatch(
            xs=x[:, :, :s].reshape(tasks, ways * s, *img),
            ys=labels[:, :, :s].reshape(tasks, ways * s),
            xq=x[:, :, s:].reshape(tasks, ways * (n - s), *img),
            yq=labels[:, :, s:].reshape(tasks, ways * (n - s)),
        )

    def sample(self, tasks: int, generator: torch.Generator) -> TaskBatch:
        """Meta-training tasks, rotated per class when `rotate` is on."""
        cls, ids = self.draw(tasks, generator)
        rot = self.draw_rotations(tasks, generator) if self.rotate else None
        return self.gather(cls, ids, rot)


class FixedTasks:
    """A reproducible set of evaluation tasks, iterated in batches."""

    def __init__(self, sampler: EpisodeSampler, n_tasks: int, seed: int, rotate: bool = False):
        self.sampler = sampler
        g = torch.Generator().manual_seed(seed)
        self.cls, self.ids = sampler.draw(n_tasks, g)
        # (n_tasks, ways) quarter turns, one per class of each task, or None
        self.rot = sampler.draw_rotations(n_tasks, g) if rotate else None
        if rotate:
            h, w = sampler.images.shape[-2:]
            if h != w:
                raise MetatrainError(
                    f"dataset.eval_rotation needs square images, not {h}x{w}; switch it off"
                )

    def __len__(self) -> int:
        return self.cls.shape[0]

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            part = slice(i, i + batch_size)
            rot = None if self.rot is None else self.rot[part]
            yield self.sampler.gather(self.cls[part], self.ids[part], rot)
