"""Multirun sweeps: cell directories, resume of a killed sweep, W&B naming, presets."""

import fnmatch
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metatrain.logging import _start_wandb
from tests.conftest import REPO, TINY, make_cfg, run_cli, signal_cli_when
from tests.test_ablation_cells import sweep_cells

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def cell(sweep: Path, override: str) -> Path:
    """The one cell directory of the sweep whose overrides include `override`."""
    found = [p.parent for p in sweep.glob("*/.hydra") if override in p.parent.name.split(",")]
    assert len(found) == 1, (override, [p.parent.name for p in sweep.glob("*/.hydra")])
    return found[0]


@pytest.mark.slow
def test_killed_sweep_resumes_unfinished_cells_and_skips_finished(omniglot_data, tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *TINY,
        "train.iterations=40",
        "train.checkpoint_interval=5",
        "train.val_interval=20",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]

    def second_cell_past_ten():
        if len(list(sweep.glob("*/.hydra"))) < 2:
            return False
        last = cell(sweep, "seed=1") / "checkpoints" / "last.pt"
        return last.exists() and torch.load(last, weights_only=True)["iteration"] >= 10

    proc = signal_cli_when(second_cell_past_ten, signal.SIGKILL, *args)
    assert proc.wait() == -signal.SIGKILL, "the sweep ended before it could be killed"
    first, second = cell(sweep, "seed=0"), cell(sweep, "seed=1")
    first_results = (first / "results.json").read_bytes()
    assert not (second / "results.json").exists()

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{first} is finished" in again.stderr
    assert f"resuming {second} at iteration" in again.stderr
    assert (first / "results.json").read_bytes() == first_results
    results = json.loads((second / "results.json").read_text())
    assert results["iterations"] == 40 and results["overrides"][-1] == "seed=1"


def test_failed_cell_is_recorded_and_the_sweep_goes_on(omniglot_data, tmp_path):
    out = run_cli(
        "-m", *TINY, "train.iterations=2", "dataset.shots=0,1", f"hydra.sweep.dir={tmp_path}"
    )
    # Every cell ran (the failed one first), then one line lists the failures: exit 2.
    assert (cell(tmp_path, "dataset.shots=1") / "results.json").exists()
    error = (cell(tmp_path, "dataset.shots=0") / "error.txt").read_text()
    assert "at least 1 support example" in error
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("metatrain: error: 1 of 2 cells did not finish (")
    assert "dataset.shots=0" in line and "at least 1 support example" in line


def test_cell_directories_are_named_by_their_overrides():
    cfg = make_cfg(
        "algorithm.lslr=true",
        "seed=2",
        "logger=none",
        "device=cpu",
        "sweep_name=ablation",
        "train.log_interval=5",
    )
    from hydra import compose, initialize_config_dir

    from metatrain.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hcfg = compose("config", overrides=["sweep_name=abl"], return_hydra_config=True)
    assert hcfg.hydra.sweep.dir == "outputs/multirun/abl"
    assert cfg.algorithm.lslr is True


def test_wandb_group_is_the_sweep_and_name_the_cell(tmp_path, monkeypatch):
    seen = {}

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            seen.update(kwargs)
            return "run"

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    cfg = make_cfg("logger=wandb", "sweep_name=grid", "algorithm.msl=true")
    cell = tmp_path / "algorithm.msl=true,seed=1"
    cell.mkdir()
    assert _start_wandb(cfg, cell) == "run"
    assert seen["group"] == "grid" and seen["name"] == "algorithm.msl=true,seed=1"
    assert seen["mode"] == "offline" and seen["dir"] == str(cell)
    assert seen["config"]["algorithm"]["msl"] is True
    first_id = seen["id"]
    _start_wandb(cfg, cell)  # a resumed cell continues the same W&B run
    assert seen["id"] == first_id and seen["resume"] == "allow"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_compose(name):
    cfg = make_cfg(f"experiment={name}")
    assert cfg.dataset.ways in (5, 20) and cfg.dataset.shots in (1, 5)
    if name.startswith("mamlpp"):
        a = cfg.algorithm
        # the authors' runs: no DA (second order from epoch 0); CA on Omniglot only
        # (their MiniImageNet configs hold the meta rate constant); a top-5 ensemble
        assert all([a.msl, a.bnwb, a.lslr]) and not a.da and cfg.eval.ensemble_top_k == 5
        assert a.ca == ("omniglot" in name)
        assert cfg.model.activation.value == "leaky_relu"
        # transductive, as published, where bnrs cannot act (ablation_bnrs measures it)
        assert not a.bnrs and cfg.model.bn_eval.value == "transductive"
    if name.startswith(("mamlpp_omniglot", "ablation_")):
        # the authors' augmentation and split: per-task class rotation, 1150 / 50 / 423
        d = cfg.dataset
        assert d.augment_rotation and not d.rotations
        assert (d.train_classes, d.val_classes) == (1150, 50)
    if name.startswith("fomaml"):
        assert cfg.algorithm.first_order


# The presets of one algorithm and dataset differ only in ways and shots: one of each
# (20-way 1-shot Omniglot for the widest heads, 5-way 1-shot MiniImageNet for the 84x84
# networks) stands for them here, with the quickstart and one ablation sweep run end to
# end (every ablation cell's settings run in test_ablation_cells). `make smoke` runs all.
SMOKED = ["quickstart", "*_omniglot_20w1s", "*_miniimagenet_5w1s", "ablation_bnrs"]


@pytest.mark.slow
def test_representative_presets_run_two_iterations(omniglot_data, tmp_path):
    only = [a for g in SMOKED for a in ("--only", g)]
    smoke = [sys.executable, str(REPO / "scripts" / "smoke.py"), "--fast", *only]
    out = subprocess.run(
        [*smoke, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    done = {
        json.loads(p.read_text())["overrides"][0]
        for p in (tmp_path / "presets").glob("*/results.json")
    }
    chosen = [n for n in EXPERIMENTS if any(fnmatch.fnmatchcase(n, g) for g in SMOKED)]
    presets = {f"experiment={n}" for n in chosen if not n.startswith("ablation_")}
    # every algorithm on both datasets
    assert len(presets) == 1 + 2 * len({n.split("_omniglot")[0] for n in chosen if "_omni" in n})
    assert done == presets
    cells = len(sweep_cells("ablation_bnrs"))
    assert len(list((tmp_path / "ablation_bnrs").glob("*/results.json"))) == cells


def test_parallel_sweep_stops_every_cell_on_a_signal_to_the_launcher(omniglot_data, tmp_path):
    args = ["-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2", "seed=0,1"]
    args += [*TINY, "model.filters=4", "train.iterations=400", "train.val_interval=2"]
    args += ["train.checkpoint_interval=1000", f"hydra.sweep.dir={tmp_path}"]

    def both_cells_under_way():
        # Each cell has written a validation checkpoint (under load the second worker
        # can start long after the first has made several).
        return len({p.parent.parent.name for p in tmp_path.glob("*/checkpoints/best-*.pt")}) == 2

    # The signal goes to the launching process only.
    proc = signal_cli_when(both_cells_under_way, signal.SIGTERM, *args, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = err.decode().strip().splitlines()[-1]
    assert line.startswith("metatrain: interrupted (") and line.endswith("again to resume")
    for seed in ("seed=0", "seed=1"):
        state = torch.load(cell(tmp_path, seed) / "checkpoints" / "last.pt", weights_only=True)
        # saved where the cell stopped, not at a checkpoint interval
        assert f"{seed}," in line and f"interrupted at iteration {state['iteration']}" in line
