"""Signals stop a run between iterations with last.pt saved; non-finite steps are
undone. In-process runs on real Omniglot with a tiny network, plus the CLI."""

import json
import math
import os
import signal
import subprocess

import pytest
import torch

from metatrain import interrupt
from metatrain.algorithms import build_learner, maml
from metatrain.algorithms.maml import Maml
from metatrain.data.tasks import TaskBatch
from metatrain.errors import MetatrainError
from metatrain.nonfinite import NonFiniteGuard, _clone
from metatrain.train import build_model, train
from tests.conftest import make_cfg, random_tasks, run_cli, signal_cli_when

ARGS = [
    "logger=none",
    "model.filters=4",
    "algorithm.meta_batch=2",
    "dataset.queries=1",
    "train.iterations=12",
    "train.log_interval=3",
    "train.val_interval=4",
    "train.checkpoint_interval=8",
    "train.keep_best=1",
    "eval.val_tasks=2",
    "eval.test_tasks=4",
]


def last(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture
def signals():
    """This process's handlers for the test, the previous ones back afterwards."""
    interrupt.install()
    yield
    interrupt.uninstall()
    interrupt.clear()


@pytest.fixture(scope="module")
def reference(omniglot_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    return run_dir, train(make_cfg(*ARGS), run_dir)


def count_steps(monkeypatch, at=None, signum=None):
    """Count meta-steps; at iteration `at`, send `signum` to this process mid-step."""
    calls = []
    original = Maml.meta_step

    def meta_step(self, batch, iteration):
        calls.append(iteration)
        if iteration == at:
            os.kill(os.getpid(), signum)  # delivered while the step runs
        return original(self, batch, iteration)

    monkeypatch.setattr(Maml, "meta_step", meta_step)
    return calls


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_signal_then_rerun_ends_where_an_uninterrupted_run_ends(
    reference, tmp_path, monkeypatch, signals, signum
):
    calls = count_steps(monkeypatch, at=5, signum=signum)
    with pytest.raises(interrupt.Interrupted) as stopped:
        train(make_cfg(*ARGS), tmp_path)
    # The step in flight finished (iteration 6) and was saved, off the checkpoint interval.
    assert stopped.value.iteration == 6 and stopped.value.exit_code == 128 + signum
    assert str(stopped.value) == "interrupted at iteration 6; run the same command again to resume"
    assert last(tmp_path)["iteration"] == 6
    interrupt.clear()

    results = train(make_cfg(*ARGS), tmp_path)
    assert calls == list(range(12))  # every iteration once: none lost, none recomputed
    ref_dir, ref_results = reference
    ours, theirs = last(tmp_path)["learner"], last(ref_dir)["learner"]
    for k in theirs["net"]:
        assert torch.equal(ours["net"][k], theirs["net"][k]), k
    assert results["test"] == ref_results["test"]
    assert results["sec_per_iter"] > 0


def test_cli_signal_exits_with_one_line_and_the_conventional_code(omniglot_data, tmp_path):
    args = [*ARGS, "train.iterations=400", "train.val_interval=2", f"hydra.run.dir={tmp_path}"]
    proc = signal_cli_when(
        lambda: any((tmp_path / "checkpoints").glob("best-*.pt")),
        signal.SIGTERM,
        *args,
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=900)
    err = err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    reached = last(tmp_path)["iteration"]
    assert 2 <= reached < 400
    assert err.strip().splitlines()[-1] == (
        f"metatrain: interrupted at iteration {reached}; run the same command again to resume"
    )
    assert "Traceback" not in err


def test_failure_before_the_first_iteration_leaves_no_directory(tmp_path):
    run_dir = tmp_path / "outputs" / "runs" / "x"
    out = run_cli(*ARGS, "dataset.shots=0", f"hydra.run.dir={run_dir}", timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


# -- non-finite meta-losses -----------------------------------------------------


def nan_loss_at(monkeypatch, iterations):
    """Make the meta-loss NaN at the given iterations: its meta-gradient is NaN too."""
    now = {}
    original_step, original_ce = Maml.meta_step, maml.F.cross_entropy

    def meta_step(self, batch, iteration):
        now["it"] = iteration
        return original_step(self, batch, iteration)

    def cross_entropy(*a, **kw):
        loss = original_ce(*a, **kw)
        return loss * math.nan if now.get("it") in iterations else loss

    monkeypatch.setattr(Maml, "meta_step", meta_step)
    monkeypatch.setattr(maml.F, "cross_entropy", cross_entropy)


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state["learner"]["net"].values())


def test_nonfinite_stop_keeps_the_last_good_checkpoint(omniglot_data, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {9})
    with pytest.raises(
        MetatrainError, match="non-finite meta-loss or meta-gradient at iteration 10"
    ):
        train(make_cfg(*ARGS), tmp_path)
    state = last(tmp_path)
    assert state["iteration"] == 8 and all_finite(state)
    for best in (tmp_path / "checkpoints").glob("best-*.pt"):
        assert all(torch.isfinite(v).all() for v in torch.load(best, weights_only=True).values())


def test_nonfinite_skip_undoes_the_step_and_counts_it(omniglot_data, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {2, 3})
    results = train(make_cfg(*ARGS, "train.nonfinite=skip", "train.nonfinite_patience=3"), tmp_path)
    assert results["nonfinite_skips"] == 2 and math.isfinite(results["test"]["acc"])
    state = last(tmp_path)
    assert state["iteration"] == 12 and all_finite(state)
    assert all(
        torch.isfinite(t).all()
        for s in state["learner"]["optimizer"]["state"].values()
        for t in s.values()
    )
    assert json.loads((tmp_path / "results.json").read_text())["nonfinite_skips"] == 2


def test_nonfinite_skip_stops_after_patience(omniglot_data, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {1, 2, 3})
    cfg = make_cfg(*ARGS, "train.nonfinite=skip", "train.nonfinite_patience=3")
    with pytest.raises(MetatrainError, match="3 steps in a row skipped"):
        train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing good to keep yet


def test_an_undone_step_restores_parameters_and_optimiser_exactly(monkeypatch):
    cfg = make_cfg(*ARGS)
    cfg.dataset.image_size = 16
    learner = build_learner(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    guard = NonFiniteGuard(learner, "skip", 5)
    batch = random_tasks(tasks=2, ways=5, shots=1, queries=1, size=16)
    batch = TaskBatch(batch.xs.float(), batch.ys, batch.xq.float(), batch.yq)
    assert guard.step(batch, 0) is not None
    before = _clone(learner.state_dict())
    nan_loss_at(monkeypatch, {1})
    assert guard.step(batch, 1) is None
    after = learner.state_dict()
    for k, v in before["net"].items():
        assert torch.equal(v, after["net"][k]), k
    for i, s in before["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, after["optimizer"]["state"][i][k]), (i, k)


def test_a_handler_found_before_ours_acts_after_the_save(capsys):
    """Under Slurm, submitit's SIGUSR2 handler requeues the job: it must still run,
    after last.pt holds the iteration reached, and before the exit."""
    seen = []

    def requeue(signum, frame):
        seen.append(signum)
        raise SystemExit(-1)  # what submitit does once the job is requeued

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        interrupt.install()
        os.kill(os.getpid(), signal.SIGUSR2)  # outside a run: raised at once
    except interrupt.Interrupted as e:
        assert e.signum == signal.SIGUSR2
        with pytest.raises(SystemExit) as exited:
            interrupt.exit_after(e)
        assert exited.value.code == -1 and seen == [signal.SIGUSR2]
    else:
        pytest.fail("the signal did not interrupt")
    finally:
        interrupt.uninstall()
        interrupt.clear()
        signal.signal(signal.SIGUSR2, previous)
    assert "interrupted" in capsys.readouterr().err


def test_the_first_row_logged_after_a_resume_is_the_whole_intervals_mean(
    reference, tmp_path, monkeypatch, signals
):
    # Stopped after iteration 4, inside the log interval 3-6: the row at 6 must still
    # average iterations 4, 5 and 6, as in the run that was never stopped.
    count_steps(monkeypatch, at=3, signum=signal.SIGINT)
    with pytest.raises(interrupt.Interrupted) as stopped:
        train(make_cfg(*ARGS), tmp_path)
    assert stopped.value.iteration == 4
    interrupt.clear()
    train(make_cfg(*ARGS), tmp_path)

    def rows(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {r["iteration"]: r for r in map(json.loads, lines) if "train/loss" in r}

    ours, theirs = rows(tmp_path), rows(reference[0])
    assert sorted(ours) == sorted(theirs) == [3, 6, 9, 12]
    for it in ours:
        assert ours[it]["train/loss"] == theirs[it]["train/loss"], it
        assert ours[it]["train/acc"] == theirs[it]["train/acc"], it
    assert ours[6]["time/iter_s"] > 0
