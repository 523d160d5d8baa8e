"""scripts/gpu_check.sh on the CPU (DEVICE=cpu, a small budget, no wheels): every phase
runs and writes the files the device tool brings back, so the script a lent GPU runs
has run here too. About 30 s of CPU."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.gpucheck]


def run_check(out, data, **env):
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "OUT": str(out),
        "PY": sys.executable,
        "DATA": str(data),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    env.pop("METATRAIN_TEST_DEVICE", None)
    return subprocess.run(
        ["bash", str(REPO / "scripts/gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def test_dry_run_writes_every_file_within_the_device_tools_limits(omniglot_data, tmp_path):
    out = tmp_path / "out"
    proc = run_check(
        out,
        omniglot_data,
        BUDGET="150",
        TRAIN_ITERS="4",
        TRAIN_ARGS="model.filters=8 algorithm.meta_batch=4 eval.val_tasks=10 "
        "eval.test_tasks=20 eval.batch=10",
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + log[-3000:]
    files = sorted(p.name for p in out.iterdir())
    expected = ["bench.json", "gpu_check.log", "metrics.jsonl", "results.json"]
    assert files == sorted([*expected, "summary.json", "tests.xml"])
    # the device tool returns at most 8 plain files of 16 MiB, named in [A-Za-z0-9._-]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert all((out / f).is_file() and (out / f).stat().st_size < 16 * 2**20 for f in files)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["elapsed_s"] <= 150
    assert [p["phase"] for p in summary["phases"]] == ["env", "data", "tests", "bench", "train"]
    assert "python" in log and "omniglot (1623, 20, 1, 28, 28)" in log

    # the CUDA tests were collected and, without a GPU, skipped
    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 20
    assert int(suite.get("skipped")) == int(suite.get("tests"))
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0

    bench = json.loads((out / "bench.json").read_text())
    (row,) = bench["results"]
    assert row["setting"] == "maml-omniglot-5w1s" and row["device"] == "cpu"
    assert row["s_per_iter"] > 0 and row["speed"] == "plain" and bench["complete"]

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and results["iterations"] == 4
    assert results["test"]["tasks"] == 20 and 0 <= results["test"]["acc"] <= 100
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows)


def test_a_failed_phase_does_not_stop_the_later_ones(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, tmp_path / "nothing", BUDGET="150", PHASES="data,tests")
    assert proc.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    status = {p["phase"]: p["rc"] for p in summary["phases"]}
    assert status["data"] != 0 and status["tests"] == 0 and not summary["ok"]
    assert "no Omniglot in" in (out / "gpu_check.log").read_text()


def test_a_phase_past_its_deadline_is_stopped_and_recorded(tmp_path):
    # A python that hangs in the env phase (`python -` with no arguments) and only
    # there: the phase must be stopped at its deadline (BUDGET 30: 10 s), the script
    # go on and end well inside its budget.
    slow = tmp_path / "slowpy"
    slow.write_text(
        f'#!/bin/bash\n[ "$#" -eq 1 ] && [ "$1" = - ] && sleep 300\nexec {sys.executable} "$@"\n'
    )
    slow.chmod(0o755)
    out = tmp_path / "out"
    proc = run_check(out, tmp_path / "nothing", BUDGET="30", PHASES="env,data", PY=str(slow))
    assert proc.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    phases = {p["phase"]: p for p in summary["phases"]}
    assert phases["env"]["status"] == "timed out" and phases["env"]["seconds"] <= 12
    assert "data" in phases and summary["elapsed_s"] <= 30
