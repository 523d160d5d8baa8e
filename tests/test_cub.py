"""CUB-200-2011 on a generated `CUB_200_2011.tgz` and its extracted folder: the 100/50/50
split, pixels, the bounding-box crop, unequal class sizes and one-line errors. No network."""

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from metatrain.data import cub
from metatrain.errors import MetatrainError


def all_classes() -> list[str]:
    return sorted(c for s in cub.SPLITS for c in cub.packaged(s))


def colour(ci: int, k: int) -> tuple[int, int, int]:
    return (ci % 256, (3 * k + 1) % 256, (ci // 256) * 100 + 7)


def image_bytes(ci: int, k: int) -> bytes:
    """40x30: the bird (right half, the bounding box) in the class colour, the rest grey.
    PNG bytes under a .jpg name: PIL reads by content, and the pixels stay exact."""
    arr = np.full((30, 40, 3), 128, np.uint8)
    arr[:, 20:] = colour(ci, k)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_cub(root, per_class=3, short=None, extracted=False):
    """The official layout; class `short` holds one image fewer."""
    files, images, boxes, i = {}, [], [], 1
    for ci, c in enumerate(all_classes()):
        for k in range(per_class - (c == short)):
            rel = f"{c}/{c.split('.')[1]}_{k:04d}.jpg"
            files[f"images/{rel}"] = image_bytes(ci, k)
            images.append(f"{i} {rel}")
            boxes.append(f"{i} 20.0 0.0 20.0 30.0")
            i += 1
    files["images.txt"] = ("\n".join(images) + "\n").encode()
    files["bounding_boxes.txt"] = ("\n".join(boxes) + "\n").encode()
    root.mkdir(parents=True, exist_ok=True)
    if extracted:
        for name, data in files.items():
            (root / cub.FOLDER / name).parent.mkdir(parents=True, exist_ok=True)
            (root / cub.FOLDER / name).write_bytes(data)
        return root
    with tarfile.open(root / cub.TGZ, "w:gz") as tar:  # images first, texts last, as in a tar
        for name in sorted(files, key=lambda n: not n.startswith("images/")):
            info = tarfile.TarInfo(f"{cub.FOLDER}/{name}")
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return root


@pytest.fixture
def official(tmp_path, monkeypatch):
    root = write_cub(tmp_path / "cub")
    md5 = hashlib.md5((root / cub.TGZ).read_bytes()).hexdigest()
    monkeypatch.setattr(cub, "ARCHIVE", cub.Remote("http://127.0.0.1:9/CUB.tgz", md5))
    return root


def test_split_shapes_and_pixels(official):
    data = cub.load_cub(official, 16)
    names = all_classes()
    for split, n in {"train": 100, "val": 50, "test": 50}.items():
        assert data.images[split].shape == (n, 3, 3, 16, 16)
        assert data.classes[split] == cub.packaged(split)
        for ci, c in enumerate(data.classes[split]):
            right = data.images[split][ci, :, :, :, -1].float().mean(-1)  # (3, C)
            want = torch.tensor([colour(names.index(c), k) for k in range(3)], dtype=torch.float)
            assert (right - want).abs().max() <= 1, c
            assert (data.images[split][ci, :, :, :, 0] == 128).all()  # left half: background
    assert (official / "cub_16.pt").is_file()


def test_bbox_crop_keeps_only_the_bird(official):
    data = cub.load_cub(official, 8, bbox_crop=True)
    names = all_classes()
    c = data.classes["test"][4]
    want = torch.tensor(colour(names.index(c), 2), dtype=torch.uint8)
    assert (data.images["test"][4, 2].permute(1, 2, 0) == want).all()
    assert (official / "cub_8_bbox.pt").is_file()


def test_folder_layout_matches_the_archive(official, tmp_path):
    folder = write_cub(tmp_path / "folder", extracted=True)
    a, b = cub.load_cub(official, 12), cub.load_cub(folder, 12, download=False)
    for s in cub.SPLITS:
        assert torch.equal(a.images[s], b.images[s])


def test_unequal_classes_keep_every_image(tmp_path):
    short = cub.packaged("val")[7]
    root = write_cub(tmp_path / "cub", short=short, extracted=True)
    data = cub.load_cub(root, 8, download=False)
    assert data.images["val"].shape == (50, 3, 3, 8, 8)
    assert data.counts["val"].tolist() == [3] * 7 + [2] + [3] * 42
    assert data.counts["train"].tolist() == [3] * 100
    names = all_classes()
    for k in range(2):  # the short class's images, in image-id order
        want = torch.tensor(colour(names.index(short), k), dtype=torch.float)
        assert (data.images["val"][7, k, :, :, -1].float().mean(-1) - want).abs().max() <= 1
    assert (data.images["val"][7, 2] == 0).all()  # its padding row


def test_errors_are_one_line(official, tmp_path):
    def one_line(fn, *fragments):
        with pytest.raises(MetatrainError) as info:
            fn()
        assert "\n" not in str(info.value)
        for f in fragments:
            assert f in str(info.value), str(info.value)

    one_line(lambda: cub.load_cub(tmp_path / "none", download=False), cub.ARCHIVE.url)
    tgz = official / cub.TGZ
    tgz.write_bytes(tgz.read_bytes()[:5000])
    one_line(lambda: cub.load_cub(official), "truncated", "nothing was deleted")
    assert tgz.stat().st_size == 5000
