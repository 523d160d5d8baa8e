"""Omniglot (Lake et al. 2015) read from the official zips or their folders.

All 32,460 drawings are resized once to image_size x image_size and cached as
one uint8 tensor (characters, 20, 1, H, W). By default (MAML's preprocessing)
they are LANCZOS-resized grey levels, inverted so that the ink is bright on a
zero background and zero padding means "no ink"; Reptile's authors resize the
1-bit image nearest-neighbour and keep it as stored, background 1 and ink 0
(`resample=nearest invert=false`). The character split is a seeded shuffle
into train / val / test characters (1100 / 100 / 423 as in MAML and
learn2learn), or, with `split_shuffle=python`, Python's random.shuffle over the
characters sorted by alphabet and character name, as supervised-reptile's
run_omniglot.py draws its 1200 / 423 split (split_seed 0 gives that exact
split). Rotations by 90/180/270 degrees optionally turn each training
character into four classes.
"""

import io
import random
import zipfile
import zlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metatrain.config import DatasetConfig
from metatrain.data import FewShotSplits
from metatrain.data.cache import cache_path, fingerprint, load_cache, store_cache
from metatrain.data.download import Remote, fetch, looks_like_html
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
    # md5 is checked on download only: copies rebuilt from the same images differ in md5
    target = root / "omniglot-py"
    made = [p for p in (target, *target.parents) if not p.exists()]  # deepest first
    try:
        for part, url in URLS.items():
            dest = target / f"{part}.zip"
            if not dest.is_file():
                fetch(Remote(url, OFFICIAL_MD5[part]), dest)
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
    try:
        with zipfile.ZipFile(source) as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".png"))
            for n in names:
                alphabet, character = n.split("/")[-3:-1]
                yield f"{alphabet}/{character}", zf.read(n)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # cut short, or not a zip at all
        with open(source, "rb") as f:
            what = "an HTML page" if looks_like_html(f.read(512)) else "truncated or corrupt"
        url = URLS.get(source.stem, "the official zip")
        raise MetatrainError(
            f"{source} is {what} ({type(e).__name__}: {' '.join(str(e).split())}), not the "
            "Omniglot zip; move it away "
            f"(nothing was deleted) and put {url} there, or let metatrain download it"
        ) from None


class Resample(Enum):
    lanczos = "lanczos"  # grey levels from the 1-bit drawing (MAML, MAML++)
    nearest = "nearest"  # stays binary (Reptile's authors: PIL's default for 1-bit images)


class SplitShuffle(Enum):
    torch = "torch"  # torch.randperm seeded with split_seed over the sorted characters
    python = "python"  # random.Random(split_seed).shuffle over alphabet/character order


def _decode(png: bytes, size: int, resample: str = "lanczos", invert: bool = True) -> np.ndarray:
    img = Image.open(io.BytesIO(png)).convert("L")
    if img.size != (size, size):
        method = Image.Resampling.LANCZOS if resample == "lanczos" else Image.Resampling.NEAREST
        img = img.resize((size, size), method)
    x = np.asarray(img, dtype=np.uint8)
    return 255 - x if invert else x.copy()  # inverted: ink bright, background 0


def _count(source: Path) -> int:
    """Drawings in a part, for the caching progress; 0 for a broken zip, which
    _drawings then names in one line."""
    if source.is_dir():
        return sum(1 for _ in source.glob("*/*/*.png"))
    try:
        with zipfile.ZipFile(source) as zf:
            return sum(n.endswith(".png") for n in zf.namelist())
    except (zipfile.BadZipFile, zlib.error, EOFError):
        return 0


def _build(
    sources: dict[str, Path], size: int, resample: str = "lanczos", invert: bool = True
) -> tuple[torch.Tensor, list[str]]:
    from metatrain.logging import activity  # the console; not needed to read a cache

    by_char: dict[str, list[np.ndarray]] = {}
    total = sum(_count(sources[part]) for part in PARTS)
    with activity(f"caching Omniglot at {size}x{size} (once)", total, "drawings") as step:
        for part in PARTS:
            for key, png in _drawings(sources[part]):
                by_char.setdefault(f"{part}/{key}", []).append(_decode(png, size, resample, invert))
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


def load_omniglot_images(
    root: Path, image_size: int, download: bool, resample: str = "lanczos", invert: bool = True
) -> tuple[torch.Tensor, list]:
    """Every character's drawings, (1623, 20, 1, size, size) uint8, from cache if fresh."""
    root = Path(root).expanduser()
    sources = _find_sources(root)
    if sources is None and download:
        _download(root)
        sources = _find_sources(root)
    if sources is None:
        raise MetatrainError(
            f"Omniglot not found in {root} (want omniglot-py/images_background.zip and "
            f"images_evaluation.zip, or their folders); download {' and '.join(URLS.values())}"
            " there, or set dataset.root / METATRAIN_DATA"
        )
    fp = fingerprint(list(sources.values())) + [("image_size", image_size, 0)]
    # The default preprocessing keeps its cache file name from before the options.
    variant = (
        "" if (resample, invert) == ("lanczos", True) else f"_{resample}" + "_raw" * (not invert)
    )
    fp += [("resample", 0 if resample == "lanczos" else 1, int(invert))] if variant else []
    path = cache_path(next(iter(sources.values())).parent, f"omniglot_{image_size}{variant}.pt")
    blob = load_cache(path, fp)
    if blob is None:
        images, names = _build(sources, image_size, resample, invert)
        store_cache(path, fp, images=images, names=names)
        return images, names
    return blob["images"], blob["names"]


def python_shuffle_order(names: list[str], seed: int) -> torch.Tensor:
    """Indices into `names` ("<part>/<alphabet>/<character>") in the order of
    random.Random(seed).shuffle over the characters sorted by alphabet, then
    character: both parts' alphabets in one sorted listing, as supervised-reptile
    reads them."""
    listing = sorted(range(len(names)), key=lambda i: tuple(names[i].split("/")[1:]))
    random.Random(seed).shuffle(listing)
    return torch.tensor(listing)


def split_omniglot(
    images: torch.Tensor,
    names: list[str],
    split_seed: int,
    train_classes: int,
    val_classes: int,
    rotations: bool,
    shuffle: str = "torch",
) -> FewShotSplits:
    n = images.shape[0]
    if train_classes + val_classes >= n:
        raise MetatrainError(
            f"dataset.train_classes + dataset.val_classes must leave test characters "
            f"(Omniglot has {n}); lower them"
        )
    if shuffle == "python":
        order = python_shuffle_order(names, split_seed)
    else:
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
    queries: int = 1  # MAML's and MAML++'s 1-shot value; Omniglot has 20 drawings per class
    download: bool = True
    rotations: bool = True  # 90/180/270 degree rotations as new meta-training classes
    # Each class of a meta-training task turned by a random multiple of 90 degrees,
    # drawn per task (not new classes): MAML's and MAML++'s code
    augment_rotation: bool = False
    # The same for every validation and test task, the turns drawn with the task set
    # from eval.seed: MAML's code (its data generator rotates every task it makes)
    eval_rotation: bool = False
    resample: Resample = Resample.lanczos  # resizing the 105x105 drawings
    invert: bool = True  # ink 1 on background 0 (false: as stored, background 1)
    split_seed: int = 0
    split_shuffle: SplitShuffle = SplitShuffle.torch
    train_classes: int = 1100
    # 0: no validation split (Reptile's authors): eval.test_from=last, no validation
    val_classes: int = 100  # the remaining 423 characters are the test classes


@DATASETS.register("omniglot", OmniglotConfig)
def read_omniglot(cfg, root: Path) -> FewShotSplits:
    images, names = load_omniglot_images(
        root, cfg.image_size, cfg.download, cfg.resample.value, cfg.invert
    )
    return split_omniglot(
        images, names, cfg.split_seed, cfg.train_classes, cfg.val_classes, cfg.rotations,
        cfg.split_shuffle.value,
    )  # fmt: skip
