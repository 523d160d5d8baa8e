"""Build MiniImageNet in the csv layout (OUT/images/*.jpg at 84x84 plus train/val/test.csv) from
an ILSVRC-2012 train folder (IMAGENET/n01532829/n01532829_1234.JPEG, ...):

    python scripts/prepare_miniimagenet.py --imagenet /data/ILSVRC2012/train --out data/miniimagenet

Which ImageNet file a CSV row names: `n0153282900000005.jpg` is the wnid followed by an 8-digit,
1-based index k, and k picks the k-th file of that class's folder when the files
`<wnid>_<number>.JPEG` are ordered by <number> as an integer (so _9 comes before _10, unlike a
sort by name). This is the rule of mini-imagenet-tools (github.com/yaoyao-liu/mini-imagenet-tools),
the generator most code uses to rebuild the Ravi & Larochelle images. It is consistent with the
split files (largest index 1,300 = the largest ImageNet class) but was not checked against the
original images here, as no ImageNet copy was available.

Images are resized to 84x84 without cropping (the aspect ratio is not kept), by area averaging
(PIL's BOX filter; that tool uses cv2.INTER_AREA), and saved as JPEG quality 95: pixels are close
to, not bit-identical with, other copies. Finished images are kept, so a rerun resumes an
interrupted one. Needs `metatrain` importable (pip install -e . or PYTHONPATH=.).
"""

import argparse
import csv
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from metatrain.data.miniimagenet import SPLIT_FILES, SPLITS
from metatrain.errors import MetatrainError

SIZE = 84
ROW_NAME = re.compile(r"(n\d{8})(\d{8})\.jpg")  # wnid + 1-based index
IMAGENET_NAME = re.compile(r"n\d{8}_(\d+)\.jpe?g", re.IGNORECASE)


def class_files(folder: Path) -> list[Path]:
    """A class's ImageNet files ordered by the number after the '_' as an integer."""
    numbered = []
    for p in folder.iterdir():
        m = IMAGENET_NAME.fullmatch(p.name)
        if m:
            numbered.append((int(m.group(1)), p))
    return [p for _, p in sorted(numbered)]


def plan(imagenet: Path, splits_dir: Path = SPLIT_FILES) -> list[tuple[Path, str]]:
    """(ImageNet source file, MiniImageNet file name) for every row of the three CSVs."""
    jobs = []
    for split in SPLITS:
        with open(splits_dir / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))[1:]  # skip the filename,label header
        files: dict[str, list[Path]] = {}
        for name, label in (r[:2] for r in rows if r):
            m = ROW_NAME.fullmatch(name)
            if not m or m.group(1) != label:
                raise MetatrainError(f"unexpected row {name},{label} in {split}.csv")
            if label not in files:
                folder = imagenet / label
                if not folder.is_dir():
                    raise MetatrainError(
                        f"no class folder {folder}: --imagenet must be the ILSVRC-2012 train "
                        "folder with one subfolder per wnid (untar the per-class tars)"
                    )
                files[label] = class_files(folder)
            k = int(m.group(2))
            if not 1 <= k <= len(files[label]):
                raise MetatrainError(
                    f"{name} in {split}.csv is image {k} of {label}, but {imagenet / label} "
                    f"holds {len(files[label])}: use the full ILSVRC-2012 train set"
                )
            jobs.append((files[label][k - 1], name))
    return jobs


def convert(src: Path, dst: Path) -> None:
    try:
        with Image.open(src) as im:
            im = im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)
    except (OSError, SyntaxError, ValueError) as e:
        raise MetatrainError(f"cannot read {src} ({' '.join(str(e).split())})") from e
    tmp = dst.with_name(f".{dst.name}.tmp")
    im.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, dst)  # whole files only, so a rerun can trust what exists


def prepare(
    imagenet: Path, out: Path, splits_dir: Path = SPLIT_FILES, workers: int | None = None
) -> int:
    """Write the images and CSVs; returns how many images were written (existing ones skipped)."""
    imagenet, out = Path(imagenet), Path(out)
    if not imagenet.is_dir():
        raise MetatrainError(f"no folder {imagenet}: pass the ILSVRC-2012 train folder")
    jobs = plan(imagenet, Path(splits_dir))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    todo = [(src, images / name) for src, name in jobs if not (images / name).is_file()]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:  # PIL releases the GIL
        for i, _ in enumerate(pool.map(lambda job: convert(*job), todo), 1):
            if i % 2000 == 0 or i == len(todo):
                print(f"{i}/{len(todo)} images", flush=True)
    for split in SPLITS:  # last, so a folder with CSVs is a finished one
        shutil.copyfile(Path(splits_dir) / f"{split}.csv", out / f"{split}.csv")
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imagenet", required=True, help="ILSVRC-2012 train folder")
    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        n = prepare(Path(args.imagenet), Path(args.out), workers=args.workers)
    except MetatrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} images; MiniImageNet is ready in {args.out} (csv layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
