"""Distributed runs end to end on real Omniglot: 2 ranks on CPU with gloo, started as
torchrun starts them (its variables in the environment) or by torchrun itself."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import metatrain_cmd
from tests.test_distributed import free_port

pytestmark = pytest.mark.slow

ARGS = [
    "logger=none", "model.filters=8", "algorithm.meta_batch=4", "dataset.queries=2",
    "train.iterations=16", "train.log_interval=1", "train.val_interval=8",
    "train.checkpoint_interval=4", "eval.val_tasks=10", "eval.test_tasks=20",
    "train.dist_timeout_s=30",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def start_ranks(run_dir, *extra):
    """Two ranks of one run, each a plain `metatrain` with torchrun's variables."""
    port = free_port()
    procs = []
    for r in (0, 1):
        env = {**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        cmd = [*metatrain_cmd(), *ARGS, f"hydra.run.dir={run_dir}", *extra]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    return procs


def when_saved(run_dir, procs, sig, victim):
    """Send `sig` to rank `victim` once last.pt exists; (return codes, stderr texts,
    seconds from the signal until every rank had ended)."""
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and procs[victim].poll() is None:
        time.sleep(0.05)
    assert last.exists(), procs[0].stderr.read().decode()[-2000:]
    procs[victim].send_signal(sig)
    sent = time.time()
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    return [p.returncode for p in procs], errs, time.time() - sent


def net(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["learner"]["net"]


def test_sigterm_to_one_rank_stops_all_and_resumes_bit_for_bit(omniglot_data, tmp_path):
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    codes, errs, _ = when_saved(stopped, start_ranks(stopped), signal.SIGTERM, victim=1)
    assert codes == [128 + signal.SIGTERM] * 2
    lines = [ln for e in errs for ln in e.splitlines() if ln.startswith("metatrain: ")]
    assert len(lines) == 1 and lines[0].startswith("metatrain: interrupted at iteration"), errs
    saved = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert f"iteration {saved};" in lines[0]
    # resumed under torchrun itself
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), "-m", "metatrain.cli", *ARGS,
         f"hydra.run.dir={stopped}"],
        check=False, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resuming {stopped} at iteration {saved}" in run.stderr
    for p in start_ranks(whole):
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    a, b = net(stopped), net(whole)
    assert all(torch.equal(a[k], b[k]) for k in b)  # bit for bit
    results = json.loads((stopped / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["test"] == json.loads((whole / "results.json").read_text())["test"]
    # rank 0 alone writes metrics.jsonl: each training row once
    rows = [json.loads(r) for r in (whole / "metrics.jsonl").read_text().splitlines()]
    trained = [r["iteration"] for r in rows if "train/loss" in r]
    assert trained == list(range(1, 17))


def test_a_dying_rank_ends_the_other_with_one_line(omniglot_data, tmp_path):
    procs = start_ranks(tmp_path)
    pid = procs[1].pid
    codes, errs, took = when_saved(tmp_path, procs, signal.SIGKILL, victim=1)
    assert codes == [2, -signal.SIGKILL]
    lines = [ln for ln in errs[0].splitlines() if ln.startswith("metatrain: ")]
    assert len(lines) == 1 and f"rank 1 (pid {pid}) has died" in lines[0], errs[0][-2000:]
    assert took < 60  # bounded: a broken connection, or at most train.dist_timeout_s
