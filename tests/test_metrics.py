"""RUN_DIR/metrics.jsonl and the plain log lines written when stderr is a file."""

import json
import re
import signal
import time

import pytest
import torch

from metatrain.metrics import MetricsFile, read_metrics
from tests.conftest import TINY, run_cli, signal_cli_when


def test_short_run_writes_one_row_per_log_and_validation(omniglot_data, tmp_path):
    out = run_cli(*TINY, "train.val_interval=15", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = read_metrics(tmp_path)
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/acc" in r]
    test = [r for r in rows if "test/acc" in r]
    assert [r["iteration"] for r in train] == [10, 20, 30]
    assert [r["iteration"] for r in val] == [15, 30]
    assert [r["iteration"] for r in test] == [30]
    for r in train:
        assert {"wall_time_s", "train/loss", "train/acc", "time/iter_s"} <= set(r)
        assert r["train/loss"] > 0 and r["time/iter_s"] > 0
    for r in val:
        assert {"wall_time_s", "val/acc", "val/acc_ci95"} <= set(r)
    walls = [r["wall_time_s"] for r in rows]
    assert walls == sorted(walls) and walls[0] > 0
    # Accuracy in percent in every row: a fraction never exceeds 1, a 5-way percent does.
    assert all(r["train/acc"] > 1 for r in train) and max(r["train/acc"] for r in train) <= 100
    results = json.loads((tmp_path / "results.json").read_text())
    assert test[0]["test/acc"] == pytest.approx(results["test"]["acc"])
    for kind in ("single", "ensemble"):
        assert test[0][f"test/{kind}_acc"] == pytest.approx(results["test"][kind]["acc"])

    # stderr is a pipe here, not a terminal: one plain line per log interval.
    lines = re.findall(r"iteration (\d+)/30 .*it/s  ETA \d+:\d\d:\d\d", out.stderr)
    assert lines == ["10", "20", "30"], out.stderr[-2000:]
    assert re.search(r"iteration 15: val/acc \d+\.\d\d ± \d+\.\d\d", out.stderr), out.stderr[-2000:]


def test_resume_drops_rows_past_the_checkpoint_and_partial_lines(tmp_path):
    m = MetricsFile(tmp_path)
    for it in range(5, 45, 5):
        m.write({"train/loss": 1.0 / it}, it)
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 45, "train/lo')  # a write cut off by SIGKILL
    assert [r["iteration"] for r in read_metrics(tmp_path)] == list(range(5, 45, 5))

    m = MetricsFile(tmp_path, start=20, wall_time_s=100.0)
    m.write({"train/loss": 0.5}, 25)
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [5, 10, 15, 20, 25]
    assert rows[-1]["wall_time_s"] >= 100.0
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")


@pytest.mark.slow
def test_sigkill_and_resume_leave_each_iteration_once(omniglot_data, tmp_path):
    args = [
        *TINY,
        "train.iterations=80",
        "train.log_interval=5",
        "train.val_interval=20",
        "train.checkpoint_interval=10",
        f"hydra.run.dir={tmp_path}",
    ]
    last = tmp_path / "checkpoints" / "last.pt"

    def rows_past_a_checkpoint():
        # Let it write rows past the checkpoint before the kill, when it can.
        if not (last.exists() and _iteration(last) >= 20):
            return False
        logged = [r["iteration"] for r in read_metrics(tmp_path)]
        return bool(logged) and logged[-1] > _iteration(last)

    proc = signal_cli_when(rows_past_a_checkpoint, signal.SIGKILL, *args, timeout=600)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows if "train/loss" in r] == list(range(5, 85, 5))
    assert [r["iteration"] for r in rows if "val/acc" in r] == [20, 40, 60, 80]
    walls = [r["wall_time_s"] for r in rows]
    assert walls == sorted(walls)


def _iteration(path) -> int:
    for _ in range(20):  # the file may be replaced while we read it
        try:
            return torch.load(path, weights_only=False)["iteration"]
        except (EOFError, RuntimeError, FileNotFoundError):
            time.sleep(0.01)
    raise AssertionError(f"could not read {path}")
