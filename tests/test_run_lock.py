"""One owner per run directory (metatrain/run_lock.py): a second process is refused
with the holder named and nothing of the run touched; the lock goes with its holder
however it ends, kill -9 included. Holders are child processes, synchronised by a
line on a pipe, never by sleeping."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from metatrain import run_lock
from metatrain.algorithms.maml import Maml
from metatrain.train import train
from tests.conftest import TINY, make_cfg, run_cli, signal_cli_when

ARGS = [
    "logger=none",
    "model.filters=4",
    "algorithm.meta_batch=2",
    "dataset.queries=1",
    "train.iterations=4",
    "train.log_interval=2",
    "train.val_interval=2",
    "train.checkpoint_interval=2",
    "train.keep_best=1",
    "eval.val_tasks=2",
    "eval.test_tasks=4",
]

# Take the lock, say so, hold it until stdin closes (or the process is killed).
HOLD = """
import sys
from metatrain import run_lock
run_lock.take(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""
# Try to take the lock once; print what happened.
PROBE = """
import sys
from metatrain import run_lock
try:
    run_lock.take(sys.argv[1])
    print("took")
except run_lock.RunLocked as e:
    print(e)
"""


def hold_in_child(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"  # blocks until the child holds it
    return proc


def probe(run_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(run_dir)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_cli_run(omniglot_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    out = run_cli(*ARGS, f"hydra.run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_second_process_is_refused_naming_the_holder_and_touches_nothing(finished_cli_run):
    run_dir = finished_cli_run
    holder = hold_in_child(run_dir)
    try:
        before = snapshot(run_dir)
        assert {"results.json", "checkpoints/last.pt", "cli.log", ".hydra/config.yaml"} <= set(
            before
        )
        who = f"pid {holder.pid} on {socket.gethostname()} since "
        with pytest.raises(run_lock.RunLocked) as refused:
            train(make_cfg(*ARGS), run_dir)
        assert who in str(refused.value) and "wait for it to end" in str(refused.value)
        # The CLI, with a key that would change .hydra/config.yaml (logger is not in the
        # directory's name), is refused before Hydra writes anything.
        other = [a for a in ARGS if a != "logger=none"]
        out = run_cli(*other, "logger=wandb", f"hydra.run.dir={run_dir}")
        assert out.returncode == 2, out.stderr[-3000:]
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("metatrain: error: "), out.stderr
        assert who in lines[0] and "hydra.run.dir=" in lines[0], lines[0]
        assert snapshot(run_dir) == before
    finally:
        holder.stdin.close()
        holder.wait()
    assert probe(run_dir) == "took"  # the holder ended: released


def test_eval_reads_a_run_that_is_being_trained(finished_cli_run):
    from tests.test_eval_cli import eval_cli

    holder = hold_in_child(finished_cli_run)
    try:
        out = eval_cli(str(finished_cli_run), "eval.test_tasks=4")
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        holder.stdin.close()
        holder.wait()


def test_released_after_a_normal_finish(omniglot_data, tmp_path):
    train(make_cfg(*ARGS), tmp_path)
    assert not run_lock.held(tmp_path)
    info = json.loads((tmp_path / run_lock.NAME).read_text())
    assert info["pid"] == os.getpid()  # the lock file named this process while it trained
    assert probe(tmp_path) == "took"


def test_released_after_an_exception(omniglot_data, tmp_path, monkeypatch):
    def broken(self, batch, iteration):
        raise RuntimeError("broken step")

    monkeypatch.setattr(Maml, "meta_step", broken)
    with pytest.raises(RuntimeError, match="broken step"):
        train(make_cfg(*ARGS), tmp_path)
    assert not run_lock.held(tmp_path)
    assert probe(tmp_path) == "took"


def test_released_after_sigterm(omniglot_data, tmp_path):
    args = [*TINY, "model.filters=4", "train.iterations=400", "train.checkpoint_interval=1"]
    last = tmp_path / "checkpoints" / "last.pt"
    proc = signal_cli_when(last.exists, signal.SIGTERM, *args, f"hydra.run.dir={tmp_path}")
    proc.wait(timeout=900)
    assert proc.returncode == 128 + signal.SIGTERM
    assert probe(tmp_path) == "took"


def test_a_holder_killed_with_sigkill_leaves_a_lock_the_next_run_takes(omniglot_data, tmp_path):
    holder = hold_in_child(tmp_path)
    assert probe(tmp_path).startswith(f"{tmp_path.resolve()} is being trained by pid {holder.pid}")
    holder.kill()  # SIGKILL: no handler, no finally
    holder.wait()
    assert json.loads((tmp_path / run_lock.NAME).read_text())["pid"] == holder.pid  # left over
    results = train(make_cfg(*ARGS), tmp_path)
    assert results["status"] == "finished"
    assert json.loads((tmp_path / run_lock.NAME).read_text())["pid"] == os.getpid()


def test_only_rank_zero_takes_the_lock(tmp_path):
    holder = hold_in_child(tmp_path)
    try:
        with run_lock.hold(tmp_path, rank=1):  # another rank of the holder's run
            assert not run_lock.held(tmp_path)
        with pytest.raises(run_lock.RunLocked), run_lock.hold(tmp_path, rank=0):
            pass
    finally:
        holder.stdin.close()
        holder.wait()


def test_parallel_sweep_cells_do_not_block_each_other(omniglot_data, tmp_path):
    args = ["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "seed=0,1", *ARGS]
    out = run_cli(*args, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list(tmp_path.glob("*/results.json"))) == 2


def test_a_sweep_cell_held_elsewhere_is_refused_and_reported(omniglot_data, tmp_path):
    args = ["-m", "seed=0,1", *ARGS, f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=s${seed}"]
    held_cell = tmp_path / "s1"
    holder = hold_in_child(held_cell)
    try:
        out = run_cli(*args)
    finally:
        holder.stdin.close()
        holder.wait()
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "1 of 2 cells did not finish (s1: failed: " in line, line
    assert f"is being trained by pid {holder.pid}" in line, line
    assert (tmp_path / "s0" / "results.json").exists()
    assert not (held_cell / "results.json").exists() and not (held_cell / "error.txt").exists()
