"""The config of a re-evaluation: the run's own config plus evaluation overrides.

The run's config is the one its checkpoint was trained under (the fingerprint
stored in last.pt, which also names the keys Hydra's .hydra/config.yaml holds
beside it), rebuilt on the typed schemas of metatrain/config.py so values are
checked as at training. Overrides use Hydra's syntax and parser; only the keys
in EVAL_KEYS (metatrain/keys.py) and the algorithm keys the run's learner declares
(MetaLearner.eval_keys) may change, since any other would describe a network other
than the one trained.
"""

import difflib
from dataclasses import dataclass

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metatrain.config import Config
from metatrain.errors import MetatrainError, at_least_one
from metatrain.keys import is_eval_key, is_non_math

SPLITS = ("test", "val")

_ABSENT = object()


@dataclass
class EvalSetup:
    trained: object  # the run's config (OmegaConf), as trained
    cfg: object  # the same with the overrides applied
    split: str  # test | val
    overrides: list[str]  # as given, in order
    name: str  # the result file's stem, from the overrides that change numbers


def typed(data: dict):
    """A composed config as plain data -> the typed OmegaConf config of its schemas."""
    from metatrain.registry import ALL  # each group's schema by name

    cfg = OmegaConf.structured(Config)
    try:
        for registry in ALL:
            name = (data.get(registry.group) or {}).get("name")
            if name not in registry or registry.get(name).schema is None:
                raise MetatrainError(
                    f"the run's {registry.group}.name={name!r} is not one metatrain knows"
                )
            cfg[registry.group] = OmegaConf.structured(registry.get(name).schema)
        return OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as e:
        raise MetatrainError(f"the run's config does not fit this metatrain: {_first_line(e)}")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _leaf_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k in node:
        child = node._get_node(k, validate_access=False)
        if OmegaConf.is_dict(child):
            out += _leaf_keys(child, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


def learner_eval_keys(cfg) -> tuple[str, ...]:
    """The algorithm keys (dotted) that the run's learner lets metatrain-eval set."""
    from metatrain.algorithms import learner_class  # torch-heavy: after the parsing

    return tuple(f"algorithm.{k}" for k in learner_class(cfg.algorithm.name).eval_keys)


def _check_key(cfg, key: str) -> None:
    if key == "eval.split":
        return
    extra = learner_eval_keys(cfg)
    if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        # Keys metatrain-eval accepts first: eval.test_task means eval.test_tasks.
        known = ["eval.split"] + [k for k in _leaf_keys(cfg) if is_eval_key(k, extra)]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        close = close or difflib.get_close_matches(key, _leaf_keys(cfg), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see metatrain-eval --help"
        raise MetatrainError(f"{key} is not a key of this run's config{hint}")
    if not is_eval_key(key, extra):
        raise MetatrainError(
            f"{key} changes what was trained, so metatrain-eval cannot set it; "
            f"train another run with it (metatrain ... {key}=...)"
        )


def compose(saved: dict, overrides: list[str]) -> EvalSetup:
    """The run's config (`saved`, plain data) with evaluation overrides applied."""
    trained = typed(saved)
    cfg = trained.copy()
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's parse errors have several types
        raise MetatrainError(f"cannot parse the overrides: {_first_line(e)}") from None
    split = "test"
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override() or o.is_add() or o.is_delete() or o.package:
            raise MetatrainError(f"{o.input_line}: give plain key=value overrides, one value each")
        _check_key(cfg, key)
        value = o.value()
        if key == "eval.split":
            if value not in SPLITS:
                raise MetatrainError(f"eval.split={value}: choose test or val")
            split = value
            continue
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise MetatrainError(f"{o.input_line}: {_first_line(e)}") from None
    _check_protocol(trained, cfg, [o.key_or_group for o in parsed])
    changing = sorted(
        (o.input_line for o in parsed if not is_non_math(o.key_or_group)),
        key=lambda s: s.split("=", 1)[0],
    )
    name = ",".join(changing).replace("/", "_") or "default"
    return EvalSetup(trained, cfg, split, list(overrides), name)


def _check_protocol(trained, cfg, keys: list[str]) -> None:
    """Refuse protocols the trained network cannot run."""
    from metatrain.algorithms import learner_class

    learner = learner_class(trained.algorithm.name)
    learner.check_eval(trained.algorithm, keys)
    n, m = trained.dataset.ways, cfg.dataset.ways
    if m > n:
        raise MetatrainError(
            f"dataset.ways={m} exceeds the {n} output units the head was trained with; "
            f"test with at most {n} ways (fewer ways use the first of the {n} units)"
        )
    keys = ("eval.test_tasks", "eval.val_tasks", "eval.batch", "dataset.queries")
    at_least_one({key: OmegaConf.select(cfg, key) for key in keys})
    if cfg.eval.queries < 0:
        raise MetatrainError(f"eval.queries={cfg.eval.queries} must not be negative")
    # the learner's counts that evaluation may change (eval_steps, eval_iters, eval_batch)
    counts = [k for k in learner.eval_keys if k in learner.positive_keys]
    at_least_one({f"algorithm.{k}": cfg.algorithm[k] for k in counts})
