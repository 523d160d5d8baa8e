"""Time building and then loading the MiniImageNet cache at full size (100 classes x 600 images
at 84x84) from a generated copy, with the peak memory of each phase:

    PYTHONPATH=. python scripts/bench_miniimagenet_cache.py [--layout pickle|folders]

Prints one JSON object. Each phase runs in a process of its own because ru_maxrss is a
per-process high-water mark; `rss_before_mb` is that mark after the imports, before the work.
The pickle layout is the fastest to generate; `folders` writes 60,000 jpgs (about a minute) and
times the decoding a jpg copy needs.
"""

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from metatrain.data.miniimagenet import SPLITS, load_miniimagenet, packaged_classes


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def smooth_images(rng, n: int, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: a random colour gradient plus noise per image, so that jpgs
    compress and decode roughly like photos rather than like pure noise."""
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    lo, hi = rng.uniform(0, 255, (2, n, 1, 1, 3)).astype(np.float32)
    img = lo + (hi - lo) * ramp[None, :, None, None] * ramp[None, None, :, None]
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(root: Path, layout: str, per_class: int, size: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        classes = packaged_classes(split)
        if layout == "pickle":
            data = np.concatenate([smooth_images(rng, per_class, size) for _ in classes])
            class_dict = {
                c: list(range(i * per_class, (i + 1) * per_class)) for i, c in enumerate(classes)
            }
            with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=4)
            del data
        else:
            for c in classes:
                (root / split / c).mkdir(parents=True)
                for j, img in enumerate(smooth_images(rng, per_class, size)):
                    Image.fromarray(img).save(root / split / c / f"{c}_{j:04d}.jpg", quality=90)


def phase(name: str, root: Path, layout: str, per_class: int, size: int) -> dict:
    before = peak_rss_mb()
    start = time.perf_counter()
    if name == "generate":
        generate(root, layout, per_class, size)
    else:
        data = load_miniimagenet(root, layout=layout)
        assert data.images["train"].shape == (64, per_class, 3, size, size)
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_before_mb": round(before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=["pickle", "folders"], default="pickle")
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--dir", help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = 84
    if args.phase:  # child process: one phase, result as the last line of stdout
        print(json.dumps(phase(args.phase, Path(args.dir), args.layout, args.per_class, size)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "miniimagenet"
        env = {**os.environ, "METATRAIN_CACHE": str(Path(tmp) / "cache")}
        report = {"layout": args.layout, "classes": 100, "per_class": args.per_class}
        for name in ("generate", "build", "load"):
            cmd = [sys.executable, __file__, "--phase", name, "--dir", str(root)]
            cmd += ["--layout", args.layout, "--per-class", str(args.per_class)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            report[name] = json.loads(done.stdout.strip().splitlines()[-1])
        cache = next(root.glob("miniimagenet_*.pt"))
        report["tensor_mb"] = round(100 * args.per_class * 3 * size * size / 2**20)
        report["cache_file_mb"] = round(cache.stat().st_size / 2**20)
        report["cache_file"] = cache.name
        report["cpus"] = os.cpu_count()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
