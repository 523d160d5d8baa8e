"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes in 34 super-categories, split by
super-category into 351 / 97 / 160 classes (tieredimagenet_splits/, with its source), 84x84.

Read from any of the distributions in circulation under `root`:

1. png      `{train,val,test}_images_png.pkl`, a pickled list of PNG-encoded images, with
            `{split}_labels.pkl`, a dict whose `label_specific` gives each image's class index
            into `label_specific_str` (Ren et al.'s release; learn2learn's copy).
2. npz      `{split}_images.npz` holding `images` (N, 84, 84, 3) uint8 with the same labels
            pickles (the arrays Ren et al.'s code decodes the PNGs into; MetaOptNet's copy).
            Those arrays came from OpenCV and are BGR: flipped to RGB here.
3. folders  `train|val|test/<wnid>/<image>`, any format PIL reads (tiered-imagenet-tools).

`layout=auto` picks png, else npz, else folders. The folders layout is checked against the
packaged class lists; the pickled ones name classes by their `label_specific_str` (English
names, not wnids), so there the class counts are checked. Classes hold 732 to 1300 images, all
kept: a split is stored padded to its largest class with each class's count beside it
(FewShotSplits.counts). The decoded images are cached once (data/cache.py says where); a cache
larger than the memory budget is read memory-mapped (data/store.py, dataset.in_memory).
"""

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metatrain.config import DatasetConfig
from metatrain.data import FewShotSplits
from metatrain.data.cache import cache_path, fingerprint, load_cache, store_cache
from metatrain.data.miniimagenet import _ArraysOnly, _list_folders, _read_image
from metatrain.errors import MetatrainError
from metatrain.registry import DATASETS

SPLITS = ("train", "val", "test")
LAYOUTS = ("png", "npz", "folders")
SPLIT_FILES = Path(__file__).with_name("tieredimagenet_splits")
SIZE = 84
HELP = (
    "expected {split}_images_png.pkl + {split}_labels.pkl, {split}_images.npz + "
    "{split}_labels.pkl, or train|val|test/<wnid>/ image folders"
)


@dataclass
class TieredImageNetConfig(DatasetConfig):
    name: str = "tieredimagenet"
    image_size: int = SIZE
    channels: int = 3
    queries: int = 15
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ImageNet's
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    layout: str = "auto"  # auto | png | npz | folders


@DATASETS.register("tieredimagenet", TieredImageNetConfig)
def read_tieredimagenet(cfg, root: Path) -> FewShotSplits:
    return load_tieredimagenet(root, cfg.image_size, cfg.layout)


def packaged(split: str) -> list[tuple[str, str]]:
    """(class wnid, super-category wnid) rows of the split, in file order."""
    with open(SPLIT_FILES / f"{split}.csv", newline="") as f:
        return [(r[0], r[1]) for r in csv.reader(f) if r]


def detect_layout(root: Path) -> str:
    if (root / "train_images_png.pkl").is_file():
        return "png"
    if (root / "train_images.npz").is_file():
        return "npz"
    if (root / "train").is_dir():
        return "folders"
    raise MetatrainError(f"no tieredImageNet layout recognised under {root}: {HELP}")


def load_tieredimagenet(root, size: int = SIZE, layout: str = "auto") -> FewShotSplits:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MetatrainError(f"tieredImageNet not found: no folder {root}; {HELP}")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise MetatrainError(f"unknown tieredImageNet layout {layout!r}: use auto, {LAYOUTS}")
    if layout == "folders":
        listed = {}
        for s in SPLITS:
            by_class, where = _list_folders(root, s)
            want = [w for w, _ in packaged(s)]
            if sorted(by_class) != sorted(want):
                missing = sorted(set(want) - set(by_class))[:3]
                raise MetatrainError(
                    f"tieredImageNet {s} classes in {where}: found {len(by_class)}, expected the "
                    f"{len(want)} of Ren et al.'s split (missing e.g. {missing}); fix the data"
                )
            listed[s] = {w: by_class[w] for w in want}
        files = [p for s in SPLITS for ps in listed[s].values() for p in ps]
    else:
        suffix = "_images_png.pkl" if layout == "png" else "_images.npz"
        files = []
        for s in SPLITS:
            for name in (f"{s}{suffix}", f"{s}_labels.pkl"):
                if not (root / name).is_file():
                    raise MetatrainError(f"{layout} layout: no {root / name}; {HELP}")
                files.append(root / name)
    # ("classes", 1, 0): padded splits with counts (caches from before kept the smallest count)
    fp = fingerprint(files) + [("tieredimagenet", size, 1), ("classes", 1, 0)]
    path = cache_path(root, f"tieredimagenet_{layout}_{size}.pt")
    blob = load_cache(path, fp)
    if blob is None:
        print(f"tieredImageNet: decoding {layout} files into {path} (once)", flush=True)
        blob = {}
        for s in SPLITS:
            if layout == "folders":
                blob[s], blob[f"{s}_counts"], blob[f"{s}_names"] = _from_folders(listed[s], s, size)
            else:
                split = _from_pickles(root, s, layout, size)
                blob[s], blob[f"{s}_counts"], blob[f"{s}_names"] = split
        store_cache(path, fp, **blob)
    return FewShotSplits(
        images={s: blob[s] for s in SPLITS},
        classes={s: list(blob[f"{s}_names"]) for s in SPLITS},
        counts={s: blob[f"{s}_counts"] for s in SPLITS},
    )


def _padded(split: str, counts: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros (classes, largest count, 3, size, size) to fill, and the counts (classes,)."""
    if min(counts) < 2:
        raise MetatrainError(f"tieredImageNet {split}: a class holds fewer than 2 images")
    out = torch.zeros((len(counts), max(counts), 3, size, size), dtype=torch.uint8)
    return out, torch.tensor(counts, dtype=torch.int64)


def _from_folders(by_class: dict, split: str, size: int):
    out, counts = _padded(split, [len(v) for v in by_class.values()], size)
    for i, paths in enumerate(by_class.values()):
        for j, p in enumerate(paths):
            out[i, j] = torch.from_numpy(_read_image(p, size)).permute(2, 0, 1)
    return out, counts, list(by_class)


def _unpickle(path: Path):
    with open(path, "rb") as f:
        try:
            try:
                return _ArraysOnly(f).load()
            except UnicodeDecodeError:  # a Python 2 pickle: numpy's bytes need latin1
                f.seek(0)
                return _ArraysOnly(f, encoding="latin1").load()
        except Exception as e:  # noqa: BLE001 - bad bytes raise nearly any type: all mean corrupt
            raise MetatrainError(
                f"corrupt pickle {path} ({type(e).__name__}); re-download it"
            ) from None


def _labels(path: Path) -> tuple[np.ndarray, list[str]]:
    blob = _unpickle(path)
    if isinstance(blob, dict):
        blob = {k.decode() if isinstance(k, bytes) else k: v for k, v in blob.items()}
    if not isinstance(blob, dict) or not {"label_specific", "label_specific_str"} <= set(blob):
        raise MetatrainError(
            f"{path} is not a tieredImageNet labels pickle (a dict with label_specific and "
            "label_specific_str); re-download it"
        )
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in blob["label_specific_str"]]
    return np.asarray(blob["label_specific"], dtype=np.int64), names


def _from_pickles(root: Path, split: str, layout: str, size: int):
    labels, names = _labels(root / f"{split}_labels.pkl")
    expected = len(packaged(split))
    if len(names) != expected or labels.min() < 0 or labels.max() >= len(names):
        raise MetatrainError(
            f"{root / f'{split}_labels.pkl'}: {len(names)} classes, expected the {expected} of "
            f"Ren et al.'s {split} split; re-download it"
        )
    if layout == "png":
        images = _unpickle(root / f"{split}_images_png.pkl")  # N encoded PNGs
    else:
        with np.load(root / f"{split}_images.npz") as z:
            images = z["images"]  # (N, 84, 84, 3) BGR
        if images.dtype != np.uint8 or images.shape[1:] != (SIZE, SIZE, 3):
            raise MetatrainError(
                f"{root / f'{split}_images.npz'} holds {images.dtype} {images.shape[1:]}, "
                f"expected uint8 ({SIZE}, {SIZE}, 3); re-download it"
            )
    if len(images) != len(labels):
        raise MetatrainError(
            f"tieredImageNet {split}: {len(images)} images but {len(labels)} labels in {root}; "
            "re-download both"
        )
    rows = [np.flatnonzero(labels == c) for c in range(len(names))]  # each class's images
    out, counts = _padded(split, [len(r) for r in rows], size)  # (classes, max n, C, H, W)
    for c, idx in enumerate(rows):
        for j, k in enumerate(idx):
            if layout == "png":
                im = _png(images[k], root / f"{split}_images_png.pkl", size)
            else:
                im = np.ascontiguousarray(images[k][..., ::-1])  # BGR -> RGB
                if size != SIZE:
                    im = np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
            out[c, j] = torch.from_numpy(im).permute(2, 0, 1)  # (3, size, size)
    return out, counts, names


def _png(encoded, where: Path, size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(np.asarray(encoded, dtype=np.uint8).tobytes())) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise MetatrainError(
            f"cannot decode a PNG in {where} ({' '.join(str(e).split())}); re-download it"
        ) from None
