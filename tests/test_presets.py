"""Presets hold the published settings (docs/presets.md cites each value), and
`metatrain` with no overrides is a named one."""

import pytest
from omegaconf import OmegaConf

from tests.conftest import make_cfg

# Values read from the papers and the authors' released code (docs/presets.md), not
# from the YAML files: each (preset, key) -> value.
CITED = {
    "maml_omniglot_5w1s": {
        "algorithm.meta_batch": 32, "algorithm.inner_lr": 0.4, "algorithm.train_steps": 1,
        "algorithm.eval_steps": 3, "dataset.queries": 1, "model.downsample": "stride",
        "model.filters": 64, "train.iterations": 60000, "algorithm.grad_clip": 0.0,
    },
    "maml_omniglot_20w1s": {
        "algorithm.meta_batch": 16, "algorithm.inner_lr": 0.1, "algorithm.train_steps": 5,
        "algorithm.eval_steps": 5, "dataset.queries": 1,
    },
    "fomaml_omniglot_20w5s": {"algorithm.first_order": True, "dataset.queries": 5},
    "maml_miniimagenet_5w1s": {
        "algorithm.meta_batch": 4, "algorithm.inner_lr": 0.01, "algorithm.eval_steps": 10,
        "dataset.queries": 15, "model.filters": 32, "model.downsample": "pool",
        "algorithm.grad_clip": 10.0,
    },
    "maml_miniimagenet_5w5s": {"algorithm.meta_batch": 2},
    "mamlpp_omniglot_20w1s": {
        "algorithm.meta_batch": 8, "algorithm.inner_lr": 0.1, "algorithm.train_steps": 5,
        "algorithm.eval_steps": 5, "dataset.queries": 1, "model.filters": 64,
        "model.downsample": "pool", "algorithm.min_lr": 1e-5, "algorithm.msl_epochs": 10,
        "train.iterations": 50000, "dataset.augment_rotation": True, "dataset.rotations": False,
        "dataset.train_classes": 1150, "dataset.val_classes": 50, "eval.ensemble_top_k": 3,
        "eval.val_tasks": 600, "algorithm.grad_clip": 0.0,
    },
    "mamlpp_miniimagenet_5w5s": {
        "algorithm.meta_batch": 2, "algorithm.inner_lr": 0.01, "model.filters": 48,
        "dataset.queries": 15, "algorithm.msl_epochs": 15, "algorithm.grad_clip": 10.0,
    },
    "reptile_omniglot_5w5s": {
        "algorithm.inner_batch": 10, "algorithm.inner_iters": 5, "algorithm.inner_lr": 1e-3,
        "algorithm.eval_batch": 5, "algorithm.train_shots": 10, "algorithm.meta_batch": 5,
        "train.iterations": 100000, "dataset.queries": 1, "eval.test_tasks": 10000,
        "model.bn_eval": "support_plus_query", "model.downsample": "stride",
        # reptile.py (`_full_state` restored around test tasks, `_model_state` only around
        # training tasks), run_omniglot.py (tests the final weights), omniglot.py
        "algorithm.inner_state": "carry", "eval.test_from": "last",
        "dataset.resample": "nearest", "dataset.invert": False, "dataset.split_shuffle": "python",
        "dataset.train_classes": 1200, "dataset.val_classes": 0, "dataset.rotations": True,
    },
    "reptile_transductive_omniglot_20w1s": {
        "algorithm.inner_batch": 20, "algorithm.inner_iters": 10, "algorithm.inner_lr": 5e-4,
        "algorithm.eval_batch": 10, "train.iterations": 200000, "model.bn_eval": "transductive",
        "algorithm.inner_state": "carry", "eval.test_from": "last", "dataset.val_classes": 0,
    },
    "reptile_miniimagenet_5w5s": {
        "algorithm.inner_iters": 8, "algorithm.train_shots": 15, "algorithm.eval_batch": 15,
        "model.filters": 32, "dataset.queries": 1, "model.bn_eval": "support_plus_query",
        "dataset.mean": [0.0, 0.0, 0.0], "dataset.std": [1.0, 1.0, 1.0],
        "algorithm.inner_state": "carry", "eval.test_from": "last",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CITED))
def test_preset_holds_the_cited_values(name):
    cfg = make_cfg(f"experiment={name}")
    for key, want in CITED[name].items():
        got = OmegaConf.select(cfg, key)
        got = getattr(got, "value", got)  # enums by their name
        assert got == want, (name, key, got, want)


def test_default_run_is_maml_omniglot_5w1s():
    default = OmegaConf.to_container(make_cfg())
    named = OmegaConf.to_container(make_cfg("experiment=maml_omniglot_5w1s"))
    assert default == named


def test_each_algorithm_gets_its_authors_omniglot_network():
    assert make_cfg("algorithm=fomaml").model.downsample.value == "stride"
    assert make_cfg("algorithm=reptile").model.downsample.value == "stride"
    assert make_cfg("algorithm=mamlpp").model.downsample.value == "pool"
    assert make_cfg("algorithm=maml", "dataset=miniimagenet").model.downsample.value == "pool"
    # an experiment file or the command line still decides
    assert make_cfg("model.downsample=pool").model.downsample.value == "pool"
    assert make_cfg("experiment=ablation_maml_plus_one").model.downsample.value == "pool"
