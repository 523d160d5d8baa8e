"""Seconds per meta-iteration, tasks per second, FLOP/s and peak memory of named settings.

    python scripts/bench.py                                   # the four main settings, CPU (+ CUDA)
    python scripts/bench.py --settings all --backend both --threads 2 --out bench.json
    python scripts/bench.py --settings mamlpp-omniglot-20w1s --device cuda --iters 20

Each setting is a paper preset (conf/experiment/) run on random uint8 images of the
dataset's shape, so no data set is needed. Each (setting, device, backend) runs in its own
worker process: warm-up iterations, then --iters timed meta-iterations, each drawing its
task batch on the device and taking one meta-step, exactly as the run loop does. Reported:

- s/iter: median (and min) wall time of a meta-iteration; CUDA is synchronised around each.
- tasks/s: meta-batch / median s/iter.
- GFLOP/iter: convolution and matmul FLOPs of one meta-iteration counted by
  torch.utils.flop_counter.FlopCounterMode on the per-task loop (the count is the maths,
  not the backend; double-backward convolutions are counted). Elementwise ops are not
  counted.
- GFLOP/s: GFLOP/iter / median s/iter.
- bound s: GFLOP/iter / the machine's float32 matmul GFLOP/s (a 4096x4096 torch.mm with
  the same threads, best of 5), and x bound = s/iter / bound s, the issue's yardstick.
  oneDNN's convolutions can run faster than torch.mm on CPU, so x bound can be below 1;
  the conv GFLOP/s of one large NHWC convolution is reported beside it for that reason.
- peak MB: CUDA: torch.cuda.max_memory_allocated over the timed iterations. CPU: peak
  resident set size (Linux VmHWM, reset just before the timed iterations) minus the
  process's resident size before the data and model were built.

Timings on a shared machine are only as good as its idle cores: the CPU time that other
processes used during the timed iterations (from /proc/stat) is recorded, in cores, and
rows where it exceeds 0.25 cores are flagged (busy) in the table.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (experiment preset, extra overrides, iteration to run at, what the phase is)
SETTINGS = {
    "maml-omniglot-5w1s": (
        "maml_omniglot_5w1s",
        [],
        0,
        "second order, 1 step, meta-batch 32",
    ),
    "mamlpp-omniglot-20w1s": (
        "mamlpp_omniglot_20w1s",
        ["algorithm.da=false"],
        0,
        "second order + multi-step loss (the authors' 5.5 s phase)",
    ),
    "mamlpp-miniimagenet-5w1s": (
        "mamlpp_miniimagenet_5w1s",
        ["algorithm.da=false"],
        0,
        "second order + multi-step loss (the authors' 10.6 s phase)",
    ),
    "reptile-omniglot-5w5s": (
        "reptile_omniglot_5w5s",
        [],
        0,
        "5 inner Adam steps on batches of 10, meta-batch 5",
    ),
    # The other phases of a MAML++ run: epochs 0-9 are first order (DA) with the
    # multi-step loss; after da_epochs (50) second order with the final-step loss only.
    "mamlpp-omniglot-20w1s-fo": (
        "mamlpp_omniglot_20w1s",
        [],
        0,
        "first order + multi-step loss (epoch 0 as configured)",
    ),
    "mamlpp-omniglot-20w1s-late": (
        "mamlpp_omniglot_20w1s",
        [],
        25000,
        "second order, final-step loss (epoch 50 on)",
    ),
    "mamlpp-miniimagenet-5w1s-fo": (
        "mamlpp_miniimagenet_5w1s",
        [],
        0,
        "first order + multi-step loss (epoch 0 as configured)",
    ),
    "mamlpp-miniimagenet-5w1s-late": (
        "mamlpp_miniimagenet_5w1s",
        [],
        25000,
        "second order, final-step loss (epoch 50 on)",
    ),
}
MAIN = [
    "maml-omniglot-5w1s",
    "mamlpp-omniglot-20w1s",
    "mamlpp-miniimagenet-5w1s",
    "reptile-omniglot-5w5s",
]
# The MAML++ authors' implementation, CPU, 2 threads, same settings and phase (the
# figures quoted in the issue that asked for this benchmark; not measured here).
AUTHORS_S_PER_ITER = {"mamlpp-omniglot-20w1s": 5.5, "mamlpp-miniimagenet-5w1s": 10.6}


# -- measurements that need no model ----------------------------------------------------


def matmul_gflops(device, reps: int = 5, n: int = 4096) -> float:
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n**3 / _best_time(lambda: a @ b, device, reps) / 1e9


def conv_gflops(device, reps: int = 5) -> float:
    """One large 64->64 3x3 NHWC convolution, forward: what oneDNN/cuDNN reach."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(128, 64, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    flops = 2 * 128 * 64 * 64 * 9 * 32 * 32
    return flops / _best_time(lambda: F.conv2d(x, w, None, 1, 1), device, reps) / 1e9


def _best_time(fn, device, reps: int) -> float:
    import torch

    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _busy_seconds() -> float | None:
    """CPU seconds spent by all processes on the machine so far (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


# -- one worker: one setting on one device with one backend -------------------------------


def count_flops(fn) -> int:
    """Conv/matmul FLOPs of fn() with FlopCounterMode. Its per-module tracker hooks
    autograd in a way that torch.autograd.grad(create_graph=True) rejects, and the
    per-module breakdown is not needed, so it is replaced by a no-op."""
    from torch.utils.flop_counter import FlopCounterMode

    class _NoModules:
        def __init__(self):
            self.parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModules()
    with counter:
        fn()
    return counter.get_total_flops()


def random_images(cfg, shots: int, queries: int):
    """uint8 images shaped like the dataset's: (classes, per class, C, H, W)."""
    import torch

    ds = cfg.dataset
    classes = max(64, ds.ways)
    per_class = max(20, shots + queries)
    g = torch.Generator().manual_seed(0)
    shape = (classes, per_class, ds.channels, ds.image_size, ds.image_size)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def compose(setting: str, backend: str, extra: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from metatrain.cli import CONF_DIR

    experiment, overrides, _, _ = SETTINGS[setting]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(
            "config",
            overrides=[
                f"experiment={experiment}",
                "logger=none",
                f"train.backend={backend}",
                *overrides,
                *extra,
            ],
        )


def worker(job: dict) -> dict:
    import torch

    from metatrain.algorithms import build_learner
    from metatrain.algorithms.inner import setup_device
    from metatrain.data.tasks import EpisodeSampler
    from metatrain.models import build_model

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    setting = job["setting"]
    iteration = SETTINGS[setting][2]
    cfg = compose(setting, job["backend"], job["overrides"])
    setup_device(device, cfg.train)
    torch.manual_seed(0)
    rss_before = _rss_mb("VmRSS")

    model = build_model(cfg, device)
    learner = build_learner(cfg, model, device)
    ds = cfg.dataset
    shots, queries = learner.train_shape(ds.shots, ds.queries)
    images = random_images(cfg, shots, queries).to(device)
    sampler = EpisodeSampler(images, ds.ways, shots, queries, ds.mean, ds.std)
    generator = torch.Generator(device=device).manual_seed(0)
    meta_batch = cfg.algorithm.meta_batch

    def step():
        batch = sampler.sample(meta_batch, generator)
        return learner.meta_step(batch, iteration)

    probe = sampler.sample(meta_batch, generator)
    picked = learner.backend_for(probe, iteration)

    flops = None
    if job["flops"]:
        # Counted on a twin learner with the per-task loop: the FLOPs of the maths.
        # (Under vmap some counted ops differ: functorch also forms input gradients
        # that the loop knows are not needed.)
        twin_cfg = compose(setting, "loop", job["overrides"])
        twin = build_learner(twin_cfg, build_model(twin_cfg, device), device)
        flops = count_flops(lambda: twin.meta_step(probe, iteration))
        del twin
    for _ in range(job["warmup"]):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_peak_rss()
    busy0, own0, wall0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    times = []
    for _ in range(job["iters"]):
        t = time.perf_counter()
        metrics = step()
        sync()
        times.append(time.perf_counter() - t)
    busy1, own1, wall1 = _busy_seconds(), _own_seconds(), time.perf_counter()
    # Cores that other processes kept busy while this one was timed: on a shared
    # machine the figures above are only as good as this is close to 0.
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    loss = float(metrics["loss"])  # once, after timing: no sync inside the timed loop
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        peak_how = "cuda max_memory_allocated"
    else:
        hwm = _rss_mb("VmHWM") if reset else None
        if hwm is not None and rss_before is not None:
            peak_mb, peak_how = hwm - rss_before, "VmHWM - RSS before build"
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_mb, peak_how = peak_kb / 1024, "ru_maxrss (whole process)"
    median = statistics.median(times)
    return {
        **job,
        "phase": SETTINGS[setting][3],
        "iteration": iteration,
        "meta_batch": meta_batch,
        "backend_used": picked,
        "s_per_iter": median,
        "s_per_iter_min": min(times),
        "times": times,
        "tasks_per_s": meta_batch / median,
        "flops_per_iter": flops,
        "peak_mem_mb": peak_mb,
        "peak_mem_how": peak_how,
        "loss": loss,
        "other_cores_busy": others,
    }


def wait_idle(max_wait: float, calm: float = 10.0, limit: float = 0.15) -> bool:
    """Wait (up to max_wait s) until other processes have used < `limit` cores for
    `calm` seconds in a row. Returns whether the machine went quiet."""
    start, quiet = time.perf_counter(), 0.0
    while time.perf_counter() - start < max_wait:
        b0 = _busy_seconds()
        if b0 is None:
            return True
        time.sleep(1.0)
        quiet = quiet + 1.0 if (_busy_seconds() - b0) < limit else 0.0
        if quiet >= calm:
            return True
    return False


def run_worker(job: dict, timeout: float) -> dict:
    """Run one job in a fresh interpreter: its own allocator state and peak memory."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"])}
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        return {**job, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the report ---------------------------------------------------------------------------


def machine(device, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "matmul_gflops": matmul_gflops(device),
        "conv_gflops": conv_gflops(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def add_derived(result: dict, machines: dict) -> dict:
    if "error" in result:
        return result
    m = machines[result["device"]]
    flops = result["flops_per_iter"]
    if flops:
        result["gflops_per_iter"] = flops / 1e9
        result["achieved_gflops"] = flops / 1e9 / result["s_per_iter"]
        result["bound_s"] = flops / 1e9 / m["matmul_gflops"]
        result["x_bound"] = result["s_per_iter"] / result["bound_s"]
    ref = AUTHORS_S_PER_ITER.get(result["setting"])
    if ref and result["device"] == "cpu" and result["threads"] == 2:
        result["authors_s_per_iter"] = ref
        result["speedup_vs_authors"] = ref / result["s_per_iter"]
    others = result.get("other_cores_busy")
    result["contended"] = others is not None and others > 0.25
    return result


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    for dev, m in report["machines"].items():
        console.print(
            f"[bold]{dev}[/]: {m.get('gpu', m['cpu'])}, torch {m['torch']}, "
            f"{m['threads']} threads: matmul {m['matmul_gflops']:.1f} GFLOP/s (fp32 4096^2), "
            f"conv {m['conv_gflops']:.1f} GFLOP/s (64->64 3x3 NHWC)"
        )
    table = Table(title="metatrain: seconds per meta-iteration")
    cols = [
        "setting",
        "device",
        "backend",
        "s/iter",
        "min",
        "tasks/s",
        "GFLOP/iter",
        "GFLOP/s",
        "bound s",
        "x bound",
        "authors s",
        "peak MB",
    ]
    for c in cols:
        table.add_column(c, justify="left" if c in ("setting", "device", "backend") else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in report["results"]:
        if "error" in r:
            table.add_row(r["setting"], r["device"], r["backend"], f"[red]{r['error']}")
            continue
        backend = r["backend"] if r["backend"] != "auto" else f"auto={r['backend_used']}"
        flag = " [yellow](busy)" if r.get("contended") else ""
        table.add_row(
            r["setting"],
            r["device"],
            backend,
            f(r["s_per_iter"], ".3f") + flag,
            f(r["s_per_iter_min"], ".3f"),
            f(r["tasks_per_s"], ".1f"),
            f(r.get("gflops_per_iter"), ".1f"),
            f(r.get("achieved_gflops"), ".1f"),
            f(r.get("bound_s"), ".2f"),
            f(r.get("x_bound"), ".2f"),
            f(r.get("authors_s_per_iter"), ".1f"),
            f(r["peak_mem_mb"], ".0f"),
        )
    console.print(table)
    console.print(
        "s/iter: median over the timed iterations; bound s = GFLOP/iter / matmul GFLOP/s; "
        "x bound = s/iter / bound s; authors s: the MAML++ authors' code, CPU 2 threads (quoted); "
        "(busy): other processes kept > 0.25 cores busy during the timed iterations."
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(MAIN), help="comma list, or 'all'")
    p.add_argument("--device", default="all", choices=["all", "auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "loop", "vmap", "both"])
    p.add_argument("--iters", type=int, default=5, help="timed meta-iterations per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed meta-iterations first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--out", default="bench.json", help="JSON report path ('-' for stdout)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="before each worker, wait up to this many seconds for other processes to "
        "leave the CPU idle (shared machines)",
    )
    p.add_argument(
        "--retry-busy", type=int, default=0, help="rerun a worker flagged (busy) up to N times"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="extra config overrides for every setting, e.g. train.amp_bf16=true",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    names = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        p.error("--device cuda but no CUDA device is visible")
    devices = {
        "all": ["cpu", "cuda"] if cuda else ["cpu"],
        "auto": ["cuda" if cuda else "cpu"],
        "cpu": ["cpu"],
        "cuda": ["cuda"],
    }[args.device]
    backends = ["loop", "vmap", "auto"] if args.backend == "both" else [args.backend]
    threads = args.threads or torch.get_num_threads()

    from metatrain.algorithms.inner import setup_device

    machines = {}
    for dev in devices:
        if args.wait_idle > 0 and dev == "cpu":
            wait_idle(args.wait_idle)
        device = torch.device(dev)
        setup_device(device)
        machines[dev] = machine(device, threads)
    results = []
    for name in names:
        for dev in devices:
            for backend in backends:
                job = {
                    "setting": name,
                    "device": dev,
                    "backend": backend,
                    "threads": threads,
                    "iters": args.iters,
                    "warmup": args.warmup,
                    "flops": not args.no_flops,
                    "overrides": args.overrides,
                }
                for attempt in range(args.retry_busy + 1):
                    if args.wait_idle > 0 and dev == "cpu":
                        wait_idle(args.wait_idle)
                    r = add_derived(run_worker(job, args.timeout), machines)
                    if not r.get("contended"):
                        break
                results.append(r)
                shown = r.get("error") or f"{r['s_per_iter']:.3f} s/iter ({r['backend_used']})"
                print(f"{name} {dev} {backend}: {shown}", file=sys.stderr, flush=True)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machines": machines,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
