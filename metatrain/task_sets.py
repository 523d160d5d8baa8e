"""Where the episodes come from: meta-training's sampler and the fixed validation and
test task sets. Training (train.py) and `metatrain-eval` (eval_run.py) both build them
here, so a run is tested again on the very tasks it was tested on."""

import torch

from metatrain.data.tasks import EpisodeSampler, FixedTasks
from metatrain.errors import MetatrainError

SEED_OFFSET = {"val": 0, "test": 1}  # each split's task set is drawn from eval.seed + this


def _sampler(cfg, splits, split: str, shots: int, queries: int, device, **kw) -> EpisodeSampler:
    ds = cfg.dataset
    return EpisodeSampler(
        splits.images[split], ds.ways, shots, queries, ds.mean, ds.std, split,
        counts=splits.counts.get(split), device=device, **kw,
    )  # fmt: skip


def eval_tasks(cfg, splits, split: str, device: torch.device) -> FixedTasks | None:
    """The fixed task set of `split` ("val" or "test") from the placed splits
    (datasets.load_placed); None for a validation split without classes."""
    if split == "val" and splits.images[split].shape[0] == 0:
        return None
    ds = cfg.dataset
    queries = cfg.eval.queries or ds.queries  # per class, in validation and test tasks
    sampler = _sampler(cfg, splits, split, ds.shots, queries, device)
    count = cfg.eval.test_tasks if split == "test" else cfg.eval.val_tasks
    turn = getattr(ds, "eval_rotation", False)
    return FixedTasks(sampler, count, cfg.eval.seed + SEED_OFFSET[split], turn)


def task_sets(
    cfg, splits, device: torch.device, train_shots: int, train_queries: int
) -> tuple[EpisodeSampler, FixedTasks | None, FixedTasks]:
    """(meta-training's sampler, the validation tasks, the test tasks) from the placed
    splits. Validation is None where the split has no validation classes (Reptile's
    authors train on all but the test characters): the last parameters are tested."""
    rotate = getattr(cfg.dataset, "augment_rotation", False)
    train = _sampler(cfg, splits, "train", train_shots, train_queries, device, rotate=rotate)
    test = eval_tasks(cfg, splits, "test", device)
    val = eval_tasks(cfg, splits, "val", device)
    if val is None and cfg.eval.test_from.value != "last":
        raise MetatrainError(
            "this dataset split has no validation classes, so there is no best checkpoint "
            "to test: set eval.test_from=last (or give the split validation classes)"
        )
    return train, val, test
