"""Omniglot (Lake et al. 2015) read from the official zips or their folders.

All 32,460 drawings are resized once to image_size x image_size and cached as
one uint8 tensor (characters, 20, 1, H, W), ink bright on a zero background so
that zero padding in the network means "no ink". The character split is a
seeded shuffle into train / val / test characters (1100 / 100 / 423 as in
MAML and learn2learn); rotations by 90/180/270 degrees optionally turn each
training character into four classes.
"""

import hashlib
import io
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metatrain.config import DatasetConfig
from metatrain.data import FewShotSplits
from metatrain.data.cache import cache_path, fingerprint, load_cache, store_cache
from metatrain.errors import MetatrainError
from metatrain.registry import DATASETS

PARTS = ("images_background", "images_evaluation")
URLS = {
    p: f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{p}.zip"
    for p in PARTS
}
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
DRAWINGS_PER_CHARACTER = 20


def _find_sources(root: Path) -> dict[str, Path] | None:
    """Each part as a zip or an extracted folder, under root/omniglot-py or root."""
    for base in (root / "omniglot-py", root):
        found = {}
        for part in PARTS:
            if (base / part).is_dir():
                found[part] = base / part
            elif (base / f"{part}.zip").is_file():
                found[part] = base / f"{part}.zip"
        if len(found) == len(PARTS):
            return found
    return None


def _download(root: Path) -> None:
    target = root / "omniglot-py"
    made = [p for p in (target, *target.parents) if not p.exists()]  # deepest first
    target.mkdir(parents=True, exist_ok=True)
    try:
        for part, url in URLS.items():
            data = urllib.request.urlopen(url, timeout=60).read()
            if hashlib.md5(data).hexdigest() != OFFICIAL_MD5[part]:
                raise MetatrainError(
                    f"downloaded {url} has the wrong md5; fetch it by hand into {target}"
                )
            (target / f"{part}.zip").write_bytes(data)
    except BaseException:
        for folder in made:  # a failed download leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _drawings(source: Path):
    """Yield (character key, png bytes) in a fixed order, from a zip or a folder."""
    if source.is_dir():
        files = sorted(source.glob("*/*/*.png"))
        for f in files:
            yield f"{f.parent.parent.name}/{f.parent.name}", f.read_bytes()
        return
    with zipfile.ZipFile(source) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        for n in names:
            alphabet, character = n.split("/")[-3:-1]
            yield f"{alphabet}/{character}", zf.read(n)


def _decode(png: bytes, size: int) -> np.ndarray:
    img = Image.open(io.BytesIO(png)).convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(img, dtype=np.uint8)  # ink bright, background 0


def _count(source: Path) -> int:
    if source.is_dir():
        return sum(1 for _ in source.glob("*/*/*.png"))
    with zipfile.ZipFile(source) as zf:
        return sum(n.endswith(".png") for n in zf.namelist())


def _build(sources: dict[str, Path], size: int) -> tuple[torch.Tensor, list[str]]:
    from metatrain.logging import activity  # the console; not needed to read a cache

    by_char: dict[str, list[np.ndarray]] = {}
    total = sum(_count(sources[part]) for part in PARTS)
    with activity(f"caching Omniglot at {size}x{size} (once)", total, "drawings") as step:
        for part in PARTS:
            for key, png in _drawings(sources[part]):
                by_char.setdefault(f"{part}/{key}", []).append(_decode(png, size))
                step()
    names = sorted(by_char)
    short = [n for n in names if len(by_char[n]) != DRAWINGS_PER_CHARACTER]
    if short or not names:
        raise MetatrainError(
            f"Omniglot under {sources[PARTS[0]].parent} is incomplete "
            f"({len(names)} characters, {len(short)} without {DRAWINGS_PER_CHARACTER} drawings);"
            " delete it to download again"
        )
    images = torch.from_numpy(np.stack([np.stack(by_char[n]) for n in names]))
    return images.unsqueeze(2), names  # (characters, 20, 1, H, W)


def load_omniglot_images(root: Path, image_size: int, download: bool) -> tuple[torch.Tensor, list]:
    """Every character's drawings, (1623, 20, 1, size, size) uint8, from cache if fresh."""
    root = Path(root).expanduser()
    sources = _find_sources(root)
    if sources is None and download:
        try:
            _download(root)
        except MetatrainError:
            raise
        except Exception as e:  # noqa: BLE001 - no network, proxy, read-only disk...
            raise MetatrainError(
                f"Omniglot not found in {root} and the download failed ({type(e).__name__}); "
                f"put {' and '.join(URLS.values())} into {root / 'omniglot-py'}"
            ) from None
        sources = _find_sources(root)
    if sources is None:
        raise MetatrainError(
            f"Omniglot not found in {root} (want omniglot-py/images_background.zip and "
            f"images_evaluation.zip, or their folders); download {' and '.join(URLS.values())}"
            " there, or set dataset.root / METATRAIN_DATA"
        )
    fp = fingerprint(list(sources.values())) + [("image_size", image_size, 0)]
    path = cache_path(next(iter(sources.values())).parent, f"omniglot_{image_size}.pt")
    blob = load_cache(path, fp)
    if blob is None:
        images, names = _build(sources, image_size)
        store_cache(path, fp, images=images, names=names)
        return images, names
    return blob["images"], blob["names"]


def split_omniglot(
    images: torch.Tensor,
    names: list[str],
    split_seed: int,
    train_classes: int,
    val_classes: int,
    rotations: bool,
) -> FewShotSplits:
    n = images.shape[0]
    if train_classes + val_classes >= n:
        raise MetatrainError(
            f"dataset.train_classes + dataset.val_classes must leave test characters "
            f"(Omniglot has {n}); lower them"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    idx = {
        "train": order[:train_classes],
        "val": order[train_classes : train_classes + val_classes],
        "test": order[train_classes + val_classes :],
    }
    out = FewShotSplits(images={}, classes={})
    for split, ids in idx.items():
        out.images[split] = images[ids]
        out.classes[split] = [names[i] for i in ids.tolist()]
    if rotations:
        train = out.images["train"]
        # (4 * classes, 20, 1, H, W): each rotation of a character is a class of its own
        out.images["train"] = torch.cat([torch.rot90(train, k, dims=(-2, -1)) for k in range(4)])
        out.classes["train"] = [f"{c}@{90 * k}" for k in range(4) for c in out.classes["train"]]
    return out


@dataclass
class OmniglotConfig(DatasetConfig):
    name: str = "omniglot"
    image_size: int = 28
    channels: int = 1
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    download: bool = True
    rotations: bool = True  # 90/180/270 degree rotations as new meta-training classes
    # MAML++: each class of a meta-training task turned by a random multiple of 90
    # degrees, drawn per task (not new classes; validation and test never rotated)
    augment_rotation: bool = False
    split_seed: int = 0
    train_classes: int = 1100
    val_classes: int = 100  # the remaining 423 characters are the test classes


@DATASETS.register("omniglot", OmniglotConfig)
def read_omniglot(cfg, root: Path) -> FewShotSplits:
    images, names = load_omniglot_images(root, cfg.image_size, cfg.download)
    return split_omniglot(
        images, names, cfg.split_seed, cfg.train_classes, cfg.val_classes, cfg.rotations
    )
