"""The `metatrain` command end to end on real Omniglot: runs, resume, errors."""

import json
import signal

import pytest
import torch

from tests.conftest import TINY, run_cli, signal_cli_when


def final_state(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return state["iteration"], state["learner"]["net"]


def test_help_lists_the_config_groups():
    out = run_cli("--help", timeout=600)
    assert out.returncode == 0
    for group in ("algorithm: ", "dataset: ", "model: ", "logger: ", "experiment: "):
        assert group in out.stdout


def test_short_run_writes_results_and_checkpoints(omniglot_data, tmp_path):
    out = run_cli(*TINY, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "finished" and results["iterations"] == 30
    assert results["test"]["tasks"] == 40 and 0 <= results["test"]["acc"] <= 100
    assert results["test"]["ci95"] > 0
    assert results["config"]["algorithm"]["name"] == "maml"
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.pt" in ckpts and any(n.startswith("best-") for n in ckpts)
    # Running again finds it finished and leaves it alone.
    again = run_cli(*TINY, f"hydra.run.dir={tmp_path}")
    assert again.returncode == 0 and "finished" in again.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == results


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    # Reptile with fewer inner and evaluation iterations: resume is what is tested.
    [
        ["algorithm=maml"],
        ["algorithm=reptile", "algorithm.eval_iters=3", "algorithm.inner_iters=3"],
    ],
    ids=["maml", "reptile"],
)
def test_killed_run_resumes_to_the_same_parameters(omniglot_data, tmp_path, algorithm):
    args = [
        *TINY,
        *algorithm,
        "train.iterations=80",
        "train.val_interval=40",
        "train.checkpoint_interval=5",
    ]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli(*args, f"hydra.run.dir={whole}").returncode == 0

    last = broken / "checkpoints" / "last.pt"
    proc = signal_cli_when(
        lambda: last.exists() and final_state(broken)[0] >= 10,
        signal.SIGKILL,
        *args,
        f"hydra.run.dir={broken}",
    )
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = final_state(broken)[0]
    assert 10 <= killed_at < 80

    resumed = run_cli(*args, f"hydra.run.dir={broken}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {broken} at iteration {killed_at}" in resumed.stderr.replace("\n", "")
    it_a, net_a = final_state(whole)
    it_b, net_b = final_state(broken)
    assert it_a == it_b == 80
    for k in net_a:
        assert torch.equal(net_a[k], net_b[k]), k
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((broken / "results.json").read_text())
    assert a["test"] == b["test"]
    if algorithm == ["algorithm=maml"]:
        # 80 tiny meta-iterations already beat chance (20% for 5 ways): the 95%
        # interval stays above it.
        assert a["test"]["acc"] - a["test"]["ci95"] > 20, a["test"]


def test_wandb_offline_writes_its_files_in_the_run_dir(omniglot_data, tmp_path):
    args = [a for a in TINY if not a.startswith("logger=")]
    out = run_cli(*args, "logger=wandb", "train.iterations=10", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("metatrain: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    for f in fragments:
        assert f in lines[0]


def test_missing_data(tmp_path):
    out = run_cli(
        *TINY,
        f"dataset.root={tmp_path}/none",
        "dataset.download=false",
        f"hydra.run.dir={tmp_path}/run",
    )
    one_line_error(out, "Omniglot not found", f"{tmp_path}/none")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("dataset.ways=101", "exceeds the 100 classes of the val split"),
        ("dataset.shots=0", "at least 1 support example"),
        ("algorithm.meta_batch=0", "algorithm.meta_batch=0 must be at least 1"),
    ],
)
def test_impossible_settings(omniglot_data, tmp_path, override, fragment):
    out = run_cli(*TINY, override, f"hydra.run.dir={tmp_path}/run")
    one_line_error(out, fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = run_cli(*TINY, f"hydra.run.dir={locked}/run")
    one_line_error(out, "cannot write to the output directory", str(locked))


def test_corrupt_checkpoint_is_refused_and_kept(omniglot_data, tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x00garbage")
    out = run_cli(*TINY, f"hydra.run.dir={tmp_path}")
    one_line_error(out, "unreadable", str(last))
    assert last.read_bytes() == b"\x00garbage"


def test_checkpoint_from_another_config_is_refused(omniglot_data, tmp_path):
    assert run_cli(*TINY, "train.iterations=10", f"hydra.run.dir={tmp_path}").returncode == 0
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    out = run_cli(
        *TINY, "train.iterations=10", "algorithm.inner_lr=0.1", f"hydra.run.dir={tmp_path}"
    )
    one_line_error(out, "different config", "algorithm.inner_lr: 0.4 -> 0.1")
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.iteratons=5", "unknown key train.iteratons; did you mean train.iterations?"),
        ("algorithm=nosuch", "algorithm=nosuch is not an option (algorithm: anil, fomaml, maml,"),
        ("algorithm=mamlp", "did you mean mamlpp?"),
        ("+train.iterations=5", "train.iterations exists: set it without the leading +"),
        ("train.iterations=abc", "train.iterations: Value 'abc'"),
    ],
)
def test_mistyped_overrides_get_one_line(tmp_path, override, fragment):
    out = run_cli(*TINY, override, f"hydra.run.dir={tmp_path}/run", timeout=600)
    one_line_error(out, fragment)
    assert "+train.iteratons" not in out.stderr and "_schema" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_sweep_value_that_is_no_option_is_refused_before_any_cell(tmp_path):
    out = run_cli("-m", *TINY, "algorithm=maml,nosuch", f"hydra.sweep.dir={tmp_path}", timeout=600)
    one_line_error(out, "algorithm=nosuch is not an option")
    assert not any(tmp_path.iterdir())


def test_help_lists_real_options_of_every_group():
    out = run_cli("--help", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hydra/launcher: basic, joblib, local, slurm" in out.stdout
    assert (
        "algorithm: anil, fomaml, maml, mamlpp, metasgd, protomaml, protonet, reptile\n"
        in out.stdout
    )
    assert "_schema" not in out.stdout


def test_miniimagenet_runs_two_iterations(tmp_path):
    from tests.miniimagenet_fixtures import write_pickle_layout

    root = write_pickle_layout(tmp_path / "mini", per_class=4, size=84)
    out = run_cli(
        *TINY,
        "dataset=miniimagenet",
        f"dataset.root={root}",
        "dataset.queries=2",
        "model.filters=8",
        "train.iterations=2",
        "eval.val_tasks=4",
        "eval.test_tasks=4",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "miniimagenet" and results["iterations"] == 2
    assert any(root.glob("miniimagenet_pickle_84.pt"))
