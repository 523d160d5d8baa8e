"""N-way K-shot episodes drawn by tensor indexing from class-major images.

Images are uint8, shaped (classes, per_class, C, H, W): in memory on the training
device, or a memory-mapped CPU tensor (data/store.py), from which a task batch's
images are gathered on CPU (into pinned memory on CUDA) and copied over without
blocking. A task picks `ways` classes and, within each, shots + queries distinct
images, uniformly among that class's own `counts[c]` images where classes differ in
size; the task's label j is its j-th randomly drawn class, so labels are permuted
per task. Evaluation task sets are drawn once from a seeded CPU generator, so
they are the same on every device and store, for every algorithm and run.

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
        counts: torch.Tensor | None = None,
        device: torch.device | None = None,
    ):
        classes, per_class = images.shape[:2]
        device = images.device if device is None else torch.device(device)
        if counts is not None and (counts.shape != (classes,) or bool((counts > per_class).any())):
            raise ValueError(f"counts {tuple(counts.shape)} do not fit images {images.shape}")
        # None: every class holds per_class images (the draw is then as it always was)
        self.counts = None if counts is None or bool((counts == per_class).all()) else counts
        fewest = per_class if self.counts is None else int(self.counts.min())
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
        if shots + queries > fewest:
            each = "per class" if self.counts is None else "in its smallest class"
            raise MetatrainError(
                f"shots + queries = {shots + queries} exceeds the {fewest} images {each} "
                f"of the {split} split; lower dataset.shots or dataset.queries"
            )
        self.images, self.ways, self.shots, self.queries = images, ways, shots, queries
        self.device, self.rotate = device, rotate
        # a mapped store is on CPU: for another device a batch is gathered there, then moved
        self.mapped = images.device.type == "cpu" and device.type != "cpu"
        if self.counts is not None:
            self.counts = self.counts.to(device)
        h, w = images.shape[-2:]
        if rotate and h != w:
            raise MetatrainError(
                f"dataset.augment_rotation needs square images, not {h}x{w}; switch it off"
            )
        # out.flatten()[p] = img.flatten()[index[k, p]] is torch.rot90(img, k): (4, H*W)
        grid = torch.arange(h * w, device=device).view(h, w)
        self.rot_index = torch.stack([torch.rot90(grid, k).reshape(-1) for k in range(4)])
        c = images.shape[2]
        if len(mean) != c or len(std) != c:
            raise MetatrainError(f"dataset.mean and dataset.std need {c} values, one per channel")
        # Normalisation as one fused multiply-add on the uint8 batch: x * scale + shift.
        std_t = torch.tensor(std, device=device)
        self.scale = (1.0 / (255.0 * std_t)).view(c, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / std_t).view(c, 1, 1)

    def draw(self, tasks: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids (tasks, ways) and image ids (tasks, ways, shots + queries)."""
        classes, per_class = self.images.shape[:2]
        dev = generator.device
        # top-k of uniform noise is a uniformly random subset without replacement
        cls = torch.rand(tasks, classes, generator=generator, device=dev).topk(self.ways).indices
        noise = torch.rand(tasks, self.ways, per_class, generator=generator, device=dev)
        if self.counts is not None:
            # a class's padding rows get noise -1 < every real key: never among the top k
            count = self.counts.to(dev)[cls]  # (tasks, ways)
            pad = torch.arange(per_class, device=dev) >= count[..., None]
            noise = noise.masked_fill(pad, -1.0)
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
        tasks, ways, n = ids.shape
        if self.mapped:
            x = self._read(cls, ids)
        else:
            cls, ids = cls.to(self.device), ids.to(self.device)
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

    def _read(self, cls: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The task batch's images from the mapped store: only their pages are read."""
        classes, per_class = self.images.shape[:2]
        rows = (cls.cpu()[..., None] * per_class + ids.cpu()).flatten()  # (tasks*ways*n,)
        flat = self.images.view(classes * per_class, *self.images.shape[2:])  # (rows, C, H, W)
        pin = self.device.type == "cuda"
        out = torch.empty((len(rows), *flat.shape[1:]), dtype=flat.dtype, pin_memory=pin)
        torch.index_select(flat, 0, rows, out=out)
        # from pinned memory the copy is asynchronous; torch keeps `out` alive until it ends
        return out.to(self.device, non_blocking=pin).view(*ids.shape, *flat.shape[1:])

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
