"""Meta-test a trained run under another protocol: what `metatrain-eval` does.

A run directory (a sweep cell is one) holds checkpoints/last.pt, which records
the config trained under, the iteration reached and the best validation
checkpoints kept beside it. A finished or an unfinished run can be tested: the
single model and the top-k ensemble are those of last.pt's moment. Nothing of
the run is written to except RUN_DIR/eval/<overrides>.json, one file per
protocol, replaced when the same protocol runs again.

Rules where the protocol differs from training:
- Ways: a head trained for N classes tests M <= N ways with its first M output
  units (rows of head.weight and head.bias), the softmax taken over those M.
  Labels are assigned to units by a fresh random class order in every task
  (metatrain/data/tasks.py), so no unit stands for any class and each is
  trained as any other; the first M are as good a choice as any. M > N is
  refused: there is no trained unit for the extra classes.
- More inner steps than trained, with per-step tensors (LSLR rates, BNWB
  weights and biases, BNRS running statistics): step i >= T (T = train_steps)
  uses row T - 1, the last trained step's tensors. Those were learned for the
  step that ends adaptation, closest to the state later steps continue from;
  every per-step tensor is indexed so (step_row in models/backbone.py,
  InnerRates in algorithms/maml.py).
"""

from pathlib import Path

import yaml

from metatrain import checkpoint, threads
from metatrain.algorithms import build_learner, learner_class
from metatrain.algorithms.inner import setup_device
from metatrain.datasets import load_placed
from metatrain.errors import MetatrainError
from metatrain.eval_config import EvalSetup, compose
from metatrain.files import save_json
from metatrain.meta_test import load_members, test_block
from metatrain.models.backbone import HEAD, Backbone
from metatrain.naming import algorithm_label, bn_eval_mode
from metatrain.task_sets import eval_tasks


def narrow_head(state: dict, ways: int, keys: tuple[str, ...] | None = None) -> dict:
    """A network state with only the first `ways` output units in the entries `keys`
    (the learner's head_keys; by default the backbone's head)."""
    if keys is None:
        keys = tuple(f"model.{Backbone.state_name(n)}" for n in HEAD)
    return {k: v[:ways] if k in keys else v for k, v in state.items()}


def open_run(run_dir: Path) -> tuple[dict, dict]:
    """(last.pt's contents, the run's config as plain data) or a clear refusal."""
    if not run_dir.is_dir():
        raise MetatrainError(
            f"{run_dir} is not a directory; give a run directory (outputs/runs/...)"
        )
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        hint = (
            "its run has not saved a checkpoint yet (see train.checkpoint_interval)"
            if (run_dir / ".hydra").is_dir()
            else "it is not a metatrain run directory (outputs/runs/... or a sweep cell)"
        )
        raise MetatrainError(f"{last} does not exist: {hint}")
    state = checkpoint.load(last)
    if not isinstance(state, dict) or "config" not in state or "learner" not in state:
        raise MetatrainError(f"{last} is not a metatrain run checkpoint")
    saved = {}
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        try:
            saved = yaml.safe_load(hydra_cfg.read_text()) or {}
        except yaml.YAMLError:
            raise MetatrainError(f"{hydra_cfg} is unreadable YAML") from None
    # The checkpoint's config is what the weights were trained under; the YAML adds
    # the keys left out of it (data root, device, logger).
    return state, _merge(saved, state["config"])


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def protocol(setup: EvalSetup) -> dict:
    """The settings that define the numbers, for the result file."""
    cfg = setup.cfg
    a, d = cfg.algorithm, cfg.dataset
    split_tasks = cfg.eval.test_tasks if setup.split == "test" else cfg.eval.val_tasks
    out = {
        "split": setup.split,
        "ways": d.ways,
        "shots": d.shots,
        "queries": cfg.eval.queries or d.queries,
        "rotated": bool(getattr(d, "eval_rotation", False)),
        "tasks": split_tasks,
        "seed": cfg.eval.seed,
        "ensemble_top_k": cfg.eval.ensemble_top_k,
        "test_from": cfg.eval.test_from.value,
        "bn_eval": bn_eval_mode(cfg.model.bn_eval),
        "trained_ways": setup.trained.dataset.ways,
    }
    out.update(learner_class(a.name).eval_protocol(a))  # what the learner says defines it
    return out


def evaluate_run(run_dir: Path, overrides: list[str], log=print) -> tuple[Path, dict]:
    """Meta-test the run in `run_dir` under `overrides`; write and return its record."""
    from metatrain.models import build_model  # torch-heavy: after the argument checks
    from metatrain.train import resolve_device

    run_dir = Path(run_dir)
    state, saved = open_run(run_dir)
    setup = compose(saved, overrides)
    cfg, ways = setup.cfg, setup.cfg.dataset.ways
    device = resolve_device(cfg.device.value)
    setup_device(device, cfg.train)
    n_threads, why = threads.apply(cfg.train.threads)  # as training chose them
    iteration, total = state["iteration"], setup.trained.train.iterations
    finished = (run_dir / "results.json").exists() or state.get("results") is not None
    status = "finished" if finished else f"unfinished (iteration {iteration} of {total})"
    log(f"evaluating {run_dir} ({status}) with {' '.join(overrides) or 'its own protocol'}")
    if device.type == "cpu":
        log(f"{n_threads} CPU thread{'s' * (n_threads > 1)} ({why})")

    model = build_model(cfg, device)  # the trained network with `ways` output units
    learner = build_learner(cfg, model, device)
    heads = learner.head_keys()
    learner.net.load_state_dict(narrow_head(state["learner"]["net"], ways, heads))
    best = [tuple(b) for b in state.get("best") or []]
    if cfg.eval.ensemble_top_k > len(best):
        log(f"{len(best)} validation checkpoints are kept: the ensemble has {len(best) or 1}")
    ckpt_dir = run_dir / "checkpoints"
    members = load_members(
        best, cfg.eval.ensemble_top_k, ckpt_dir, adapt=lambda s: narrow_head(s, ways, heads)
    )

    d = cfg.dataset
    splits = load_placed(d, device, names=(setup.split,))
    tasks = eval_tasks(cfg, splits, setup.split, device)  # the task set training used for the split
    if tasks is None:
        raise MetatrainError(
            "this run's dataset split has no validation classes: evaluate its test split "
            "(leave out eval.split=val)"
        )
    block = test_block(
        learner, tasks, cfg.eval.batch, best, members,
        cfg.eval.test_from.value, bn_eval_mode(cfg.model.bn_eval),
    )  # fmt: skip
    record = {
        **block,
        "overrides": setup.overrides,
        "protocol": protocol(setup),
        "algorithm": algorithm_label(setup.trained),
        "dataset": d.name,
        "run": {"status": "finished" if finished else "unfinished", "iteration": iteration},
        "device": str(device),
    }
    path = run_dir / "eval" / f"{setup.name}.json"
    save_json(record, path)
    return path, record
