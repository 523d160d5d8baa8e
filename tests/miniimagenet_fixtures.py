"""Small generated MiniImageNet copies in each distribution layout (see data/miniimagenet.py).

Every image is a solid colour that encodes its class (the class's index over train + val + test
in the packaged order) and its index within the class, with a deterministic noise patch in the
top-left quarter so that the content is not trivially constant. Tests read the colour back from
the bottom-right corner: it survives JPEG and resizing, so class and image order can be checked
after any layout.
"""

import csv
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from metatrain.data.miniimagenet import SPLITS, packaged_classes


def all_classes() -> list[tuple[str, str]]:
    """(split, wnid) for the 100 classes, in packaged order: index = colour class index."""
    return [(s, c) for s in SPLITS for c in packaged_classes(s)]


def colour(class_index: int, image_index: int) -> tuple[int, int, int]:
    """Distinct per class (red, blue) and per image (green, while image_index < 6);
    larger fixtures wrap the green channel around."""
    return 20 + 2 * class_index, (30 + 40 * image_index) % 256, 220 - 2 * class_index


def pixels(class_index: int, image_index: int, size: int = 84) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)  # (H, W, C)
    img[:] = colour(class_index, image_index)
    rng = np.random.default_rng(1000 * class_index + image_index)
    q = size // 4
    img[:q, :q] = rng.integers(0, 256, (q, q, 3), dtype=np.uint8)
    return img


def _counts(per_class: int | dict[str, int], wnid: str) -> int:
    """per_class is one count for every class, or {wnid: count} with 4 for the others."""
    return per_class.get(wnid, 4) if isinstance(per_class, dict) else per_class


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_csv_layout(
    root: Path, per_class: int | dict[str, int] = 4, size: int = 84, csv_dir: Path | None = None
) -> Path:
    """root/images/<wnid><8-digit index>.jpg and the CSVs (in csv_dir, default root)."""
    root, csv_dir = Path(root), Path(csv_dir or root)
    csv_dir.mkdir(parents=True, exist_ok=True)
    rows = {s: [] for s in SPLITS}
    for ci, (split, wnid) in enumerate(all_classes()):
        for j in range(_counts(per_class, wnid)):
            name = f"{wnid}{j + 1:08d}.jpg"
            _save(pixels(ci, j, size), root / "images" / name)
            rows[split].append((name, wnid))
    for split in SPLITS:
        with open(csv_dir / f"{split}.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([("filename", "label"), *rows[split]])
    return root


def write_folders_layout(
    root: Path, per_class: int | dict[str, int] = 4, size: int = 84, ext: str = ".jpg"
) -> Path:
    """root/<split>/<wnid>/<wnid>_<index>.<ext>; names sort in image order."""
    root = Path(root)
    for ci, (split, wnid) in enumerate(all_classes()):
        for j in range(_counts(per_class, wnid)):
            _save(pixels(ci, j, size), root / split / wnid / f"{wnid}_{j:04d}{ext}")
    return root


def write_pickle_layout(
    root: Path,
    per_class: int | dict[str, int] = 4,
    size: int = 84,
    val_name: str = "val",
    protocol: int | str = 4,
) -> Path:
    """root/mini-imagenet-cache-<split>.pkl; rows shuffled so class_dict indices matter.
    protocol="py2" writes the files as Python 2 did."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        images, owners = [], []
        for ci, (s, wnid) in enumerate(all_classes()):
            if s == split:
                for j in range(_counts(per_class, wnid)):
                    images.append(pixels(ci, j, size))
                    owners.append(wnid)
        order = np.random.default_rng(len(images)).permutation(len(images))
        image_data = np.stack(images)[order]  # (N, H, W, 3), row r holds images[order[r]]
        class_dict = {}
        for row, source in enumerate(order):
            class_dict.setdefault(owners[source], []).append((source, row))
        class_dict = {w: [row for _, row in sorted(v)] for w, v in class_dict.items()}
        name = val_name if split == "val" else split
        path = root / f"mini-imagenet-cache-{name}.pkl"
        if protocol == "py2":
            path.write_bytes(py2_pickle(image_data, class_dict))
        else:
            with open(path, "wb") as f:
                blob = {"image_data": image_data, "class_dict": class_dict}
                pickle.dump(blob, f, protocol=protocol)
    return root


def py2_pickle(image_data: np.ndarray, class_dict: dict[str, list[int]]) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) wrote for such a dict: str (not bytes) payloads
    and numpy.core names, which Python 3 reads only with encoding="latin1"."""

    def text(x: str) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(x)]) + x.encode()

    def num(x: int) -> bytes:  # BININT
        return b"J" + struct.pack("<i", x)

    shape = b"(" + b"".join(num(d) for d in image_data.shape) + b"t"
    dtype = b"cnumpy\ndtype\n" + text("u1") + num(0) + num(1) + b"\x87R("
    dtype += num(3) + text("|") + b"NNN" + num(-1) + num(-1) + num(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + num(0) + b"\x85"
    array += text("b") + b"\x87R(" + num(1) + shape + dtype + b"\x89T"  # NEWFALSE, BINSTRING
    array += struct.pack("<I", image_data.nbytes) + image_data.tobytes() + b"tb"
    classes = b"}(" + b"".join(
        text(k) + b"](" + b"".join(num(i) for i in v) + b"e" for k, v in class_dict.items()
    )
    body = text("image_data") + array + text("class_dict") + classes + b"u"
    return b"\x80\x02}(" + body + b"u."


def imagenet_colour(class_index: int, number: int) -> tuple[int, int, int]:
    """Colour of the fake ImageNet file <wnid>_<number>.JPEG (number < 40)."""
    return 20 + 2 * class_index, 30 + 5 * number, 90


def write_fake_imagenet(root: Path, numbers: list[int], size: tuple[int, int] = (60, 45)) -> Path:
    """An ILSVRC-2012-like train folder root/<wnid>/<wnid>_<number>.JPEG for the 100 classes,
    non-square like ImageNet photos."""
    root = Path(root)
    for ci, (_, wnid) in enumerate(all_classes()):
        for n in numbers:
            img = np.empty((size[1], size[0], 3), dtype=np.uint8)  # (H, W, C)
            img[:] = imagenet_colour(ci, n)
            path = root / wnid / f"{wnid}_{n}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path, format="JPEG", quality=95)
    return root
