"""metatrain beside a naive per-task loop and the MAML++ authors' code, timed in one run.

    make bench                                                # the main settings, ratios
    python scripts/bench.py --authors-dir /tmp/HowToTrainYourMAMLPytorch --threads 2
    python scripts/bench.py --settings all --backend both --threads 2 --out bench.json
    python scripts/bench.py --settings eval-reptile-omniglot-5w5s --iters 2 eval.batch=10

Each setting is a paper preset (conf/experiment/) run on random uint8 images of the
dataset's shape, so no data set is needed. A training setting times meta-iterations; an
evaluation setting (eval-*) times the adaptation and query prediction of one batch of
eval.batch tasks, reported as tasks per second. Each (setting, implementation, device,
backend) runs in its own worker process: warm-up units, then --iters timed ones, each on
a fresh random task batch. Implementations, all timed the same way in the same run:

- ours: metatrain's learner (train.backend as given; auto = what a run would use).
- naive: the per-task loop of scripts/bench_baselines.py (functional_call +
  torch.autograd.grad per task, nn.BatchNorm2d without running statistics) on the same
  shapes; "x naive" = naive s / ours s.
- authors: with --authors-dir DIR (a checkout of the MAML++ authors' code, fetched, never
  part of this repository), their run_train_iter / run_validation_iter on batches of the
  same shapes, MAML++ settings only; "x authors" = authors s / ours s.

Also reported: GFLOP per unit (convolution and matmul FLOPs counted with
torch.utils.flop_counter on metatrain's per-task loop: the maths, not the backend), the
machine's float32 matmul rate (4096^2 torch.mm, best of 5, same threads), bound s =
GFLOP / matmul GFLOP/s and x bound = ours s / bound s; peak memory (CUDA
max_memory_allocated, or CPU VmHWM minus the resident size before the build).

The report records the CPU model and its vector flags. A shared machine makes every
figure an upper bound: the CPU time other processes used while a worker was timed
(/proc/stat) is recorded in cores, rows above 0.25 cores are marked (busy), and a run
with any busy row is marked CONTENDED. Ratios within one run share the contention but
still move with it. --wait-idle / --retry-busy wait for, or retry until, quiet cores.
Even an idle 2-core VM drifts (the matmul rate moved between 134 and 180 GFLOP/s from
one run to the next): --rounds N times each setting's implementations in turn, N times
over, and reports the median round, so that ours and the baselines share the drift;
the matmul rate is measured at the start and the end, and the faster one makes the
bound.

On CUDA: --speed plain,compile,graphs,bf16 times each of our rows under each set of
speed switches (SPEEDS: train.compile, train.cuda_graphs, train.amp_bf16; '+' joins
them, e.g. bf16+compile), the baselines once; bf16 rows are bounded by the bf16 matmul
rate. --budget S stops starting workers after S seconds (the rest are recorded as
skipped), the report is rewritten after every setting (a killed run keeps its finished
rows), and --append adds the rows to an earlier report, so that one report gathers
several runs ordered by priority (scripts/gpu_check.sh).
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
        "second order + multi-step loss (the authors' epoch-0 phase)",
    ),
    "mamlpp-miniimagenet-5w1s": (
        "mamlpp_miniimagenet_5w1s",
        ["algorithm.da=false"],
        0,
        "second order + multi-step loss (the authors' epoch-0 phase)",
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
    "fomaml-omniglot-5w1s": (
        "fomaml_omniglot_5w1s",
        ["algorithm.meta_batch=8", "dataset.queries=15", "model.downsample=pool"],
        0,
        "first order, 1 step, meta-batch 8, 15 queries, max-pool net",
    ),
    # Evaluation: adapt eval.batch tasks from the meta-parameters, predict their queries.
    "eval-maml-omniglot-5w1s": ("maml_omniglot_5w1s", [], 0, "3 SGD steps per task"),
    "eval-mamlpp-omniglot-20w1s": ("mamlpp_omniglot_20w1s", [], 0, "5 SGD steps per task"),
    "eval-mamlpp-miniimagenet-5w1s": (
        "mamlpp_miniimagenet_5w1s",
        [],
        0,
        "5 SGD steps per task",
    ),
    "eval-reptile-omniglot-5w5s": (
        "reptile_omniglot_5w5s",
        [],
        0,
        "50 Adam steps on batches of 10 per task",
    ),
}
# MAML, ANIL and Meta-SGD 5-way 1-shot on MiniImageNet-sized input (MAML's row: meta-batch
# 4, 15 queries; Meta-SGD one step), with conv4 (32 filters) and with ResNet-12. The
# presets set conv4's keys, so the ResNet-12 rows spell MAML's row out (no preset).
_MAML_ROW = ["dataset=miniimagenet", "model=resnet12", "algorithm.meta_batch=4"]
_MAML_ROW += ["algorithm.inner_lr=0.01", "algorithm.grad_clip=10.0", "algorithm.eval_steps=10"]
for _algo, _steps, _phase in (
    ("maml", 5, "second order, 5 steps"),
    ("anil", 5, "second order, 5 head-only steps"),
    ("metasgd", 1, "second order, 1 step, per-element rates"),
):
    SETTINGS[f"{_algo}-miniimagenet-5w1s"] = (
        f"{_algo}_miniimagenet_5w1s",
        [],
        0,
        f"{_phase}, meta-batch 4",
    )
    SETTINGS[f"{_algo}-resnet12-miniimagenet-5w1s"] = (
        None,
        [f"algorithm={_algo}", *_MAML_ROW, f"algorithm.train_steps={_steps}"]
        + ["algorithm.eval_steps=1"] * (_algo == "metasgd"),
        0,
        f"{_phase}, meta-batch 4",
    )
# Peak memory and time against inner steps, second order, one task (meta-batch 1), with
# and without train.inner_checkpoint (steps recomputed in the backward sweep).
for _model, _extra in (("conv4", []), ("resnet12", ["algorithm=maml"])):
    for _k in (1, 5, 10, 25):
        for _ckpt in (False, True):
            SETTINGS[f"steps-{_model}-{_k}{'-ckpt' if _ckpt else ''}"] = (
                "maml_miniimagenet_5w1s" if not _extra else None,
                [*(_extra and _MAML_ROW), *_extra, "algorithm.meta_batch=1"]
                + [f"algorithm.train_steps={_k}"]
                + [f"train.inner_checkpoint={str(_ckpt).lower()}"],
                0,
                f"second order, {_k} steps, meta-batch 1" + (", recomputed" if _ckpt else ""),
            )
STEPS = [n for n in SETTINGS if n.startswith("steps-")]
MAIN = [
    "maml-omniglot-5w1s",
    "fomaml-omniglot-5w1s",
    "mamlpp-omniglot-20w1s",
    "mamlpp-miniimagenet-5w1s",
    "reptile-omniglot-5w5s",
    "eval-mamlpp-omniglot-20w1s",
    "eval-mamlpp-miniimagenet-5w1s",
    "eval-reptile-omniglot-5w5s",
]
# Where the authors' code runs the same maths: MAML++ with the multi-step loss, second
# order from the start (their configs' first_order_to_second_order_epoch = -1), epoch 0.
AUTHORS_SETTINGS = {
    "mamlpp-omniglot-20w1s",
    "mamlpp-miniimagenet-5w1s",
    "eval-mamlpp-omniglot-20w1s",
    "eval-mamlpp-miniimagenet-5w1s",
}


# --speed modes: the overrides each adds to our rows (the baselines run once, plain).
SPEEDS = {
    "plain": [],
    "compile": ["train.compile=true"],
    "graphs": ["train.cuda_graphs=true"],
    "bf16": ["train.amp_bf16=true"],
}


def speed_overrides(speed: str) -> list[str]:
    """The overrides of a speed mode; '+' joins modes (bf16+compile)."""
    parts = speed.split("+")
    unknown = [m for m in parts if m not in SPEEDS]
    if unknown:
        raise ValueError(f"unknown speed modes {unknown}; known: {', '.join(SPEEDS)}")
    return [o for m in parts for o in SPEEDS[m]]


def kind_of(setting: str) -> str:
    """train: one meta-iteration per unit; eval: one batch of evaluation tasks."""
    return "eval" if setting.startswith("eval-") else "train"


# -- measurements that need no model ----------------------------------------------------


def matmul_gflops(device, reps: int = 5, n: int = 4096, dtype=None) -> float:
    """n^3 matmul rate (float32 by default, TF32 where setup_device allowed it)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
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
                *([f"experiment={experiment}"] if experiment else []),
                "logger=none",
                f"train.backend={backend}",
                *overrides,
                *extra,
            ],
        )


def worker(job: dict) -> dict:
    import torch

    from metatrain import distributed
    from metatrain.algorithms import build_learner
    from metatrain.algorithms.inner import setup_device
    from metatrain.data.tasks import EpisodeSampler
    from metatrain.models import build_model

    torch.set_num_threads(job["threads"])
    device = distributed.place(torch.device(job["device"]))
    # --procs: this worker is one rank; each meta-step takes its shard of the batch
    distributed.setup(device, 600)
    setting, impl = job["setting"], job.get("impl", "ours")
    kind = kind_of(setting)
    iteration = SETTINGS[setting][2]
    cfg = compose(setting, job["backend"], job["overrides"])
    setup_device(device, cfg.train)
    torch.manual_seed(0)
    rss_before = _rss_mb("VmRSS")

    model = build_model(cfg, device)
    learner = build_learner(cfg, model, device)
    if kind == "train" and distributed.world() > 1 and learner.sequential():
        # training refuses it too: the tasks of one meta-batch cannot be split
        raise SystemExit(f"one process only: {learner.sequential()}")
    ds = cfg.dataset
    shots, queries = (ds.shots, ds.queries)
    if kind == "train":
        shots, queries = learner.train_shape(ds.shots, ds.queries)
    images = random_images(cfg, shots, queries).to(device)
    sampler = EpisodeSampler(images, ds.ways, shots, queries, ds.mean, ds.std)
    generator = torch.Generator(device=device).manual_seed(0)
    tasks = cfg.eval.batch if kind == "eval" else cfg.algorithm.meta_batch
    probe = sampler.sample(tasks, generator)
    info, picked = {}, impl
    second = hasattr(learner, "second_order") and learner.second_order(iteration)

    if impl == "ours":
        evaluation = kind == "eval"
        picked = learner.backend_for(probe, iteration, evaluation)
        if evaluation:
            # every rank adapts its share of the tasks; the gather of the logits is
            # left out (a few kB per batch)
            step = lambda: learner.predict(distributed.shard(sampler.sample(tasks, generator)))
        else:
            step = lambda: learner.meta_step(
                distributed.shard(sampler.sample(tasks, generator)), iteration
            )
    elif impl == "naive":
        from bench_baselines import build_naive

        weights = learner.step_weights(iteration) if hasattr(learner, "step_weights") else None
        step = build_naive(cfg, sampler, generator, kind, iteration, weights, second)
    else:
        from bench_baselines import build_authors

        step, info = build_authors(cfg, sampler, generator, kind, job["authors_dir"])

    flops = None
    if job["flops"] and impl == "ours":
        # Counted on a twin learner with the per-task loop: the FLOPs of the maths.
        # (Under vmap some counted ops differ: functorch also forms input gradients
        # that the loop knows are not needed.)
        twin_cfg = compose(setting, "loop", job["overrides"])
        twin = build_learner(twin_cfg, build_model(twin_cfg, device), device)
        if kind == "eval":
            flops = count_flops(lambda: twin.predict(probe))
        else:
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
        step()
        sync()
        times.append(time.perf_counter() - t)
    busy1, own1, wall1 = _busy_seconds(), _own_seconds(), time.perf_counter()
    # Cores that other processes kept busy while this one was timed: on a shared
    # machine the figures above are only as good as this is close to 0.
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
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
    top_ops = profile_ops(step, sync, job["profile"]) if job.get("profile") else None
    median = statistics.median(times)
    tasks = info.get("authors_tasks", tasks)
    return {
        **job,
        **info,
        "kind": kind,
        "phase": SETTINGS[setting][3],
        "iteration": iteration,
        "tasks": tasks,
        "backend_used": picked,
        "s_per_iter": median,
        "s_per_iter_min": min(times),
        "times": times,
        "tasks_per_s": tasks / median,
        "flops_per_iter": flops,
        "peak_mem_mb": peak_mb,
        "peak_mem_how": peak_how,
        "other_cores_busy": others,
        "top_ops": top_ops,
    }


def profile_ops(step, sync, top: int) -> list[dict]:
    """One more unit under torch.profiler: the `top` operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        sync()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in ranked
    ]


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
    if job["device"] == "cpu" and job.get("impl") == "authors":
        # their code takes the GPU whenever one is visible
        env["CUDA_VISIBLE_DEVICES"] = ""
    if job.get("procs", 1) > 1:
        return _run_ranks(cmd, env, job, timeout)
    try:
        out = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {**job, "error": _error_line(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_ranks(cmd, env, job, timeout) -> dict:
    """The job as `procs` ranks of one distributed run; rank 0's row is the answer."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    n = job["procs"]
    procs = []
    for r in range(n):
        rank_env = {**env, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                    "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {**job, "error": f"timed out after {timeout:.0f} s"}
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            return {**job, "error": _error_line(err)}
    return json.loads(outs[0][0].strip().splitlines()[-1])


def _error_line(stderr: str) -> str:
    """The exception line of a worker's traceback (not its last line, which may be a
    continuation of a chained message), else the last line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.replace(".", "").isidentifier() and head.endswith(("Error", "Exception")):
            return line
    return lines[-1] if lines else "failed"


def merge_rounds(parts: list[dict]) -> dict:
    """One row from a job run in several interleaved rounds: the median of the rounds'
    medians (each round's figure is in round_s), the worst contention and memory."""
    ok = [r for r in parts if "error" not in r]
    if len(ok) < 2:
        return ok[0] if ok else parts[0]
    row = dict(ok[0])  # the first round carries the FLOP count and the profile
    row["round_s"] = [r["s_per_iter"] for r in ok]
    row["times"] = [t for r in ok for t in r["times"]]
    row["s_per_iter"] = statistics.median(row["round_s"])
    row["s_per_iter_min"] = min(r["s_per_iter_min"] for r in ok)
    row["tasks_per_s"] = row["tasks"] / row["s_per_iter"]
    row["peak_mem_mb"] = max(r["peak_mem_mb"] for r in ok)
    row["other_cores_busy"] = max(r.get("other_cores_busy") or 0.0 for r in ok)
    return row


# -- the report ---------------------------------------------------------------------------


def machine(device, threads: int, n: int = 4096) -> dict:
    import torch

    torch.set_num_threads(threads)
    model, flags = _cpu_info()
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": model,
        "cpu_flags": flags,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "matmul_gflops": matmul_gflops(device, n=n),
        "matmul_size": n,
        "conv_gflops": conv_gflops(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32"] = torch.backends.cuda.matmul.allow_tf32
        # the ceiling of rows under bf16 autocast; 8192^2 fills an H100/H200
        info["matmul_bf16_gflops"] = matmul_gflops(device, n=8192, dtype=torch.bfloat16)
    return info


# The vector-unit flags that decide which oneDNN/ATen kernels run.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")
VECTOR_FLAGS += ("amx_tile", "amx_bf16", "asimd", "sve")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def _cpu_info() -> tuple[str, list[str]]:
    """CPU model name and its vector flags (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = [f for f in value.split() if f in VECTOR_FLAGS]
    except OSError:
        pass
    return model, flags


def add_derived(result: dict, machines: dict) -> dict:
    if "error" in result:
        return result
    m = machines[result["device"]]
    flops = result.get("flops_per_iter")
    bf16 = "bf16" in result.get("speed", "plain").split("+") and "matmul_bf16_gflops" in m
    rate = m["matmul_bf16_gflops"] if bf16 else m["matmul_gflops"]
    if flops:
        result["gflops_per_iter"] = flops / 1e9
        result["achieved_gflops"] = flops / 1e9 / result["s_per_iter"]
        result["bound_gflops"] = rate
        result["bound_s"] = flops / 1e9 / rate
        result["x_bound"] = result["s_per_iter"] / result["bound_s"]
    others = result.get("other_cores_busy")
    result["contended"] = others is not None and others > 0.25
    return result


def add_ratios(results: list[dict]) -> None:
    """x naive and x authors of each of our rows: their s / ours s, same device, same
    threads, same run. Per task for evaluation, where batch sizes may differ."""

    def key(r):
        return (r["setting"], r["device"], r["threads"])

    base = {}
    for r in results:
        if r.get("impl") in ("naive", "authors") and "error" not in r:
            base[(*key(r), r["impl"])] = r
    for r in results:
        if r.get("impl", "ours") != "ours" or "error" in r:
            continue
        for impl in ("naive", "authors"):
            b = base.get((*key(r), impl))
            if b is not None:
                # their time for as many tasks as our unit holds (the authors' code
                # evaluates batch_size tasks at a time)
                r[f"{impl}_s_per_iter"] = b["s_per_iter"] * r["tasks"] / b["tasks"]
                r[f"{impl}_tasks_per_s"] = b["tasks_per_s"]
                r[f"x_{impl}"] = r["tasks_per_s"] / b["tasks_per_s"]
                r[f"{impl}_contended"] = b.get("contended", False)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 200))
    for dev, m in report["machines"].items():
        console.print(
            f"[bold]{dev}[/]: {m.get('gpu', m['cpu'])} ({m['cores']} cores; "
            f"{' '.join(m.get('cpu_flags', [])) or 'no flags read'}; torch ISA "
            f"{m.get('cpu_isa', '?')}), torch {m['torch']}, {m['threads']} threads: matmul "
            f"{m['matmul_gflops']:.1f} GFLOP/s (fp32 4096^2), conv {m['conv_gflops']:.1f} "
            "GFLOP/s (64->64 3x3 NHWC)"
            + (
                f", bf16 matmul {m['matmul_bf16_gflops']:.1f} GFLOP/s (8192^2)"
                if "matmul_bf16_gflops" in m
                else ""
            )
        )
    if report.get("contended"):
        console.print(
            "[bold yellow]CONTENDED RUN: other processes kept the cores busy; every time is "
            "an upper bound and the ratios move with the load. Redo on an idle machine."
        )
    table = Table(title=f"metatrain vs baselines, one run ({report['created']})")
    cols = ["setting", "dev", "ours backend", "unit", "ours s", "tasks/s", "naive s", "x naive"]
    cols += ["authors s", "x authors", "GFLOP", "bound s", "x bound", "peak MB"]
    for c in cols:
        table.add_column(c, justify="left" if c in cols[:4] else "right", no_wrap=c == "setting")

    def f(v, fmt, busy=False):
        return "-" if v is None else format(v, fmt) + (" [yellow](busy)" if busy else "")

    for r in report["results"]:
        if r.get("impl", "ours") != "ours":
            if "error" in r:
                table.add_row(r["setting"], r["device"], r["impl"], "", f"[red]{r['error']}")
            continue
        if "error" in r:
            speed = f" {r['speed']}" if r.get("speed", "plain") != "plain" else ""
            table.add_row(r["setting"], r["device"], r["backend"] + speed, "", f"[red]{r['error']}")
            continue
        backend = r["backend"] if r["backend"] != "auto" else f"auto={r['backend_used']}"
        if r.get("speed", "plain") != "plain":
            backend += f" {r['speed']}"
        unit = "iter" if r["kind"] == "train" else f"{r['tasks']} tasks"
        table.add_row(
            r["setting"],
            r["device"],
            backend,
            unit,
            f(r["s_per_iter"], ".3f", r.get("contended")),
            f(r["tasks_per_s"], ".1f"),
            f(r.get("naive_s_per_iter"), ".3f", r.get("naive_contended")),
            f(r.get("x_naive"), ".2f"),
            f(r.get("authors_s_per_iter"), ".3f", r.get("authors_contended")),
            f(r.get("x_authors"), ".2f"),
            f(r.get("gflops_per_iter"), ".1f"),
            f(r.get("bound_s"), ".2f"),
            f(r.get("x_bound"), ".2f"),
            f(r["peak_mem_mb"], ".0f"),
        )
    console.print(table)
    console.print(
        "s: median over the timed units (a meta-iteration, or one batch of evaluation "
        "tasks); naive s / authors s: theirs for as many tasks; x naive / x authors = their "
        "time per task / ours, measured in this run; "
        "bound s = GFLOP / matmul GFLOP/s (bf16 rows: the bf16 rate); x bound = ours s / bound s; (busy): other "
        "processes kept > 0.25 cores busy while that row was timed."
    )


def print_profiles(report: dict) -> None:
    for r in report["results"]:
        if "error" in r:
            continue
        if not r.get("top_ops"):
            continue
        print(
            f"\n{r['setting']} {r.get('impl', 'ours')} ({r['backend_used']}): top ops by self time"
        )
        for o in r["top_ops"]:
            print(
                f"  {o['op']:<40} {o['self_ms']:10.1f} ms {100 * o['share']:5.1f}% {o['calls']:7d} calls"
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(MAIN), help="comma list, or 'all'")
    p.add_argument("--device", default="all", choices=["all", "auto", "cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "loop", "vmap", "groups", "both"])
    p.add_argument("--iters", type=int, default=5, help="timed units per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed units first")
    p.add_argument(
        "--baselines",
        default="naive,authors",
        help="comma list of naive, authors ('' for none); authors needs --authors-dir",
    )
    p.add_argument(
        "--authors-dir",
        help="a checkout of github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch to time "
        "beside the MAML++ settings",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument(
        "--procs", type=int, default=1,
        help="processes of one distributed run (gloo/NCCL), each with --threads threads: "
        "ours only; compare --procs 2 --threads 1 with --procs 1 --threads 2",
    )  # fmt: skip
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile one more unit of each row with torch.profiler; print its top N ops",
    )
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
        "--rounds",
        type=int,
        default=1,
        help="time each setting's implementations in turn, N times over, and report the "
        "median round: ours and the baselines then share the machine's drift",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="extra config overrides for every setting, e.g. train.amp_bf16=true",
    )
    p.add_argument(
        "--speed",
        default="plain",
        help=f"comma list of speed modes for our rows ({', '.join(SPEEDS)}; '+' joins them)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds for the whole run: no worker starts after it (0: no limit)",
    )
    p.add_argument(
        "--append", action="store_true", help="add the rows to the report already at --out"
    )
    p.add_argument(
        "--matmul-size",
        type=int,
        default=4096,
        help="n of the n^3 float32 matmul that measures the machine's rate",
    )
    p.add_argument("--show", metavar="JSON", help="print the table of an earlier report")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.show:
        report = json.loads(Path(args.show).read_text())
        print(f"{report['command']}  ->  {args.show}")
        print_table(report)
        print_profiles(report)
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

    try:
        speeds = args.speed.split(",")
        for speed in speeds:
            speed_overrides(speed)
    except ValueError as e:
        p.error(f"--speed: {e}")
    earlier = {}
    if args.append and args.out != "-" and Path(args.out).is_file():
        earlier = json.loads(Path(args.out).read_text())
    machines = dict(earlier.get("machines", {}))
    for dev in devices:
        if dev in machines:  # measured by the run this one appends to
            continue
        if args.wait_idle > 0 and dev == "cpu":
            wait_idle(args.wait_idle)
        device = torch.device(dev)
        setup_device(device)
        machines[dev] = machine(device, threads, args.matmul_size)
    baselines = [b for b in args.baselines.split(",") if b]
    if "authors" in baselines and not args.authors_dir:
        baselines.remove("authors")
    if args.authors_dir and not (Path(args.authors_dir) / "few_shot_learning_system.py").exists():
        p.error(f"--authors-dir {args.authors_dir} holds no few_shot_learning_system.py")
    deadline = time.perf_counter() + args.budget if args.budget else None
    commands = [*earlier.get("commands", []), " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])]
    results = list(earlier.get("results", []))

    def write(results, final):
        rows = [dict(r) for r in results]
        add_ratios(rows)
        report = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "metatrain_commit": _git_commit(),
            "command": commands[-1],
            "commands": commands,
            "complete": final,
            "machines": machines,
            "contended": any(r.get("contended") for r in rows),
            "results": rows,
        }
        if args.out != "-":
            # rewritten after every setting: a run killed from outside keeps its rows
            tmp = Path(str(args.out) + ".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            os.replace(tmp, args.out)
        return report

    for name in names:
        for dev in devices:
            runs = [("ours", b, sp) for sp in speeds for b in backends]
            runs += [(b, "-", "plain") for b in baselines]
            # their code runs MAML++ at epoch 0 only (see AUTHORS_SETTINGS)
            runs = [r for r in runs if r[0] != "authors" or name in AUTHORS_SETTINGS]
            parts = {run: [] for run in runs}
            for rnd in range(max(args.rounds, 1)):
                for impl, backend, speed in runs:
                    job = {
                        "setting": name,
                        "impl": impl,
                        "device": dev,
                        "backend": "auto" if backend == "-" else backend,
                        "speed": speed,
                        "threads": threads,
                        "procs": args.procs if impl == "ours" else 1,
                        "iters": args.iters,
                        "warmup": args.warmup,
                        "flops": not args.no_flops and rnd == 0,
                        "overrides": [*speed_overrides(speed), *args.overrides],
                        "authors_dir": args.authors_dir,
                        "profile": args.profile if rnd == 0 else 0,
                    }
                    for attempt in range(args.retry_busy + 1):
                        left = None if deadline is None else deadline - time.perf_counter()
                        if left is not None and left < 1:
                            r = {**job, "error": "skipped: --budget spent"}
                            break
                        if args.wait_idle > 0 and dev == "cpu":
                            wait_idle(args.wait_idle)
                        r = run_worker(
                            job, args.timeout if left is None else min(args.timeout, left)
                        )
                        busy = (r.get("other_cores_busy") or 0.0) > 0.25
                        if not busy:
                            break
                    parts[(impl, backend, speed)].append(r)
                    shown = r.get("error") or f"{r['s_per_iter']:.4f} s ({r['backend_used']})"
                    where = f" round {rnd + 1}" if args.rounds > 1 else ""
                    print(
                        f"{name} {impl} {dev} {backend} {speed}{where}: {shown}",
                        file=sys.stderr,
                        flush=True,
                    )
            results += [add_derived(merge_rounds(parts[run]), machines) for run in runs]
            write(results, final=False)
    for dev in devices:
        # The matmul rate drifts with the machine: measured again at the end, and the
        # faster of the two makes the bound (the stricter x bound).
        end = matmul_gflops(torch.device(dev), n=machines[dev].get("matmul_size", 4096))
        m = machines[dev]
        m["matmul_gflops_start_end"] = [
            *m.get("matmul_gflops_start_end", [m["matmul_gflops"]]),
            end,
        ]
        if end > m["matmul_gflops"]:
            m["matmul_gflops"] = end
            results = [add_derived(r, machines) for r in results]
    report = write(results, final=True)
    if args.out == "-":
        print(json.dumps(report, indent=2))
    print_table(report)
    if args.profile:
        print_profiles(report)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
