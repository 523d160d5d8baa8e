"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): few-shot splits of
CIFAR-100 (Krizhevsky 2009), 100 classes of 600 images (its 500 training and 100 test images
together, training first, each in file order), 32x32.

Both read the official `cifar-100-python.tar.gz` under root (downloaded and md5-checked when
missing and dataset.download is on; a copy on disk is md5-checked too) or the folder
`cifar-100-python/` it extracts to. CIFAR-FS takes the fine classes listed in
cifar100_splits/cifarfs_*.txt (64 / 16 / 20); FC100 the fine classes of the superclasses in
cifar100_splits/fc100_*.txt (12 / 4 / 4 superclasses, so 60 / 20 / 20 classes): sources in
cifar100_splits/SOURCES.md. The decoded images are cached once as `cifar100_{size}.pt`
(data/cache.py says where); both datasets share it when they share a root.
"""

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metatrain.config import DatasetConfig
from metatrain.data import FewShotSplits
from metatrain.data.cache import cache_path, fingerprint, load_cache, store_cache
from metatrain.data.download import Remote, fetch, looks_like_html
from metatrain.data.miniimagenet import _ArraysOnly
from metatrain.errors import MetatrainError
from metatrain.registry import DATASETS

SPLITS = ("train", "val", "test")
ARCHIVE = Remote(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"
)
TGZ, FOLDER = "cifar-100-python.tar.gz", "cifar-100-python"
MEMBERS = ("meta", "train", "test")
SPLIT_FILES = Path(__file__).with_name("cifar100_splits")
CIFAR_SIZE = 32


@dataclass
class Cifar100Data:
    images: torch.Tensor  # (100, 600, 3, size, size) uint8, classes in fine-label order
    fine: list[str]  # fine class names, by fine label
    coarse: list[str]  # each fine class's superclass name


def packaged(benchmark: str, split: str) -> list[str]:
    return (SPLIT_FILES / f"{benchmark}_{split}.txt").read_text().split()


def _unpickle(data: bytes, where: str) -> dict:
    try:  # the official files are Python 2 pickles: numpy's bytes need latin1
        blob = _ArraysOnly(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - bad bytes raise nearly any type: all mean corrupt
        raise MetatrainError(
            f"{where} is corrupt ({type(e).__name__}); re-download {ARCHIVE.url}"
        ) from None
    if not isinstance(blob, dict):
        raise MetatrainError(f"{where} is not a CIFAR-100 file; re-download {ARCHIVE.url}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in blob.items()}


def _read_members(source: Path) -> dict[str, dict]:
    if source.is_dir():
        return {m: _unpickle((source / m).read_bytes(), str(source / m)) for m in MEMBERS}
    out = {}
    try:
        with tarfile.open(source, "r:gz") as tar:
            for m in MEMBERS:
                f = tar.extractfile(f"{FOLDER}/{m}")
                out[m] = _unpickle(f.read(), f"{source}:{FOLDER}/{m}")
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        with open(source, "rb") as f:
            what = "an HTML page" if looks_like_html(f.read(512)) else "truncated or corrupt"
        raise MetatrainError(
            f"{source} is {what} ({type(e).__name__}), not the CIFAR-100 archive; move it away "
            f"(nothing was deleted) and put {ARCHIVE.url} there"
        ) from None
    return out


def _names(meta: dict, key: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def _build(source: Path, size: int) -> Cifar100Data:
    parts = _read_members(source)
    fine, coarse_names = (
        _names(parts["meta"], k) for k in ("fine_label_names", "coarse_label_names")
    )
    x = np.concatenate([np.asarray(parts[p]["data"], dtype=np.uint8) for p in ("train", "test")])
    y_fine = np.concatenate([np.asarray(parts[p]["fine_labels"]) for p in ("train", "test")])
    y_coarse = np.concatenate([np.asarray(parts[p]["coarse_labels"]) for p in ("train", "test")])
    x = x.reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE)  # (N, C, H, W): rows are R, G, B planes
    counts = np.bincount(y_fine, minlength=len(fine))
    if len(fine) != 100 or counts.min() != counts.max():
        raise MetatrainError(
            f"{source}: {len(fine)} fine classes holding {counts.min()} to {counts.max()} images, "
            f"expected 100 classes of 600; re-download {ARCHIVE.url}"
        )
    order = np.argsort(y_fine, kind="stable")  # class-major, file order within a class
    images = torch.from_numpy(x[order]).view(len(fine), counts[0], 3, CIFAR_SIZE, CIFAR_SIZE)
    if size != CIFAR_SIZE:
        hwc = images.permute(0, 1, 3, 4, 2).reshape(-1, CIFAR_SIZE, CIFAR_SIZE, 3).numpy()
        bilinear = Image.Resampling.BILINEAR
        resized = [np.asarray(Image.fromarray(im).resize((size, size), bilinear)) for im in hwc]
        images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)  # (N, C, size, size)
        images = images.reshape(len(fine), counts[0], 3, size, size).contiguous()
    coarse = [coarse_names[c] for c in (y_coarse[np.argmax(y_fine == i)] for i in range(100))]
    return Cifar100Data(images, fine, coarse)


def load_cifar100(root: Path, size: int = CIFAR_SIZE, download: bool = True) -> Cifar100Data:
    root = Path(root).expanduser()
    if all((root / FOLDER / m).is_file() for m in MEMBERS):
        source, files = root / FOLDER, [root / FOLDER / m for m in MEMBERS]
    elif (root / TGZ).is_file() or download:
        source = fetch(ARCHIVE, root / TGZ)  # md5-checked, on disk or downloaded
        files = [source]
    else:
        raise MetatrainError(
            f"CIFAR-100 not found in {root} (want {TGZ} or its folder {FOLDER}/); download "
            f"{ARCHIVE.url} there, set dataset.download=true, or set dataset.root"
        )
    fp = fingerprint(files) + [("image_size", size, 0)]
    path = cache_path(root, f"cifar100_{size}.pt")
    blob = load_cache(path, fp)
    if blob is None:
        print(f"CIFAR-100: decoding {source} into {path} (once)", flush=True)
        data = _build(source, size)
        store_cache(path, fp, images=data.images, fine=data.fine, coarse=data.coarse)
        return data
    return Cifar100Data(blob["images"], blob["fine"], blob["coarse"])


def select(data: Cifar100Data, classes: dict[str, list[str]], what: str) -> FewShotSplits:
    index = {c: i for i, c in enumerate(data.fine)}
    missing = [c for s in SPLITS for c in classes[s] if c not in index]
    if missing:
        raise MetatrainError(
            f"{what}: classes {', '.join(missing[:5])} are not in this CIFAR-100's meta file; "
            f"re-download {ARCHIVE.url}"
        )
    out = FewShotSplits(images={}, classes={})
    for s in SPLITS:
        out.images[s] = data.images[[index[c] for c in classes[s]]]
        out.classes[s] = list(classes[s])
    return out


def fc100_classes(data: Cifar100Data) -> dict[str, list[str]]:
    """Each split's fine classes, in fine-label order, from its superclasses."""
    out = {}
    for s in SPLITS:
        supers = set(packaged("fc100", s))
        out[s] = [f for f, c in zip(data.fine, data.coarse, strict=True) if c in supers]
        if len(out[s]) != 5 * len(supers):
            raise MetatrainError(
                f"FC100 {s}: {len(out[s])} fine classes under its {len(supers)} superclasses, "
                f"expected {5 * len(supers)}; re-download {ARCHIVE.url}"
            )
    return out


@dataclass
class Cifar100Config(DatasetConfig):
    image_size: int = CIFAR_SIZE
    channels: int = 3
    queries: int = 15
    # CIFAR-100 training-set statistics
    mean: list[float] = field(default_factory=lambda: [0.5071, 0.4865, 0.4409])
    std: list[float] = field(default_factory=lambda: [0.2673, 0.2564, 0.2762])
    download: bool = True


@dataclass
class CifarFSConfig(Cifar100Config):
    name: str = "cifarfs"


@dataclass
class FC100Config(Cifar100Config):
    name: str = "fc100"


@DATASETS.register("cifarfs", CifarFSConfig)
def read_cifarfs(cfg, root: Path) -> FewShotSplits:
    data = load_cifar100(root, cfg.image_size, cfg.download)
    return select(data, {s: packaged("cifarfs", s) for s in SPLITS}, "CIFAR-FS")


@DATASETS.register("fc100", FC100Config)
def read_fc100(cfg, root: Path) -> FewShotSplits:
    data = load_cifar100(root, cfg.image_size, cfg.download)
    return select(data, fc100_classes(data), "FC100")
