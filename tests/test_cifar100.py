"""CIFAR-FS and FC100 on a generated `cifar-100-python.tar.gz`: class splits, pixels, the
cache, the extracted folder, the md5 check and one-line errors. CPU, no network."""

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from metatrain.config import register_schemas
from metatrain.data import cifar100 as c100
from metatrain.datasets import load_splits
from metatrain.errors import MetatrainError
from tests.conftest import make_cfg

PER_SPLIT = {"train": 3, "test": 1}  # images per class in each file (the real: 500 and 100)


def fine_names() -> list[str]:
    return sorted(c for s in c100.SPLITS for c in c100.packaged("cifarfs", s))


def coarse_names() -> list[str]:
    return sorted(c for s in c100.SPLITS for c in c100.packaged("fc100", s))


def coarse_of(i: int) -> int:
    return i % 20  # any 5-per-superclass assignment; the reader must follow the file's


def pixel(fine: int, part: str, k: int) -> int:
    """The constant value of image k of class `fine` in file `part`."""
    return (7 * fine + 50 * (part == "test") + 3 * k) % 256


def write_cifar100(root, *, extracted=False):
    files = {"meta": {"fine_label_names": fine_names(), "coarse_label_names": coarse_names()}}
    for part, n in PER_SPLIT.items():
        labels = [i for k in range(n) for i in range(100)]  # interleaved, as in the real files
        ks = [k for k in range(n) for _ in range(100)]
        data = np.stack([np.full(3072, pixel(i, part, k), np.uint8) for i, k in zip(labels, ks)])
        data[:, 1024:2048] = 0  # green plane zero: checks the (C, H, W) row layout
        files[part] = {
            "data": data,
            "fine_labels": labels,
            "coarse_labels": [coarse_of(i) for i in labels],
        }
    root.mkdir(parents=True, exist_ok=True)
    blobs = {m: pickle.dumps(v, protocol=2) for m, v in files.items()}
    if extracted:
        (root / c100.FOLDER).mkdir()
        for m, b in blobs.items():
            (root / c100.FOLDER / m).write_bytes(b)
        return root
    with tarfile.open(root / c100.TGZ, "w:gz") as tar:
        for m, b in blobs.items():
            info = tarfile.TarInfo(f"{c100.FOLDER}/{m}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    return root


@pytest.fixture
def archive(tmp_path, monkeypatch):
    root = write_cifar100(tmp_path / "cifar")
    md5 = hashlib.md5((root / c100.TGZ).read_bytes()).hexdigest()
    monkeypatch.setattr(c100, "ARCHIVE", c100.Remote("http://127.0.0.1:9/c.tgz", md5))
    return root


def check_pixels(split_images, classes):
    fine = fine_names()
    for ci, name in enumerate(classes):
        i = fine.index(name)
        want = [pixel(i, "train", k) for k in range(3)] + [pixel(i, "test", 0)]
        red = split_images[ci, :, 0, 5, 5].tolist()
        assert red == want, name
        assert split_images[ci, :, 1].max() == 0


def test_cifarfs_splits_and_pixels(archive):
    data = c100.read_cifarfs(make_cfg("dataset=cifarfs").dataset, archive)
    for split, n in {"train": 64, "val": 16, "test": 20}.items():
        assert data.images[split].shape == (n, 4, 3, 32, 32)
        assert data.images[split].dtype == torch.uint8
        assert data.classes[split] == c100.packaged("cifarfs", split)
        check_pixels(data.images[split], data.classes[split])
    assert (archive / "cifar100_32.pt").is_file()


def test_fc100_follows_the_superclasses(archive):
    data = c100.read_fc100(make_cfg("dataset=fc100").dataset, archive)
    fine, coarse = fine_names(), coarse_names()
    for split, n in {"train": 60, "val": 20, "test": 20}.items():
        supers = set(c100.packaged("fc100", split))
        assert data.images[split].shape == (n, 4, 3, 32, 32)
        assert all(coarse[coarse_of(fine.index(c))] in supers for c in data.classes[split])
        check_pixels(data.images[split], data.classes[split])
    seen = [c for s in c100.SPLITS for c in data.classes[s]]
    assert sorted(seen) == fine


def test_through_the_config_and_registry(archive):
    register_schemas()
    cfg = make_cfg("dataset=cifarfs", f"dataset.root={archive}", "dataset.image_size=16")
    data = load_splits(cfg.dataset)
    assert data.images["val"].shape == (16, 4, 3, 16, 16)
    assert (archive / "cifar100_16.pt").is_file()


def test_extracted_folder_and_cache_reuse(tmp_path, monkeypatch):
    root = write_cifar100(tmp_path / "cifar", extracted=True)
    first = c100.load_cifar100(root, download=False)

    def fail(*a, **k):
        raise AssertionError("decoded again although the cache is fresh")

    monkeypatch.setattr(c100, "_build", fail)
    again = c100.load_cifar100(root, download=False)
    assert torch.equal(first.images, again.images) and first.coarse == again.coarse


def test_splits_shipped_are_disjoint_and_complete():
    fs = [c for s in c100.SPLITS for c in c100.packaged("cifarfs", s)]
    assert len(fs) == len(set(fs)) == 100
    assert [len(c100.packaged("cifarfs", s)) for s in c100.SPLITS] == [64, 16, 20]
    fc = [c for s in c100.SPLITS for c in c100.packaged("fc100", s)]
    assert len(fc) == len(set(fc)) == 20
    assert [len(c100.packaged("fc100", s)) for s in c100.SPLITS] == [12, 4, 4]


def one_line(fn, *fragments):
    with pytest.raises(MetatrainError) as info:
        fn()
    assert "\n" not in str(info.value)
    for f in fragments:
        assert f in str(info.value), str(info.value)
    print(info.value)


def test_errors(archive, tmp_path):
    one_line(lambda: c100.load_cifar100(tmp_path / "none", download=False), c100.ARCHIVE.url)
    tgz = archive / c100.TGZ
    body = tgz.read_bytes()
    tgz.write_bytes(body[: len(body) // 2])  # the user's file, cut short
    one_line(lambda: c100.load_cifar100(archive), str(tgz), "has md5", "nothing was deleted")
    assert tgz.read_bytes() == body[: len(body) // 2]
