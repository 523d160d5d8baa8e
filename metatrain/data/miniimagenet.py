"""MiniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split: 64 train, 16 val and
20 test classes of 600 images, read from any of the three common distributions under `root`:

1. csv      `train.csv val.csv test.csv` (header `filename,label`) beside `images/`, a flat
            folder of jpgs named as in the CSVs (`n0153282900000005.jpg`). Without CSVs under
            root the packaged ones are used. scripts/prepare_miniimagenet.py builds this one.
2. folders  `train|val|test/<wnid>/<any name>` with any image extension PIL reads (MAML++ code).
3. pickle   `mini-imagenet-cache-{train,val,test}.pkl` (val may be `...-validation.pkl`), each a
            dict with `image_data` (N, 84, 84, 3) uint8 and `class_dict` {wnid: [row indices]}
            (learn2learn). Pickles must hold 84x84 images, or image_size x image_size ones when
            image_size asks for another size: any other size means a non-standard copy, refused.

`layout="auto"` picks pickle if any pickle is there, else csv if `images/` is, else folders.
Classes come out in the order of the packaged `*_classes.txt`; a copy with missing or extra
classes is refused. Every class keeps the same number of images (the smallest count, with a
warning when counts differ) so that episodes are sampled by indexing.

The first load decodes everything into one uint8 file `miniimagenet_{layout}_{image_size}.pt`
(see data/cache.py for where it goes); later loads read only that file. It is rebuilt when the
fingerprint changes: name, size and mtime of every source image or pickle, plus the contents of
the CSVs and class lists. Stat-ing 60,000 files takes well under a second on a local disk and,
unlike a directory mtime, also sees a file rewritten in place.
"""

import csv
import hashlib
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metatrain.config import DatasetConfig
from metatrain.data import FewShotSplits
from metatrain.data.cache import cache_path, load_cache, store_cache
from metatrain.errors import MetatrainError
from metatrain.registry import DATASETS

SPLITS = ("train", "val", "test")
LAYOUTS = ("csv", "folders", "pickle")
SPLIT_FILES = Path(__file__).with_name("miniimagenet_splits")
PICKLE_SIZE = 84
READER_VERSION = 1  # bump when the decoded pixels would change, to invalidate old caches
HELP = (
    "expected images/ + train|val|test.csv, train|val|test/<wnid>/*.jpg, or "
    "mini-imagenet-cache-{train,val,test}.pkl; scripts/prepare_miniimagenet.py builds the "
    "first from an ImageNet train folder"
)


@dataclass
class MiniImageNetConfig(DatasetConfig):
    name: str = "miniimagenet"
    image_size: int = 84
    channels: int = 3
    queries: int = 15
    mean: list[float] = field(default_factory=lambda: [0.4721, 0.4533, 0.4100])
    std: list[float] = field(default_factory=lambda: [0.2772, 0.2677, 0.2845])
    layout: str = "auto"  # auto | csv | folders | pickle


@DATASETS.register("miniimagenet", MiniImageNetConfig)
def read_miniimagenet(cfg, root: Path) -> FewShotSplits:
    return load_miniimagenet(root, cfg.image_size, cfg.layout)


def packaged_classes(split: str) -> list[str]:
    return (SPLIT_FILES / f"{split}_classes.txt").read_text().split()


def load_miniimagenet(
    root: str | Path, image_size: int = 84, layout: str = "auto"
) -> FewShotSplits:
    """train/val/test as uint8 (classes, per_class, 3, image_size, image_size), classes in the
    packaged order; `layout` is auto, csv, folders or pickle (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MetatrainError(f"MiniImageNet not found: no folder {root}; {HELP}")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise MetatrainError(
            f"unknown MiniImageNet layout {layout!r}: use auto, {', '.join(LAYOUTS)}"
        )
    expected = {s: packaged_classes(s) for s in SPLITS}
    texts = [SPLIT_FILES / f"{s}_classes.txt" for s in SPLITS]
    if layout == "pickle":
        sources = {s: _pickle_file(root, s) for s in SPLITS}
        files = list(sources.values())
    else:
        sources = {}
        for s in SPLITS:
            by_class, where = _list_csv(root, s) if layout == "csv" else _list_folders(root, s)
            _check_classes(s, list(by_class), expected[s], where)
            sources[s] = by_class
            texts += [where] if layout == "csv" else []
        files = [p for s in SPLITS for c in expected[s] for p in sources[s][c]]
    fp = _fingerprint(root, layout, files, texts)
    path = cache_path(root, f"miniimagenet_{layout}_{image_size}.pt")
    images = load_cache(path, fp)
    if images is None:
        print(f"MiniImageNet: decoding {len(files)} {layout} files into {path} (once)", flush=True)
        images = {}
        for s in SPLITS:  # train first: the largest split is built while little else is held
            if layout == "pickle":
                images[s] = _build_from_pickle(sources[s], s, expected[s], image_size)
            else:
                images[s] = _build_from_files(sources[s], s, expected[s], image_size)
        store_cache(path, fp, **images)
    return FewShotSplits(images={s: images[s] for s in SPLITS}, classes=expected)


def detect_layout(root: Path) -> str:
    if any(root.glob("mini-imagenet-cache-*.pkl")):
        return "pickle"
    if (root / "images").is_dir():
        return "csv"
    if any((root / s).is_dir() for s in SPLITS):
        return "folders"
    raise MetatrainError(f"no MiniImageNet layout recognised under {root}: {HELP}")


def _list_csv(root: Path, split: str) -> tuple[dict[str, list[Path]], Path]:
    """{wnid: image paths in CSV order} and the CSV read (root's own, else the packaged one)."""
    table = root / f"{split}.csv"
    if not table.is_file():
        table = SPLIT_FILES / f"{split}.csv"
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise MetatrainError(f"{table} is not a MiniImageNet split file (header filename,label)")
    images = root / "images"
    if not images.is_dir():
        raise MetatrainError(f"csv layout: no folder {images}; {HELP}")
    present = set(os.listdir(images))  # one listing instead of 60,000 existence checks
    by_class: dict[str, list[Path]] = {}
    missing = []
    for name, label in (r[:2] for r in rows[1:] if r):
        if name not in present:
            missing.append(name)
        by_class.setdefault(label, []).append(images / name)
    if missing:
        raise MetatrainError(
            f"{len(missing)} of the {len(rows) - 1} images listed in {table} are missing from "
            f"{images} (first: {_few(missing)}); re-extract the images or rebuild them with "
            "scripts/prepare_miniimagenet.py"
        )
    return by_class, table


def _list_folders(root: Path, split: str) -> tuple[dict[str, list[Path]], Path]:
    """{wnid: image paths sorted by name} from root/split/<wnid>/."""
    top = root / split
    if not top.is_dir():
        raise MetatrainError(f"folders layout: no folder {top}; {HELP}")
    readable = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    by_class = {}
    for d in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
        by_class[d.name] = sorted(
            p for p in d.iterdir() if p.suffix.lower() in readable and not p.name.startswith(".")
        )
    return by_class, top


def _pickle_file(root: Path, split: str) -> Path:
    names = [f"mini-imagenet-cache-{split}.pkl"]
    names += ["mini-imagenet-cache-validation.pkl"] if split == "val" else []
    for name in names:
        if (root / name).is_file():
            return root / name
    raise MetatrainError(f"pickle layout: no {' or '.join(names)} in {root}; {HELP}")


def _few(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (", ..." if len(items) > k else "")


def _check_classes(split: str, found: list[str], expected: list[str], where) -> None:
    missing = [c for c in expected if c not in set(found)]
    extra = sorted(set(found) - set(expected))
    if not missing and not extra:
        return
    problems = [f"missing {len(missing)} ({_few(missing)})"] if missing else []
    problems += [f"{len(extra)} not in the split ({_few(extra)})"] if extra else []
    raise MetatrainError(
        f"MiniImageNet {split} classes in {where}: found {len(set(found))}, expected the "
        f"{len(expected)} of the Ravi & Larochelle split; {'; '.join(problems)}; "
        "fix or re-download the data"
    )


def _per_class(split: str, counts: dict[str, int]) -> int:
    n = min(counts.values())
    if n < 2:
        small = [c for c, k in counts.items() if k < 2]
        raise MetatrainError(
            f"MiniImageNet {split}: {len(small)} classes have fewer than 2 images "
            f"({_few(small)}); a few-shot class needs at least 2; fix or re-download the data"
        )
    if max(counts.values()) != n:
        warnings.warn(
            f"MiniImageNet {split}: classes hold {n} to {max(counts.values())} images "
            f"(standard: 600); using the first {n} of each",
            stacklevel=4,  # the caller of load_miniimagenet
        )
    return n


def _fingerprint(root: Path, layout: str, files: list[Path], texts: list[Path]) -> list:
    """One cache.fingerprint-style row: a digest of every source file's name, size and mtime
    (names relative to root, so a copied data folder keeps its cache) and of the text files'
    contents (class lists and CSVs are small, and a reinstalled package changes their mtimes)."""
    digest = hashlib.sha1(f"miniimagenet v{READER_VERSION} {layout}\n".encode())
    total = 0
    for p in files:
        st = p.stat()
        total += st.st_size
        digest.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for p in texts:
        digest.update(p.read_bytes())
    return [(f"miniimagenet {layout} {digest.hexdigest()}", len(files), total)]


def _fit(im: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB; resized (bilinear, antialiased when shrinking) only if needed."""
    im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(im)  # a writable copy, as torch.from_numpy wants


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return _fit(im, size)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for bad or truncated files
        reason = " ".join(str(e).split())
        raise MetatrainError(
            f"cannot read image {path} ({reason}); replace it or re-extract the data"
        ) from None


def _build_from_files(by_class: dict, split: str, classes: list[str], size: int) -> torch.Tensor:
    n = _per_class(split, {c: len(by_class[c]) for c in classes})
    # Filled in place: peak memory stays at the final tensor, not a list of 60,000 arrays.
    out = torch.empty((len(classes), n, 3, size, size), dtype=torch.uint8)  # (classes, n, C, H, W)
    hwc = out.permute(0, 1, 3, 4, 2)  # (classes, n, H, W, C): a view in PIL's pixel order

    def fill(i: int) -> None:
        for j, path in enumerate(by_class[classes[i]][:n]):
            hwc[i, j] = torch.from_numpy(_read_image(path, size))

    pool = ThreadPoolExecutor(os.cpu_count() or 1)  # PIL decodes without holding the GIL
    try:
        for _ in pool.map(fill, range(len(classes))):
            pass
    finally:  # on a bad image, report it now rather than after decoding all the rest
        pool.shutdown(cancel_futures=True)
    return out


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and builtin containers only: a pickle from the internet could
    otherwise run any code on load."""

    NUMPY = frozenset({"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"})
    OTHER = frozenset({("_codecs", "encode"), ("collections", "OrderedDict")})  # py2 bytes, dicts

    def find_class(self, module, name):
        if (module.split(".")[0] == "numpy" and name in self.NUMPY) or (module, name) in self.OTHER:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_pickle(path: Path) -> tuple[np.ndarray, dict]:
    with open(path, "rb") as f:
        try:
            try:
                blob = _ArraysOnly(f).load()
            except UnicodeDecodeError:  # a Python 2 pickle: its numpy bytes need latin1
                f.seek(0)
                blob = _ArraysOnly(f, encoding="latin1").load()
        except Exception as e:  # unpickling bad bytes raises nearly any type: all mean corrupt
            reason = " ".join(str(e).split())
            raise MetatrainError(
                f"corrupt pickle {path} ({type(e).__name__}: {reason}); re-download it"
            ) from e
    if not isinstance(blob, dict) or not {"image_data", "class_dict"} <= set(blob):
        raise MetatrainError(
            f"{path} is not a MiniImageNet pickle (a dict with image_data and class_dict); "
            "re-download it"
        )
    class_dict = {
        k.decode() if isinstance(k, bytes) else str(k): v for k, v in blob["class_dict"].items()
    }
    return np.asarray(blob["image_data"]), class_dict


def _build_from_pickle(path: Path, split: str, classes: list[str], size: int) -> torch.Tensor:
    data, class_dict = _load_pickle(path)  # (N, H, W, 3) uint8
    shapes = {(PICKLE_SIZE, PICKLE_SIZE, 3), (size, size, 3)}  # (H, W, C) per image
    if data.dtype != np.uint8 or data.shape[1:] not in shapes:
        raise MetatrainError(
            f"{path} holds {data.dtype} images of shape {data.shape[1:]}, expected uint8 "
            f"({PICKLE_SIZE}, {PICKLE_SIZE}, 3) as in the standard pickles (or ({size}, {size}, 3) "
            f"for image_size={size}); re-download it or use the csv or folders layout"
        )
    _check_classes(split, list(class_dict), classes, path)
    n = _per_class(split, {c: len(class_dict[c]) for c in classes})
    out = torch.empty((len(classes), n, 3, size, size), dtype=torch.uint8)  # (classes, n, C, H, W)
    for i, c in enumerate(classes):
        idx = np.asarray(class_dict[c][:n], dtype=np.int64)
        if idx.min() < 0 or idx.max() >= len(data):
            raise MetatrainError(
                f"corrupt pickle {path}: class {c} indexes past image_data; re-download it"
            )
        block = data[idx]  # (n, H, W, 3): one class copied, a few MB
        if block.shape[1:3] != (size, size):
            block = np.stack([_fit(Image.fromarray(x), size) for x in block])  # (n, size, size, 3)
        out[i] = torch.from_numpy(block).permute(0, 3, 1, 2)  # (n, 3, size, size)
    return out
