"""metatrain-eval: re-testing trained runs on real Omniglot under other protocols.

Each algorithm trains one tiny run per module (shared by the tests below); the
checks compare against results.json, against logits averaged by hand, and
against the bytes of the run's files.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metatrain import checkpoint
from metatrain.errors import MetatrainError
from metatrain.eval_run import evaluate_run, narrow_head
from metatrain.train import train
from tests.conftest import TINY, make_cfg

BASE = [*TINY, "train.iterations=10", "train.val_interval=5", "eval.val_tasks=12"]
BASE += ["eval.test_tasks=16"]
BASE += ["eval.ensemble_top_k=2", "train.keep_best=3", "eval.batch=8", "eval.test_from=best"]
ALGORITHMS = {
    "maml": ["algorithm=maml"],
    "fomaml": ["algorithm=fomaml"],
    # MAML++ with per-step tensors of 2 steps (LSLR rates, BNWB rows, BNRS rows), its
    # leaky ReLU, and TF's batch-norm eps and 'same' pooling (28-14-7-4-2).
    "mamlpp": [
        "algorithm=mamlpp",
        "algorithm.train_steps=2",
        "algorithm.eval_steps=2",
        "model.bn_eps=1e-3",
        "model.pool_padding=same",
    ],
    "reptile": ["algorithm=reptile", "algorithm.eval_iters=4", "algorithm.inner_iters=2"],
}


@pytest.fixture(scope="module")
def runs(omniglot_data, tmp_path_factory):
    """Trained tiny runs by algorithm, made on first use."""
    made = {}

    def get(name):
        if name not in made:
            run_dir = tmp_path_factory.mktemp(name)
            results = train(make_cfg(*BASE, *ALGORITHMS[name]), run_dir)
            made[name] = (run_dir, results)
        return made[name]

    return get


def digests(run_dir):
    """Every file of the run but its eval/ folder, by content."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "eval" not in p.relative_to(run_dir).parts
    }


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_own_protocol_reproduces_results_json_exactly(runs, name):
    run_dir, results = runs(name)
    before = digests(run_dir)
    path, record = evaluate_run(run_dir, [], log=lambda *_: None)
    assert path == run_dir / "eval" / "default.json"
    test = results["test"]
    assert test["ensemble"]["k"] == 2 and test["single"]["checkpoint"] == test["members"][0]
    for kind in ("single", "ensemble"):
        assert record[kind] == test[kind], kind
    assert (record["acc"], record["ci95"]) == (test["acc"], test["ci95"])
    assert record["algorithm"] == results["algorithm"] == name
    assert json.loads(path.read_text()) == json.loads(json.dumps(record))
    assert digests(run_dir) == before


@pytest.mark.parametrize(
    "overrides, name",
    [
        (["eval.test_tasks=24"], "eval.test_tasks=24"),
        (["algorithm.eval_steps=4"], "algorithm.eval_steps=4"),  # trained with 2 steps
        (["dataset.ways=3", "model.bn_eval=running"], "dataset.ways=3,model.bn_eval=running"),
        (["dataset.shots=2", "device=cpu"], "dataset.shots=2"),
        (["eval.split=val", "eval.test_from=last"], "eval.split=val,eval.test_from=last"),
    ],
)
def test_other_protocols_write_their_own_file_and_touch_nothing_else(runs, overrides, name):
    run_dir, _ = runs("mamlpp")
    before = digests(run_dir)
    path, record = evaluate_run(run_dir, overrides, log=lambda *_: None)
    assert path == run_dir / "eval" / f"{name}.json"
    assert record["overrides"] == overrides
    p = record["protocol"]
    assert record["single"]["tasks"] == record["ensemble"]["tasks"] == p["tasks"]
    # >= 0: with running statistics a briefly trained network may predict one class
    # everywhere, scoring exactly 1/ways on every task (a zero-width interval).
    assert 0 <= record["single"]["acc"] <= 100 and record["single"]["ci95"] >= 0
    if "dataset.ways=3" in overrides:
        assert p["ways"] == 3 and p["trained_ways"] == 5 and record["bn_eval"] == "running"
    if "eval.test_from=last" in overrides:
        assert record["single"]["checkpoint"] == "last" and record["ensemble"]["k"] == 2
    assert digests(run_dir) == before
    # The same evaluation again replaces its own file and nothing else.
    others = {q: q.read_bytes() for q in (run_dir / "eval").iterdir() if q != path}
    path2, record2 = evaluate_run(run_dir, overrides, log=lambda *_: None)
    assert path2 == path and record2 == record
    assert {q: q.read_bytes() for q in (run_dir / "eval").iterdir() if q != path} == others
    assert digests(run_dir) == before


def test_train_threads_sets_the_evaluations_cpu_threads(runs):
    run_dir, _ = runs("maml")
    before, said = torch.get_num_threads(), []
    try:
        evaluate_run(run_dir, ["train.threads=2", "eval.test_tasks=8"], log=said.append)
        assert torch.get_num_threads() == 2
        assert "2 CPU threads (train.threads=2)" in said
    finally:
        torch.set_num_threads(before)


def test_reptile_with_carried_adam_and_support_plus_query(omniglot_data, tmp_path):
    overrides = [*ALGORITHMS["reptile"], "algorithm.inner_state=carry"]
    overrides += ["model.bn_eval=support_plus_query", "eval.test_from=last"]
    results = train(make_cfg(*BASE, *overrides), tmp_path)
    _, record = evaluate_run(tmp_path, [], log=lambda *_: None)
    assert record["single"] == results["test"]["single"]
    assert record["bn_eval"] == "support_plus_query"
    # fewer ways: the carried Adam moments of the head narrow with it
    _, fewer = evaluate_run(tmp_path, ["dataset.ways=3"], log=lambda *_: None)
    assert fewer["protocol"]["ways"] == 3 and 0 <= fewer["single"]["acc"] <= 100
    _, other = evaluate_run(tmp_path, ["model.bn_eval=transductive"], log=lambda *_: None)
    assert other["bn_eval"] == "transductive"


def test_validation_split_reproduces_the_best_validation_score(runs):
    run_dir, results = runs("maml")
    _, record = evaluate_run(run_dir, ["eval.split=val"], log=lambda *_: None)
    assert record["single"]["acc"] == results["best_val"]["acc"]
    assert record["single"]["checkpoint"] == results["best_val"]["iteration"]


def test_ensemble_is_the_mean_of_the_members_query_logits(runs):
    from metatrain.algorithms import build_learner
    from metatrain.data.tasks import EpisodeSampler, FixedTasks
    from metatrain.datasets import load_splits
    from metatrain.models import build_model

    run_dir, _ = runs("maml")
    _, record = evaluate_run(
        run_dir, ["dataset.ways=4", "eval.ensemble_top_k=2"], log=lambda *_: None
    )
    cfg = make_cfg(*BASE, *ALGORITHMS["maml"], "dataset.ways=4")
    learner = build_learner(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"))
    d = cfg.dataset
    images = load_splits(d).images["test"]
    assert d.eval_rotation  # MAML's Omniglot protocol: test tasks turned per class
    sampler = EpisodeSampler(images, 4, d.shots, d.queries, d.mean, d.std)
    tasks = FixedTasks(sampler, 16, 1235, rotate=True)
    batches = list(tasks.batches(8))  # as eval.batch=8
    labels = torch.cat([b.yq for b in batches])
    logits = []
    for iteration in record["ensemble"]["members"]:
        state = checkpoint.load(run_dir / "checkpoints" / f"best-{iteration:07d}.pt")
        learner.net.load_state_dict(narrow_head(state, 4))
        logits.append(torch.cat([learner.predict(b) for b in batches]))  # (16, 4*queries, 4)
    assert len(logits) == 2
    mean = torch.stack(logits).mean(0)
    per_task = (mean.argmax(-1) == labels).double().mean(-1) * 100
    assert record["ensemble"]["acc"] == pytest.approx(per_task.mean().item(), abs=1e-9)
    single = (logits[0].argmax(-1) == labels).double().mean(-1) * 100
    assert record["single"]["acc"] == pytest.approx(single.mean().item(), abs=1e-9)


def test_unfinished_run_is_evaluated_from_its_last_checkpoint(runs, tmp_path):
    run_dir, _ = runs("fomaml")
    copy = tmp_path / "unfinished"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval", "results.json"))
    state = checkpoint.load(copy / "checkpoints" / "last.pt")
    state["results"] = None  # as a run stopped right after its last checkpoint
    checkpoint.save(state, copy / "checkpoints" / "last.pt")
    _, record = evaluate_run(copy, [], log=lambda *_: None)
    assert record["run"] == {"status": "unfinished", "iteration": 10}
    assert not (copy / "results.json").exists()


def test_reptile_fine_tuning_settings_are_evaluation_keys(runs):
    run_dir, _ = runs("reptile")
    _, record = evaluate_run(
        run_dir, ["algorithm.eval_iters=6", "algorithm.eval_batch=3"], log=lambda *_: None
    )
    assert record["protocol"]["eval_iters"] == 6 and record["protocol"]["eval_batch"] == 3


def one_line_error(out, *fragments):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("metatrain-eval: error:")]
    assert len(lines) == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]


def eval_cli(*args):
    exe = Path(sys.executable).parent / "metatrain-eval"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "metatrain.eval_cli"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [*cmd, *args], check=False, capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model.filters=16", ["model.filters changes what was trained"]),
        ("algorithm.msl=false", ["algorithm.msl changes what was trained"]),
        ("algorithm.inner_lr=0.2", ["algorithm.inner_lr was learned", "lslr"]),
        ("dataset.ways=6", ["dataset.ways=6 exceeds the 5 output units"]),
        ("algorithm.eval_stepz=3", ["algorithm.eval_stepz is not a key", "algorithm.eval_steps?"]),
        ("eval.test_task=50", ["eval.test_task is not a key", "did you mean eval.test_tasks?"]),
        ("eval.split=train", ["eval.split=train: choose test or val"]),
        ("eval.test_tasks=many", ["eval.test_tasks=many"]),
    ],
)
def test_refusals_name_the_key(runs, override, fragments):
    run_dir, _ = runs("mamlpp")
    before = digests(run_dir)
    with pytest.raises(MetatrainError) as e:
        evaluate_run(run_dir, [override], log=lambda *_: None)
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments)
    assert digests(run_dir) == before


def test_training_changing_key_exits_2_with_one_line(runs):
    run_dir, _ = runs("mamlpp")
    before = digests(run_dir)
    one_line_error(eval_cli(str(run_dir), "model.filters=16"), "model.filters changes")
    assert digests(run_dir) == before and not (run_dir / "eval" / "model.filters=16.json").exists()


def test_missing_and_unstarted_run_directories(tmp_path):
    one_line_error(eval_cli(str(tmp_path / "nowhere")), "is not a directory")
    (tmp_path / "started" / ".hydra").mkdir(parents=True)
    with pytest.raises(MetatrainError, match="has not saved a checkpoint yet"):
        evaluate_run(tmp_path / "started", [])
    with pytest.raises(MetatrainError, match="not a metatrain run directory"):
        evaluate_run(tmp_path, [])


def test_console_script_prints_both_numbers(runs):
    run_dir, _ = runs("maml")
    out = eval_cli(str(run_dir), "eval.test_tasks=8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "single model" in out.stderr and "ensemble of top 2" in out.stderr
    assert (run_dir / "eval" / "eval.test_tasks=8.json").exists()
