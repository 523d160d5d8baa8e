"""Memory-mapped stores give the tasks in-memory ones give; auto maps what does not fit the
budget; classes of unequal sizes are drawn among all and only their own images."""

import pytest
import torch

from metatrain.data import FewShotSplits, store
from metatrain.data.cache import load_cache, store_cache
from metatrain.data.tasks import EpisodeSampler, FixedTasks
from metatrain.errors import MetatrainError
from tests.conftest import TINY, make_cfg

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def generated(classes=12, per_class=9, size=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (classes, per_class, 3, size, size), generator=g).to(torch.uint8)


def batches_equal(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("xs", "ys", "xq", "yq"))


@pytest.mark.parametrize("counts", [None, torch.tensor([9, 5, 7, 9, 6, 8, 9, 5, 5, 9, 7, 6])])
def test_memory_mapped_stores_give_bit_identical_tasks(tmp_path, counts):
    images = generated()
    from_file = store.to_file(images, tmp_path / "scratch")  # a split built in memory
    store_cache(tmp_path / "c.pt", [], train=images)
    with store.loading(0):  # a cache file over the budget is opened mapped
        from_cache = load_cache(tmp_path / "c.pt", [])["train"]
    assert not store.is_mapped(images)
    assert store.is_mapped(from_file) and store.is_mapped(from_cache)
    assert list((tmp_path / "scratch").iterdir()) == []  # unlinked once mapped
    kw = {"ways": 4, "shots": 2, "queries": 3, "mean": MEAN, "std": STD, "counts": counts}
    samplers = [EpisodeSampler(x, **kw) for x in (images, from_file, from_cache)]
    ref = samplers[0]
    for s in samplers[1:]:
        for rotate in (False, True):
            ref.rotate = s.rotate = rotate
            a = ref.sample(16, torch.Generator().manual_seed(3))
            b = s.sample(16, torch.Generator().manual_seed(3))
            assert batches_equal(a, b)
        fa, fb = FixedTasks(ref, 20, seed=11), FixedTasks(s, 20, seed=11)
        assert torch.equal(fa.cls, fb.cls) and torch.equal(fa.ids, fb.ids)
        assert all(batches_equal(x, y) for x, y in zip(fa.batches(7), fb.batches(7), strict=True))


def test_mapped_gather_reads_through_the_pinned_path_where_cuda_is(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the pinned, non-blocking copy is not exercised")
    images = generated()
    mapped = store.to_file(images, tmp_path)
    dev = torch.device("cuda")
    a = EpisodeSampler(images.to(dev), 4, 2, 3, MEAN, STD, device=dev)
    b = EpisodeSampler(mapped, 4, 2, 3, MEAN, STD, device=dev)
    assert b.mapped and not a.mapped
    g = torch.Generator(device=dev)
    assert batches_equal(a.sample(8, g.manual_seed(1)), b.sample(8, g.manual_seed(1)))


def splits(sizes) -> FewShotSplits:
    imgs = {s: generated(classes=n, seed=i) for i, (s, n) in enumerate(sizes.items())}
    return FewShotSplits(
        images=imgs, classes={s: [str(c) for c in range(n)] for s, n in sizes.items()}
    )


def test_auto_maps_the_splits_over_the_budget(tmp_path, monkeypatch):
    data = splits({"train": 12, "val": 4, "test": 6})
    per_class = 9 * 3 * 6 * 6
    cpu = torch.device("cpu")
    # a budget of 9 classes: train (12) is mapped, val (4) fits, test (6) not in what is left
    monkeypatch.setattr(store, "available_memory", lambda: 2 * 9 * per_class)
    limit = store.budget("auto", cpu)
    assert limit == 9 * per_class
    out = store.place(data, limit, cpu, tmp_path)
    assert [store.is_mapped(out[s]) for s in ("train", "val", "test")] == [True, False, True]
    for s in out:
        assert torch.equal(out[s], data.images[s])
    # a budget above every split keeps them all in memory; true ignores the budget
    monkeypatch.setattr(store, "available_memory", lambda: 2 * 30 * per_class)
    out = store.place(data, store.budget("auto", cpu), cpu, tmp_path)
    assert not any(store.is_mapped(t) for t in out.values())
    monkeypatch.setattr(store, "available_memory", lambda: 0)
    out = store.place(data, store.budget("true", cpu), cpu, tmp_path)
    assert not any(store.is_mapped(t) for t in out.values())
    out = store.place(data, store.budget("false", cpu), cpu, tmp_path)
    assert all(store.is_mapped(t) for t in out.values())


def test_a_distributed_runs_processes_on_one_machine_share_the_budget(monkeypatch):
    # each rank loads its own copy of the splits: two on a machine take half each
    monkeypatch.setattr(store, "available_memory", lambda: 8_000)
    cpu = torch.device("cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert store.budget("auto", cpu) == 4_000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert store.budget("auto", cpu) == 2_000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert store.budget("auto", cpu) == 1_333
    assert store.budget("true", cpu) is None and store.budget("false", cpu) == 0


def test_auto_reads_a_cache_file_over_the_budget_mapped_and_one_within_it_whole(
    tmp_path, monkeypatch
):
    images = generated(classes=20)
    store_cache(tmp_path / "c.pt", [], train=images)
    size = (tmp_path / "c.pt").stat().st_size
    for budget, mapped in ((size + 1, False), (size - 1, True)):
        monkeypatch.setattr(store, "available_memory", lambda b=budget: 2 * b)
        limit = store.budget("auto", torch.device("cpu"))
        with store.loading(limit):
            t = load_cache(tmp_path / "c.pt", [])["train"]
        assert store.is_mapped(t) is mapped and torch.equal(t, images)
    cpu = torch.device("cpu")
    # the split itself (smaller than the file) fits the budget: read into RAM, no longer mapped
    placed = store.place(FewShotSplits({"train": t}, {}), limit, cpu, tmp_path, names=("train",))
    assert not store.is_mapped(placed["train"]) and torch.equal(placed["train"], images)
    # over the budget, a mapped split is used where it lies: same bytes, no scratch file
    placed = store.place(FewShotSplits({"train": t}, {}), 0, cpu, tmp_path, names=("train",))
    assert placed["train"].data_ptr() == t.data_ptr()
    assert list(tmp_path.glob(".store.*")) == []


@pytest.mark.parametrize("value", ["maybe", "1"])
def test_a_bad_in_memory_value_is_one_line(value):
    with pytest.raises(MetatrainError, match="use auto, true or false"):
        store.budget(value, torch.device("cpu"))


def test_in_memory_key_accepts_booleans():
    assert make_cfg("dataset.in_memory=false").dataset.in_memory == "False"
    assert store.budget(make_cfg("dataset.in_memory=false").dataset.in_memory, "cpu") == 0
    assert store.budget(make_cfg("dataset.in_memory=true").dataset.in_memory, "cpu") is None


COUNTS = torch.tensor([9, 5, 7, 9, 6, 8, 9, 5, 5, 9, 7, 6])


def test_unequal_classes_draw_only_and_all_of_their_own_images():
    s = EpisodeSampler(generated(), 4, 2, 3, MEAN, STD, counts=COUNTS)
    cls, ids = s.draw(4000, torch.Generator().manual_seed(0))
    own = COUNTS[cls][..., None]  # (tasks, ways, 1)
    assert (ids < own).all()  # never a padding row
    assert all(len(set(row.tolist())) == 5 for row in ids.view(-1, 5)[:500])  # distinct
    seen = torch.zeros(12, 9, dtype=torch.long)
    seen.index_put_((cls[..., None].expand_as(ids).flatten(), ids.flatten()), torch.tensor(1), True)
    reachable = torch.arange(9)[None] < COUNTS[:, None]
    assert torch.equal(seen > 0, reachable)  # every image of every class is drawn
    # uniformly among a class's own images: each of class 1's 5 images in every task of it
    # (5 of 5 drawn), each of class 0's 9 images in 5/9 of its tasks
    for c in (0, 3, 6):
        rate = seen[c].double() / (cls == c).sum()
        assert ((rate - 5 / 9).abs() < 0.06).all(), rate
    assert (seen[1, :5] == (cls == 1).sum()).all()


def test_full_counts_draw_what_no_counts_draw():
    images = generated()
    a = EpisodeSampler(images, 4, 2, 3, MEAN, STD)
    b = EpisodeSampler(images, 4, 2, 3, MEAN, STD, counts=torch.full((12,), 9))
    assert b.counts is None
    fa, fb = FixedTasks(a, 30, seed=5), FixedTasks(b, 30, seed=5)
    assert torch.equal(fa.ids, fb.ids) and torch.equal(fa.cls, fb.cls)


def test_fixed_unequal_tasks_are_fixed_by_the_seed():
    s = EpisodeSampler(generated(), 4, 2, 3, MEAN, STD, counts=COUNTS)
    a, b, c = FixedTasks(s, 50, seed=1), FixedTasks(s, 50, seed=1), FixedTasks(s, 50, seed=2)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.cls, b.cls)
    assert not torch.equal(a.ids, c.ids)


def test_smallest_class_bounds_shots_plus_queries():
    with pytest.raises(MetatrainError, match="exceeds the 5 images in its smallest class"):
        EpisodeSampler(generated(), 4, 2, 4, MEAN, STD, counts=COUNTS)


def test_training_is_the_same_run_in_memory_and_memory_mapped(omniglot_data, tmp_path, monkeypatch):
    from metatrain.train import train

    placed, place = [], store.place

    def recording(*args, **kw):
        out = place(*args, **kw)
        placed.append({s: store.is_mapped(t) for s, t in out.items()})
        return out

    monkeypatch.setattr(store, "place", recording)
    tiny = (*TINY, "train.iterations=4", "train.val_interval=2", "eval.test_tasks=10")
    results = []
    for mode in ("true", "false"):
        cfg = make_cfg(*tiny, f"dataset.in_memory={mode}", "eval.val_tasks=10")
        results.append(train(cfg, tmp_path / mode))
    assert [set(p.values()) for p in placed] == [{False}, {True}]
    assert results[0]["test"]["acc"] > 0 and results[0]["test"] == results[1]["test"]
    assert results[0]["best_val"] == results[1]["best_val"]
