"""CUB-200-2011 (Wah et al. 2011) for few-shot learning: 200 bird species, 100 / 50 / 50
classes (Chen et al. 2019's split, cub_splits/SOURCES.md), images resized to 84x84.

Read from the official `CUB_200_2011.tgz` under root (downloaded and md5-checked when missing
and dataset.download is on; a copy on disk is md5-checked too) or the folder `CUB_200_2011/`
it extracts to: `images.txt` (id, path), `bounding_boxes.txt` (id, x, y, width, height) and
`images/<class>/<name>.jpg`. With `bbox_crop` each image is first cut to its bounding box (as
some few-shot papers do); either way it is then resized to image_size x image_size (bilinear,
aspect ratio not kept). Species hold 41 to 60 images, all kept (in image-id order): a split is
stored padded to its largest class with each class's count beside it (FewShotSplits.counts).
The decoded images are cached once as `cub_{size}[_bbox].pt` (data/cache.py says where).
"""

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metatrain.config import DatasetConfig
from metatrain.data import FewShotSplits, pad_classes
from metatrain.data.cache import cache_path, fingerprint, load_cache, store_cache
from metatrain.data.download import Remote, fetch
from metatrain.errors import MetatrainError
from metatrain.registry import DATASETS

SPLITS = ("train", "val", "test")
ARCHIVE = Remote(
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
    "97eceeb196236b17998738112f37df78",
)
TGZ, FOLDER = "CUB_200_2011.tgz", "CUB_200_2011"
TEXTS = ("images.txt", "bounding_boxes.txt")
SPLIT_FILES = Path(__file__).with_name("cub_splits")


@dataclass
class CubConfig(DatasetConfig):
    name: str = "cub"
    image_size: int = 84
    channels: int = 3
    queries: int = 15
    # ImageNet statistics, as the CUB few-shot literature normalises with
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    download: bool = True
    bbox_crop: bool = False  # cut each image to its annotated bounding box before resizing


def packaged(split: str) -> list[str]:
    return (SPLIT_FILES / f"{split}.txt").read_text().split()


@DATASETS.register("cub", CubConfig)
def read_cub(cfg, root: Path) -> FewShotSplits:
    return load_cub(root, cfg.image_size, cfg.bbox_crop, cfg.download)


def load_cub(root, size: int = 84, bbox_crop: bool = False, download: bool = True):
    root = Path(root).expanduser()
    if all((root / FOLDER / t).is_file() for t in TEXTS):
        source = root / FOLDER
        files = [source / t for t in TEXTS]  # images are fingerprinted through images.txt
    elif (root / TGZ).is_file() or download:
        source = fetch(ARCHIVE, root / TGZ)
        files = [source]
    else:
        raise MetatrainError(
            f"CUB-200-2011 not found in {root} (want {TGZ} or its folder {FOLDER}/); download "
            f"{ARCHIVE.url} there, set dataset.download=true, or set dataset.root"
        )
    # ("classes", 1, 0): padded splits with counts (caches from before kept the smallest count)
    fp = fingerprint(files) + [("image_size", size, int(bbox_crop)), ("classes", 1, 0)]
    path = cache_path(root, f"cub_{size}{'_bbox' if bbox_crop else ''}.pt")
    blob = load_cache(path, fp)
    if blob is None:
        print(f"CUB: decoding {source} into {path} (once)", flush=True)
        blob = {s: t for s, t in _build(source, size, bbox_crop).items()}
        store_cache(path, fp, **blob)
    return FewShotSplits(
        images={s: blob[s] for s in SPLITS},
        classes={s: packaged(s) for s in SPLITS},
        counts={s: blob[f"{s}_counts"] for s in SPLITS},
    )


def _parse(texts: dict[str, str], where) -> tuple[dict[int, str], dict[int, tuple]]:
    try:
        paths = {int(i): p for i, p in (line.split() for line in texts["images.txt"].splitlines())}
        boxes = {
            int(i): tuple(float(v) for v in rest)
            for i, *rest in (line.split() for line in texts["bounding_boxes.txt"].splitlines())
        }
    except ValueError:
        raise MetatrainError(f"{where}: unreadable images.txt or bounding_boxes.txt") from None
    return paths, boxes


def _decode(data: bytes, box, size: int, name) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if box is not None:
                x, y, w, h = box
                im = im.crop((int(x), int(y), int(x + w), int(y + h)))
            return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))
    except (OSError, SyntaxError, ValueError) as e:
        raise MetatrainError(
            f"cannot read image {name} ({' '.join(str(e).split())}); re-download {ARCHIVE.url}"
        ) from None


def _build(source: Path, size: int, bbox_crop: bool) -> dict[str, torch.Tensor]:
    decoded: dict[str, np.ndarray] = {}  # relative image path -> (size, size, 3)
    if source.is_dir():
        texts = {t: (source / t).read_text() for t in TEXTS}
        paths, boxes = _parse(texts, source)
        for i, p in paths.items():
            box = boxes.get(i) if bbox_crop else None
            decoded[p] = _decode((source / "images" / p).read_bytes(), box, size, source / p)
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:  # pass 1: the small text files
                texts = {}
                for m in tar:
                    if m.name in {f"{FOLDER}/{t}" for t in TEXTS}:
                        texts[m.name.split("/")[-1]] = tar.extractfile(m).read().decode()
                    if len(texts) == len(TEXTS):
                        break
            if len(texts) != len(TEXTS):
                raise MetatrainError(f"{source} lacks {', '.join(TEXTS)}; re-download it")
            paths, boxes = _parse(texts, source)
            wanted = {f"{FOLDER}/images/{p}": i for i, p in paths.items()}
            with tarfile.open(source, "r:gz") as tar:  # pass 2: stream and decode the images
                for m in tar:
                    if m.name in wanted:
                        box = boxes.get(wanted[m.name]) if bbox_crop else None
                        p = paths[wanted[m.name]]
                        decoded[p] = _decode(tar.extractfile(m).read(), box, size, m.name)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise MetatrainError(
                f"{source} is truncated or corrupt ({type(e).__name__}); move it away (nothing "
                f"was deleted) and put {ARCHIVE.url} there"
            ) from None
    by_class: dict[str, list[np.ndarray]] = {}
    for i in sorted(paths):  # image-id order within each class
        if paths[i] not in decoded:
            raise MetatrainError(f"{source}: image {paths[i]} is missing; re-download it")
        by_class.setdefault(paths[i].split("/")[0], []).append(decoded[paths[i]])
    out = {}
    for s in SPLITS:
        classes = packaged(s)
        missing = [c for c in classes if c not in by_class]
        if missing:
            raise MetatrainError(
                f"CUB {s}: {len(missing)} classes of the split missing from {source} "
                f"({', '.join(missing[:3])}); re-download {ARCHIVE.url}"
            )
        if min(len(by_class[c]) for c in classes) < 2:
            raise MetatrainError(f"CUB {s}: a class holds fewer than 2 images; re-download it")
        # each class (n_c, H, W, C) -> (n_c, C, H, W), then padded: (classes, max n_c, C, H, W)
        per_class = [torch.from_numpy(np.stack(by_class[c])).permute(0, 3, 1, 2) for c in classes]
        out[s], out[f"{s}_counts"] = pad_classes(per_class)
    return out
