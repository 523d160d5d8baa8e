"""MiniImageNet readers on generated fixtures in each layout: shapes, class order, pixels,
cache reuse and invalidation, and one-line errors. CPU, no network, about a second each."""

import importlib.util
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metatrain.data.cache as cache_mod
import metatrain.data.miniimagenet as mi
from metatrain.data.miniimagenet import LAYOUTS, SPLITS, load_miniimagenet, packaged_classes
from metatrain.errors import MetatrainError
from tests.miniimagenet_fixtures import (
    all_classes,
    colour,
    imagenet_colour,
    write_csv_layout,
    write_fake_imagenet,
    write_folders_layout,
    write_pickle_layout,
)

WRITERS = {"csv": write_csv_layout, "folders": write_folders_layout, "pickle": write_pickle_layout}
SIZES = {"train": 64, "val": 16, "test": 20}
REPO = Path(__file__).resolve().parents[1]


def corner_colours(data) -> torch.Tensor:
    """(100, per_class, 3): mean colour of each image's bottom-right 4x4 corner."""
    return torch.cat([data.images[s][..., -4:, -4:].float().mean((-1, -2)) for s in SPLITS])


def expected_colours(per_class: int, colour_fn=colour) -> torch.Tensor:
    rows = [[colour_fn(ci, j) for j in range(per_class)] for ci in range(len(all_classes()))]
    return torch.tensor(rows, dtype=torch.float32)  # (100, per_class, 3)


def assert_one_line_error(fn, *fragments):
    with pytest.raises(MetatrainError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def fail(*args, **kwargs):
    raise AssertionError("source data read although the cache is valid")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_shapes_class_order_and_pixels(tmp_path, layout):
    root = WRITERS[layout](tmp_path / "mini", per_class=4)
    data = load_miniimagenet(root, layout=layout)
    for split in SPLITS:
        assert data.images[split].shape == (SIZES[split], 4, 3, 84, 84)
        assert data.images[split].dtype == torch.uint8
        assert data.classes[split] == packaged_classes(split)
    # Every image of every class in its place (JPEG moves a solid colour by a level or two).
    tolerance = 0 if layout == "pickle" else 3
    assert (corner_colours(data) - expected_colours(4)).abs().max() <= tolerance
    # A known class spelt out: val's n02091244 is class 64 + 1, image 2.
    val = data.classes["val"].index("n02091244")
    pixel = data.images["val"][val, 2, :, -1, -1].tolist()
    assert max(abs(a - b) for a, b in zip(pixel, colour(65, 2))) <= tolerance


@pytest.mark.parametrize("layout", LAYOUTS)
def test_auto_detects_each_layout(tmp_path, layout):
    root = WRITERS[layout](tmp_path / "mini", per_class=2)
    data = load_miniimagenet(root)
    assert (root / f"miniimagenet_{layout}_84.pt").is_file()
    assert data.images["test"].shape == (20, 2, 3, 84, 84)


def test_layouts_agree(tmp_path):
    # Lossless files must match the pickle exactly; the two jpg layouts hold the same bytes.
    png = load_miniimagenet(write_folders_layout(tmp_path / "png", ext=".png"), layout="folders")
    pkl = load_miniimagenet(write_pickle_layout(tmp_path / "pkl"), layout="pickle")
    jpg = load_miniimagenet(write_folders_layout(tmp_path / "jpg"), layout="folders")
    csv = load_miniimagenet(write_csv_layout(tmp_path / "csv"), layout="csv")
    for split in SPLITS:
        assert torch.equal(png.images[split], pkl.images[split])
        assert torch.equal(jpg.images[split], csv.images[split])
        # Away from the noise patch, JPEG stays within a level or two of the exact pixels.
        diff = jpg.images[split][..., 42:, 42:].float() - pkl.images[split][..., 42:, 42:]
        assert diff.abs().max() <= 3


def test_resize_only_when_needed(tmp_path):
    pkl = load_miniimagenet(write_pickle_layout(tmp_path / "pkl"), image_size=32)
    png = load_miniimagenet(write_folders_layout(tmp_path / "png", ext=".png"), image_size=32)
    big = load_miniimagenet(write_folders_layout(tmp_path / "big", size=100, ext=".png"))
    assert pkl.images["train"].shape == (64, 4, 3, 32, 32)
    assert big.images["val"].shape == (16, 4, 3, 84, 84)
    assert (tmp_path / "pkl" / "miniimagenet_pickle_32.pt").is_file()
    for split in SPLITS:  # the same PIL resize whichever layout the 84x84 pixels came from
        assert torch.equal(pkl.images[split], png.images[split])
    for data in (pkl, big):
        assert (corner_colours(data) - expected_colours(4)).abs().max() <= 1


def test_pickle_variants(tmp_path):
    # The "validation" file name, Python 2 pickles and protocols 2 and 5 all load the same.
    a = load_miniimagenet(write_pickle_layout(tmp_path / "a", val_name="validation", protocol=2))
    b = load_miniimagenet(write_pickle_layout(tmp_path / "b", protocol=5))
    c = load_miniimagenet(write_pickle_layout(tmp_path / "c", protocol="py2"))
    for split in SPLITS:
        assert torch.equal(a.images[split], b.images[split])
        assert torch.equal(a.images[split], c.images[split])


def test_pickle_of_non_84_images_follows_image_size(tmp_path):
    root = write_pickle_layout(tmp_path / "mini", size=32)
    assert load_miniimagenet(root, image_size=32).images["train"].shape == (64, 4, 3, 32, 32)
    assert_one_line_error(lambda: load_miniimagenet(root), "(32, 32, 3)", "(84, 84, 3)")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cache_is_reused_then_rebuilt_when_the_source_changes(tmp_path, monkeypatch, layout):
    root = WRITERS[layout](tmp_path / "mini", per_class=3)
    first = load_miniimagenet(root)
    cache = root / f"miniimagenet_{layout}_84.pt"
    assert cache.is_file()
    with monkeypatch.context() as m:
        m.setattr(mi, "_read_image", fail)
        m.setattr(mi, "_load_pickle", fail)
        second = load_miniimagenet(root)
    for split in SPLITS:
        assert torch.equal(first.images[split], second.images[split])

    # Make train class 0, image 0 black in the source; the next load must see it.
    wnid = packaged_classes("train")[0]
    if layout == "pickle":
        path = root / "mini-imagenet-cache-train.pkl"
        blob = pickle.loads(path.read_bytes())
        blob["image_data"][blob["class_dict"][wnid][0]] = 0
        path.write_bytes(pickle.dumps(blob))
    else:
        name = f"images/{wnid}00000001.jpg" if layout == "csv" else f"train/{wnid}/{wnid}_0000.jpg"
        path = root / name
        Image.new("RGB", (84, 84)).save(path)
    stat = path.stat()  # a later mtime even on coarse-clock file systems
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    third = load_miniimagenet(root)
    assert third.images["train"][0, 0].max() <= 3
    assert torch.equal(third.images["train"][1:], first.images["train"][1:])


def test_read_only_root_caches_under_metatrain_cache(tmp_path, monkeypatch):
    root = write_pickle_layout(tmp_path / "mini", per_class=2)
    monkeypatch.setenv("METATRAIN_CACHE", str(tmp_path / "cache"))
    mode = root.stat().st_mode
    root.chmod(0o555)
    try:
        if os.access(root, os.W_OK):  # root user: the chmod does not bind, so say it is read-only
            writable = cache_mod.is_writable_dir
            monkeypatch.setattr(
                cache_mod,
                "is_writable_dir",
                lambda p: Path(p).resolve() != root.resolve() and writable(p),
            )
        load_miniimagenet(root)
        assert not list(root.glob("*.pt"))
        assert len(list((tmp_path / "cache").glob("mini-*/miniimagenet_pickle_84.pt"))) == 1
        monkeypatch.setattr(mi, "_load_pickle", fail)
        assert load_miniimagenet(root).images["train"].shape == (64, 2, 3, 84, 84)
    finally:
        root.chmod(mode)


def test_packaged_csvs_are_the_fallback(tmp_path, monkeypatch):
    # With no CSVs under root the packaged split files are read (swapped here for small ones).
    splits = tmp_path / "splits"
    root = write_csv_layout(tmp_path / "mini", per_class=3, csv_dir=splits)
    for split in SPLITS:
        shutil.copy(mi.SPLIT_FILES / f"{split}_classes.txt", splits)
    monkeypatch.setattr(mi, "SPLIT_FILES", splits)
    assert load_miniimagenet(root, layout="csv").images["val"].shape == (16, 3, 3, 84, 84)


def test_unequal_counts_use_the_smallest_with_a_warning(tmp_path):
    wnid = packaged_classes("test")[5]
    root = write_folders_layout(tmp_path / "mini", per_class={wnid: 3})
    with pytest.warns(UserWarning, match="using the first 3"):
        data = load_miniimagenet(root)
    assert data.images["test"].shape == (20, 3, 3, 84, 84)
    assert data.images["train"].shape == (64, 4, 3, 84, 84)


# ---- errors: one line each, saying what to do ----


def test_missing_root_and_unknown_layout(tmp_path):
    assert_one_line_error(
        lambda: load_miniimagenet(tmp_path / "nowhere"),
        str(tmp_path / "nowhere"),
        "scripts/prepare_miniimagenet.py",
        "mini-imagenet-cache-",
    )
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        lambda: load_miniimagenet(tmp_path / "empty"), "no MiniImageNet layout recognised", "empty"
    )
    assert_one_line_error(lambda: load_miniimagenet(tmp_path / "empty", layout="zip"), "'zip'")
    assert_one_line_error(
        lambda: load_miniimagenet(tmp_path / "empty", layout="pickle"),
        "mini-imagenet-cache-train.pkl",
    )
    assert_one_line_error(lambda: load_miniimagenet(tmp_path / "empty", layout="folders"), "train")


def test_corrupt_or_foreign_pickles(tmp_path):
    root = write_pickle_layout(tmp_path / "mini", per_class=2)
    path = root / "mini-imagenet-cache-val.pkl"
    good = path.read_bytes()
    for bad in (b"not a pickle at all", good[: len(good) // 2]):
        path.write_bytes(bad)
        assert_one_line_error(lambda: load_miniimagenet(root), "corrupt pickle", "re-download")
    path.write_bytes(pickle.dumps([1, 2, 3]))
    assert_one_line_error(lambda: load_miniimagenet(root), "not a MiniImageNet pickle")
    path.write_bytes(pickle.dumps({"image_data": os.system, "class_dict": {}}))  # code, not data
    assert_one_line_error(lambda: load_miniimagenet(root), "corrupt pickle", "refusing")
    blob = pickle.loads(good)
    blob["class_dict"][packaged_classes("val")[0]] = [0, 10_000]
    path.write_bytes(pickle.dumps(blob))
    assert_one_line_error(lambda: load_miniimagenet(root), "indexes past image_data")


def test_missing_and_extra_classes(tmp_path):
    root = write_folders_layout(tmp_path / "mini", per_class=2)
    gone = packaged_classes("train")[:7]
    for wnid in gone:
        shutil.rmtree(root / "train" / wnid)
    message = assert_one_line_error(lambda: load_miniimagenet(root), "missing 7", *gone[:5])
    assert "found 57, expected the 64" in message
    for wnid in gone:
        shutil.copytree(root / "val" / packaged_classes("val")[0], root / "train" / wnid)
    shutil.copytree(root / "val" / packaged_classes("val")[0], root / "train" / "n99999999")
    assert_one_line_error(lambda: load_miniimagenet(root), "1 not in the split (n99999999)")

    pkl = write_pickle_layout(tmp_path / "pkl", per_class=2)
    path = pkl / "mini-imagenet-cache-test.pkl"
    blob = pickle.loads(path.read_bytes())
    del blob["class_dict"][packaged_classes("test")[3]]
    path.write_bytes(pickle.dumps(blob))
    assert_one_line_error(lambda: load_miniimagenet(pkl), "missing 1", packaged_classes("test")[3])


def test_too_few_images(tmp_path):
    wnid = packaged_classes("val")[2]
    root = write_pickle_layout(tmp_path / "mini", per_class={wnid: 1})
    assert_one_line_error(lambda: load_miniimagenet(root), "fewer than 2", wnid)


def test_unreadable_images(tmp_path):
    root = write_folders_layout(tmp_path / "mini", per_class=2)
    path = root / "test" / packaged_classes("test")[0] / f"{packaged_classes('test')[0]}_0001.jpg"
    good = path.read_bytes()
    for bad in (b"not a jpeg", good[:200]):
        path.write_bytes(bad)
        assert_one_line_error(lambda: load_miniimagenet(root), "cannot read image", str(path))


def test_csv_layout_with_images_missing(tmp_path):
    # images/ but no CSVs: the packaged CSVs name 60,000 files that are not there.
    root = write_csv_layout(tmp_path / "mini", per_class=2, csv_dir=tmp_path / "elsewhere")
    assert_one_line_error(
        lambda: load_miniimagenet(root), "are missing from", "prepare_miniimagenet.py"
    )
    (root / "train.csv").write_text("a,b\n")
    assert_one_line_error(lambda: load_miniimagenet(root), "header filename,label")


# ---- scripts/prepare_miniimagenet.py ----


def load_prepare_script():
    spec = importlib.util.spec_from_file_location(
        "prepare_miniimagenet", REPO / "scripts" / "prepare_miniimagenet.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_split_files(folder: Path, indices: list[int]) -> Path:
    """CSVs naming images `indices` (1-based) of every class, plus the class lists."""
    folder.mkdir(parents=True)
    for split in SPLITS:
        lines = ["filename,label"]
        lines += [f"{w}{k:08d}.jpg,{w}" for w in packaged_classes(split) for k in indices]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
        shutil.copy(mi.SPLIT_FILES / f"{split}_classes.txt", folder)
    return folder


def test_prepare_round_trip(tmp_path):
    prep = load_prepare_script()
    # Numeric order 2, 7, 10, 33 differs from name order _10, _2, _33, _7: index 1, 2, 4
    # must pick _2, _7 and _33.
    imagenet = write_fake_imagenet(tmp_path / "imagenet", numbers=[2, 10, 33, 7])
    splits = write_split_files(tmp_path / "splits", indices=[1, 2, 4])
    out = tmp_path / "out"
    assert prep.prepare(imagenet, out, splits_dir=splits) == 300
    assert prep.prepare(imagenet, out, splits_dir=splits) == 0  # finished files are kept
    assert (out / "val.csv").read_bytes() == (splits / "val.csv").read_bytes()
    data = load_miniimagenet(out)  # the csv layout, from the CSVs copied beside images/
    assert data.images["train"].shape == (64, 3, 3, 84, 84)

    def picked(ci, j):
        return imagenet_colour(ci, [2, 7, 33][j])

    assert (corner_colours(data) - expected_colours(3, picked)).abs().max() <= 3


def test_prepare_errors(tmp_path, capsys):
    prep = load_prepare_script()
    imagenet = write_fake_imagenet(tmp_path / "imagenet", numbers=[1, 2])
    splits = write_split_files(tmp_path / "splits", indices=[1, 3])
    assert_one_line_error(
        lambda: prep.prepare(imagenet, tmp_path / "out", splits_dir=splits), "holds 2"
    )
    shutil.rmtree(imagenet / packaged_classes("train")[0])
    assert_one_line_error(
        lambda: prep.prepare(imagenet, tmp_path / "out", splits_dir=splits),
        f"no class folder {imagenet / packaged_classes('train')[0]}",
    )
    assert prep.main(["--imagenet", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "error: no folder" in capsys.readouterr().err


def test_packaged_split_files():
    for split, n in SIZES.items():
        lines = (mi.SPLIT_FILES / f"{split}.csv").read_text().splitlines()
        assert lines[0] == "filename,label" and len(lines) == 1 + 600 * n
        assert list(dict.fromkeys(x.split(",")[1] for x in lines[1:])) == packaged_classes(split)
    assert "Twitter" in (mi.SPLIT_FILES / "LICENSE.meta-learning-lstm").read_text()
    assert np.unique([w for _, w in all_classes()]).size == 100
