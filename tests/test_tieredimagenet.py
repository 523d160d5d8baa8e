"""tieredImageNet readers on generated fixtures in the three layouts in circulation (PNG
pickles, decoded BGR arrays, class folders): shapes, pixels and channel order, agreement
between layouts, unequal class sizes and one-line errors. CPU, no network."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from metatrain.data import tieredimagenet as ti
from metatrain.errors import MetatrainError

SIZES = {"train": 351, "val": 97, "test": 160}


def rgb(s: str, c: int, k: int) -> tuple[int, int, int]:
    return ((c * 7) % 256, (k * 40 + 5) % 256, {"train": 10, "val": 120, "test": 230}[s])


def picture(s, c, k, size=ti.SIZE) -> np.ndarray:
    """(size, size, 3) RGB: a class colour with a 4x4 marker in the top-left corner."""
    arr = np.empty((size, size, 3), np.uint8)
    arr[:] = rgb(s, c, k)
    arr[:4, :4] = (255, 0, 0)
    return arr


def counts(split, per_class, short):
    return [per_class - (split == "val" and c == short) for c in range(SIZES[split])]


def write_pickles(root, layout, per_class=2, short=None, protocol=4):
    root.mkdir(parents=True)
    for s in ti.SPLITS:
        labels, images = [], []
        n = counts(s, per_class, short)
        for k in range(per_class):  # classes interleaved; each class's images in order k
            for c in range(SIZES[s]):
                if k < n[c]:
                    labels.append(c)
                    images.append(picture(s, c, k))
        labels = np.asarray(labels, np.int32)
        names = [f"class {s} {c}" for c in range(SIZES[s])]
        meta = {"label_specific": labels, "label_specific_str": names, "label_general": labels}
        (root / f"{s}_labels.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
        if layout == "png":
            encoded = []
            for im in images:
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                encoded.append(np.frombuffer(buf.getvalue(), np.uint8).reshape(-1, 1))
            (root / f"{s}_images_png.pkl").write_bytes(pickle.dumps(encoded, protocol=protocol))
        else:
            np.savez(root / f"{s}_images.npz", images=np.stack(images)[..., ::-1])  # BGR
    return root


def write_folders(root, per_class=2):
    for s in ti.SPLITS:
        for c, (wnid, _) in enumerate(ti.packaged(s)):
            (root / s / wnid).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(picture(s, c, k)).save(root / s / wnid / f"{wnid}_{k}.png")
    return root


def check(data, names_are_wnids):
    for s, n in SIZES.items():
        assert data.images[s].shape == (n, 2, 3, 84, 84) and data.images[s].dtype == torch.uint8
        for c in (0, n // 2, n - 1):
            for k in range(2):
                assert data.images[s][c, k, :, -1, -1].tolist() == list(rgb(s, c, k))
                assert data.images[s][c, k, :, 0, 0].tolist() == [255, 0, 0]  # red stays red
        if names_are_wnids:
            assert data.classes[s] == [w for w, _ in ti.packaged(s)]


@pytest.mark.parametrize("layout", ti.LAYOUTS)
def test_each_layout(tmp_path, layout):
    root = tmp_path / "tiered"
    if layout == "folders":
        write_folders(root)
    else:
        write_pickles(root, layout)
    data = ti.load_tieredimagenet(root)  # auto-detected
    check(data, layout == "folders")
    assert (root / f"tieredimagenet_{layout}_84.pt").is_file()


def test_layouts_agree_and_python2_pickles_load(tmp_path):
    png = ti.load_tieredimagenet(write_pickles(tmp_path / "png", "png", protocol=2), layout="png")
    npz = ti.load_tieredimagenet(write_pickles(tmp_path / "npz", "npz"), layout="npz")
    for s in ti.SPLITS:
        assert torch.equal(png.images[s], npz.images[s])
        assert png.classes[s] == npz.classes[s] == [f"class {s} {c}" for c in range(SIZES[s])]


def test_unequal_classes_keep_every_image(tmp_path):
    root = write_pickles(tmp_path / "t", "npz", per_class=3, short=5)
    data = ti.load_tieredimagenet(root)
    assert data.images["val"].shape == (97, 3, 3, 84, 84)
    assert data.counts["val"].tolist() == counts("val", 3, 5)
    assert data.counts["train"].tolist() == [3] * 351
    for c in (4, 5, 6):  # the short class and its neighbours: every image in its own order
        for k in range(data.counts["val"][c]):
            assert data.images["val"][c, k, :, -1, -1].tolist() == list(rgb("val", c, k))
    assert (data.images["val"][5, 2] == 0).all()  # the short class's padding row


def one_line(fn, *fragments):
    with pytest.raises(MetatrainError) as info:
        fn()
    assert "\n" not in str(info.value)
    for f in fragments:
        assert f in str(info.value), str(info.value)


def test_errors(tmp_path):
    one_line(lambda: ti.load_tieredimagenet(tmp_path / "none"), "no folder")
    (tmp_path / "empty").mkdir()
    one_line(lambda: ti.load_tieredimagenet(tmp_path / "empty"), "no tieredImageNet layout")
    root = write_pickles(tmp_path / "t", "png")
    (root / "test_images_png.pkl").write_bytes(b"garbage")
    one_line(lambda: ti.load_tieredimagenet(root), "corrupt pickle", "test_images_png.pkl")
    meta = {"label_specific": np.zeros(3, np.int32), "label_specific_str": ["a", "b"]}
    (root / "val_labels.pkl").write_bytes(pickle.dumps(meta))
    one_line(lambda: ti.load_tieredimagenet(root), "2 classes, expected the 97")
    folders = write_folders(tmp_path / "f", per_class=2)
    wnid = ti.packaged("test")[3][0]
    for p in (folders / "test" / wnid).iterdir():
        p.unlink()
    (folders / "test" / wnid).rmdir()
    one_line(lambda: ti.load_tieredimagenet(folders), "found 159, expected the 160", wnid)


def test_packaged_split():
    rows = {s: ti.packaged(s) for s in ti.SPLITS}
    assert {s: len(r) for s, r in rows.items()} == SIZES
    supers = [{c for _, c in rows[s]} for s in ti.SPLITS]
    assert [len(x) for x in supers] == [20, 6, 8]
    assert not (supers[0] & supers[1] or supers[0] & supers[2] or supers[1] & supers[2])
