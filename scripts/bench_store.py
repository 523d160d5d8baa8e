"""Peak memory and tasks per second of a memory-mapped store against an in-memory one, on a
generated split (default 320 classes x 625 images of 84x84x3 uint8 = 200,000 images, 4.2 GB):

    PYTHONPATH=. python scripts/bench_store.py --dir /tmp/store_bench [--classes 320 --per-class 625]
        [--rounds 2] [--seconds 20] [--meta-seconds 40] [--cold] [--keep]

The split is written once as a data cache file (metatrain/data/cache.py) in --dir, then each
measurement runs in a fresh process (ru_maxrss is a per-process high-water mark), rounds
alternating memory and memmap: the cache file read whole (dataset.in_memory=true) or opened
memory-mapped (false), then MAML 5w1s (experiment=maml_miniimagenet_5w1s) task batches of
meta_batch tasks drawn for --seconds, then drawn and meta-trained for --meta-seconds. With
--cold the file's pages are dropped from the page cache (posix_fadvise DONTNEED, this file
only) before each process, so the memmap reads come from the disk. Prints one JSON object per
process; the folder is deleted at the end unless --keep.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from metatrain.data import FewShotSplits, store
from metatrain.data.cache import load_cache, store_cache

SIZE = 84


def status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make(path: Path, classes: int, per_class: int) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.empty((classes, per_class, 3, SIZE, SIZE), dtype=torch.uint8)
    for c in range(classes):  # (per_class, 3, 84, 84) at a time
        images[c] = torch.randint(0, 256, images.shape[1:], generator=g, dtype=torch.uint8)
    store_cache(path, [], train=images)


def measure(path: Path, mode: str, seconds: float, meta_seconds: float, cold: bool) -> dict:
    from hydra import compose, initialize_config_dir

    from metatrain.algorithms import build_learner
    from metatrain.cli import CONF_DIR
    from metatrain.data.tasks import EpisodeSampler
    from metatrain.models import build_model

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", ["experiment=maml_miniimagenet_5w1s", "logger=none"])
    device = torch.device("cpu")
    learner = build_learner(cfg, build_model(cfg, device), device)
    if cold:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    rss_before = status_mb("VmRSS")
    limit = store.budget("true" if mode == "memory" else "false", device)
    t0 = time.perf_counter()
    with store.loading(limit):
        blob = load_cache(path, [])
    split = FewShotSplits({"train": blob["train"]}, {})
    images = store.place(split, limit, device, path.parent, names=("train",))
    load_s = time.perf_counter() - t0
    ds = cfg.dataset
    shots, queries = learner.train_shape(ds.shots, ds.queries)
    sampler = EpisodeSampler(images["train"], ds.ways, shots, queries, ds.mean, ds.std)
    g = torch.Generator().manual_seed(0)
    tasks = cfg.algorithm.meta_batch

    def rate(step, budget: float) -> tuple[float, int]:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget or n < 3:
            step()
            n += 1
        return tasks * n / (time.perf_counter() - start), n

    file_before = status_mb("RssFile")
    sampler.sample(tasks, g)  # one batch: the file pages it brought into this process
    first_batch_file_mb = status_mb("RssFile") - file_before
    sample_rate, n_sample = rate(lambda: sampler.sample(tasks, g), seconds)
    # the meta-step's activations raise the peak further, alike in both modes
    peak_sampling = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    meta_rate, n_meta = rate(lambda: learner.meta_step(sampler.sample(tasks, g), 0), meta_seconds)
    return {
        "mode": mode,
        "cold": cold,
        "file_gb": round(path.stat().st_size / 1e9, 3),
        "images": int(images["train"].shape[0] * images["train"].shape[1]),
        "mapped": store.is_mapped(images["train"]),
        "load_s": round(load_s, 2),
        "sample_tasks_per_s": round(sample_rate, 1),
        "sample_batches": n_sample,
        "meta_tasks_per_s": round(meta_rate, 2),
        "meta_steps": n_meta,
        "meta_batch": tasks,
        "rss_before_mb": round(rss_before),
        "first_batch_rss_file_mb": round(first_batch_file_mb, 1),
        "peak_rss_sampling_mb": round(peak_sampling),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_anon_mb_end": round(status_mb("RssAnon")),
        "rss_file_mb_end": round(status_mb("RssFile")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--classes", type=int, default=320)
    p.add_argument("--per-class", type=int, default=625)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--meta-seconds", type=float, default=40.0)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--measure", choices=("memory", "memmap"), help=argparse.SUPPRESS)
    p.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    path = a.dir / "store.pt"
    if a.make:
        return make(path, a.classes, a.per_class)
    if a.measure:
        print(json.dumps(measure(path, a.measure, a.seconds, a.meta_seconds, a.cold)), flush=True)
        return
    try:
        if not path.is_file():
            t0 = time.perf_counter()
            size = ["--classes", str(a.classes), "--per-class", str(a.per_class)]
            # its own process, so the generated tensor is not held beside the measured ones
            subprocess.run(
                [sys.executable, __file__, "--dir", str(a.dir), "--make", *size], check=True
            )
            print(json.dumps({"written_gb": path.stat().st_size / 1e9,
                              "write_s": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip
        print(json.dumps({"uptime": os.getloadavg()}), flush=True)
        for _ in range(a.rounds):
            for mode in ("memory", "memmap"):
                args = ["--dir", str(a.dir), "--measure", mode, "--seconds", str(a.seconds)]
                args += ["--meta-seconds", str(a.meta_seconds)] + ["--cold"] * a.cold
                subprocess.run([sys.executable, __file__, *args], check=True)
        print(json.dumps({"uptime": os.getloadavg()}), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
