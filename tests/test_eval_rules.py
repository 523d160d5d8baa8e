"""The rules of re-evaluation that need no trained run: more inner steps than
trained with per-step tensors, fewer ways, the key lists, and names."""

import pytest
import torch

from metatrain.algorithms.maml import Maml
from metatrain.errors import MetatrainError
from metatrain.eval_config import compose
from metatrain.eval_run import narrow_head
from metatrain.keys import EVAL_KEYS, EVAL_PROTOCOL_KEYS, NON_MATH_KEYS
from metatrain.models.conv4 import Conv4
from metatrain.naming import algorithm_label
from tests.conftest import make_cfg, maml_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")


def mamlpp_learner(rows: int, eval_steps: int, bn_eval: str, seed: int = 0):
    """A float64 MAML++ learner (LSLR, BNWB, BNRS) whose per-step tensors have `rows` rows."""
    torch.manual_seed(seed)
    model = Conv4(1, 3, 16, filters=4, bn_weight_steps=rows, bn_stat_steps=rows).double()
    cfg = maml_cfg(train_steps=rows, eval_steps=eval_steps, lslr=True, bnwb=True, bnrs=True)
    return Maml(cfg, model, train_cfg(backend="loop"), bn_eval, CPU)


def per_step(name: str) -> bool:
    """LSLR rates (steps,), BNWB weights and biases and BNRS statistics (steps, C)."""
    return name.startswith(("rates.", "model.bn"))


def distinct_rows(learner, seed: int = 1) -> None:
    """Give every step its own rates, BN weights and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in learner.net.state_dict().items():
            if per_step(name):
                t.copy_(0.05 + torch.rand(t.shape, generator=g, dtype=t.dtype))


def last_row_repeated(t: torch.Tensor, rows: int, steps: int) -> torch.Tensor:
    idx = torch.tensor([min(i, rows - 1) for i in range(steps)])
    return t[idx]


@pytest.mark.parametrize("bn_eval", ["batch", "running"])
def test_steps_beyond_training_reuse_the_last_steps_tensors(bn_eval):
    """Trained with 2 steps, tested with 5: the same logits as a network whose
    per-step tensors were written out for 5 steps with row 1 repeated."""
    tasks = random_tasks(tasks=2, ways=3, shots=2, queries=3, size=16)
    short = mamlpp_learner(rows=2, eval_steps=5, bn_eval=bn_eval)
    distinct_rows(short)
    long = mamlpp_learner(rows=5, eval_steps=5, bn_eval=bn_eval)
    state = {}
    for name, t in short.net.state_dict().items():
        assert not per_step(name) or t.shape[0] == 2, name
        state[name] = last_row_repeated(t, 2, 5) if per_step(name) else t
    long.net.load_state_dict(state)
    got, want = short.predict(tasks), long.predict(tasks)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # The extra steps do adapt further: 2 steps give other logits.
    short.cfg.eval_steps = 2
    assert not torch.allclose(short.predict(tasks), got, atol=1e-6)


def test_fewer_ways_use_the_first_output_units():
    model = Conv4(1, 5, 16, filters=4)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    narrow = narrow_head(state, 3)
    assert torch.equal(narrow["model.head_weight"], state["model.head_weight"][:3])
    assert torch.equal(narrow["model.head_bias"], state["model.head_bias"][:3])
    assert all(torch.equal(narrow[k], v) for k, v in state.items() if "head" not in k)
    small = Conv4(1, 3, 16, filters=4)
    small.load_state_dict({k[len("model.") :]: v for k, v in narrow.items()})


def saved(*overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(make_cfg(*overrides), resolve=True, enum_to_str=True)


def test_eval_keys_are_protocol_keys_plus_the_non_math_keys():
    assert set(EVAL_KEYS) == set(EVAL_PROTOCOL_KEYS) | set(NON_MATH_KEYS)
    # Every protocol key is a key of some run's config (eval.split is eval-only).
    maml, reptile = make_cfg("algorithm=maml"), make_cfg("algorithm=reptile")
    from omegaconf import OmegaConf

    for key in EVAL_PROTOCOL_KEYS:
        if key != "eval.split":
            assert any(OmegaConf.select(c, key) is not None for c in (maml, reptile)), key


def test_compose_names_the_file_after_the_overrides_that_change_numbers():
    setup = compose(saved(), ["model.bn_eval=running", "device=cpu", "dataset.ways=3"])
    assert setup.name == "dataset.ways=3,model.bn_eval=running"
    assert setup.cfg.dataset.ways == 3 and setup.trained.dataset.ways == 5
    assert setup.cfg.model.bn_eval.value == "running"
    assert compose(saved(), []).name == "default"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.iterations=5"], "train.iterations changes what was trained"),
        (["algorithm=reptile"], "algorithm changes what was trained"),
        (["dataset.queries=0"], "dataset.queries=0 must be at least 1"),
        (["dataset.ways=2,3"], "one value each"),
        (["algorithm.eval_steps=0"], "algorithm.eval_steps=0 must be at least 1"),
    ],
)
def test_compose_refusals(overrides, fragment):
    with pytest.raises(MetatrainError, match=fragment):
        compose(saved(), overrides)


@pytest.mark.parametrize(
    "overrides, label",
    [
        (["algorithm=maml"], "maml"),
        (["algorithm=fomaml"], "fomaml"),
        (["algorithm=mamlpp"], "mamlpp"),
        (["algorithm=reptile"], "reptile"),
        (["algorithm=maml", "ablation=add_lslr"], "maml+lslr"),
        (["algorithm=fomaml", "algorithm.lslr=true", "algorithm.msl=true"], "fomaml+msl+lslr"),
        (["algorithm=mamlpp", "ablation=add_da"], "mamlpp+da"),  # the paper's variant
        (["algorithm=mamlpp", "ablation=drop_ca"], "mamlpp-ca"),
        (["experiment=mamlpp_miniimagenet_5w1s"], "mamlpp"),  # constant meta rate, as run
        (["experiment=mamlpp_miniimagenet_5w1s", "algorithm.ca=true"], "mamlpp+ca"),
        (["algorithm=mamlpp", "algorithm.first_order=true"], "mamlpp+first_order"),
    ],
)
def test_algorithm_label_says_what_ran(overrides, label):
    cfg = make_cfg(*overrides)
    assert algorithm_label(cfg) == label
    assert algorithm_label(saved(*overrides)) == label  # plain data, as in results.json
