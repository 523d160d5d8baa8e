"""Meta-training speed at 1 and 2 (or more) torch threads under a given CPU load.

    python scripts/threads.py [--threads 1,2] [--loads 0,2,4] [--seconds 20] [OVERRIDES...]

Builds `experiment=quickstart` (plus OVERRIDES) once, in this process, then for each
load starts that many busy-loop processes (`while 1: pass`) and times meta-iterations
at each thread count in turn (torch.set_num_threads), after one warm-up iteration,
for --seconds each (at least --min-iters). Prints one line per measurement, with the
machine's 1-minute load average before the busy loops were added (other work shares
the machine), and a table. The numbers behind metatrain/threads.py's rule.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time


def learner_and_sampler(overrides: list[str]):
    import torch
    from hydra import compose, initialize_config_dir

    from metatrain.algorithms import build_learner
    from metatrain.cli import CONF_DIR
    from metatrain.data.tasks import EpisodeSampler
    from metatrain.datasets import load_splits
    from metatrain.models import build_model

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=quickstart", *overrides])
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    ds = cfg.dataset
    learner = build_learner(cfg, build_model(cfg, device), device)
    shots, queries = learner.train_shape(ds.shots, ds.queries)
    images = load_splits(ds).images["train"]
    rotate = getattr(ds, "augment_rotation", False)
    sampler = EpisodeSampler(images, ds.ways, shots, queries, ds.mean, ds.std, "train", rotate)
    return learner, sampler, cfg.algorithm.meta_batch


def rate(learner, sampler, meta_batch: int, threads: int, seconds: float, min_iters: int):
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    learner.meta_step(sampler.sample(meta_batch, g), 0)  # warm-up: caches, allocator
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        learner.meta_step(sampler.sample(meta_batch, g), n + 1)
        n += 1
    return n / (time.perf_counter() - t0), n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--loads", default="0,2,4")
    p.add_argument("--seconds", type=float, default=20.0, help="timed per measurement")
    p.add_argument("--min-iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="thread counts alternate this often")
    args, overrides = p.parse_known_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the busy loops too
    learner, sampler, meta_batch = learner_and_sampler(overrides)
    table: dict[tuple[int, int], list[float]] = {}
    for load in (int(x) for x in args.loads.split(",")):
        before = os.getloadavg()[0]
        hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(load)]
        try:
            time.sleep(2)
            for _ in range(args.rounds):
                for t in threads:
                    r, n = rate(learner, sampler, meta_batch, t, args.seconds, args.min_iters)
                    table.setdefault((load, t), []).append(r)
                    print(
                        f"+{load} busy loops (load average before them {before:.2f}): "
                        f"{t} thread{'s' * (t > 1)} {r:.2f} it/s over {n} iterations",
                        flush=True,
                    )
        finally:
            for h in hogs:
                h.kill()
                h.wait()
    head = " | ".join(f"{t} thread{'s' * (t > 1)} it/s" for t in threads)
    print(f"\n| busy loops added | {head} |\n|---|" + "---|" * len(threads))
    for load in sorted({k[0] for k in table}):
        cells = [f"{statistics.median(table[load, t]):.2f}" for t in threads]
        print(f"| {load} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
