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
        "dataset.train_classes": 1150, "dataset.val_classes": 50, "eval.ensemble_top_k": 5,
        "eval.val_tasks": 600, "algorithm.grad_clip": 0.0,
        # the authors' code: leaky ReLU 0.01, second order from epoch 0 (configs'
        # first_order_to_second_order_epoch -1), cosine stepped per epoch (T_max = epochs)
        "model.activation": "leaky_relu", "model.activation_slope": 0.01, "algorithm.da": False,
        "algorithm.first_order": False, "algorithm.ca": True, "algorithm.ca_every": "epoch",
        "algorithm.lslr": True, "algorithm.msl": True, "algorithm.bnwb": True,
        "train.iters_per_epoch": 500, "model.bn_eps": 1e-5,
    },
    "mamlpp_omniglot_5w1s": {
        "eval.ensemble_top_k": 5, "model.activation": "leaky_relu", "algorithm.da": False,
    },
    "mamlpp_miniimagenet_5w5s": {
        "algorithm.meta_batch": 2, "model.filters": 48,
        "dataset.queries": 15, "algorithm.msl_epochs": 15, "algorithm.grad_clip": 10.0,
        # LSLR starts at task_learning_rate (parser default 0.1; the configs' 0.01 is unread);
        # min_learning_rate = meta_learning_rate: a constant meta rate
        "algorithm.inner_lr": 0.1, "algorithm.ca": False, "algorithm.meta_lr": 1e-3,
        "model.activation": "leaky_relu", "algorithm.da": False, "eval.ensemble_top_k": 5,
        "model.pool_padding": "valid",
    },
    "mamlpp_miniimagenet_5w1s": {
        "algorithm.inner_lr": 0.1, "algorithm.ca": False, "algorithm.grad_clip": 10.0,
        "eval.ensemble_top_k": 5, "model.activation": "leaky_relu", "algorithm.da": False,
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
        "model.bn_eps": 1e-3,  # models.py: tf.layers.batch_normalization's default
        "model.activation": "relu", "model.conv_padding": "same", "model.bn_scale": True,
    },
    "reptile_transductive_omniglot_20w1s": {
        "algorithm.inner_batch": 20, "algorithm.inner_iters": 10, "algorithm.inner_lr": 5e-4,
        "algorithm.eval_batch": 10, "train.iterations": 200000, "model.bn_eval": "transductive",
        "algorithm.inner_state": "carry", "eval.test_from": "last", "dataset.val_classes": 0,
        "model.bn_eps": 1e-3,
    },
    "reptile_miniimagenet_5w5s": {
        "algorithm.inner_iters": 8, "algorithm.train_shots": 15, "algorithm.eval_batch": 15,
        "model.filters": 32, "dataset.queries": 1, "model.bn_eval": "support_plus_query",
        "dataset.mean": [0.0, 0.0, 0.0], "dataset.std": [1.0, 1.0, 1.0],
        "algorithm.inner_state": "carry", "eval.test_from": "last",
        # models.py: max_pooling2d(padding='same'), TF batch norm's eps
        "model.pool_padding": "same", "model.bn_eps": 1e-3, "model.activation": "relu",
    },
    "reptile_transductive_miniimagenet_5w1s": {
        "model.pool_padding": "same", "model.bn_eps": 1e-3, "model.filters": 32,
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
    # MAML++'s leaky ReLU, Reptile's TF batch norm and 'same' pooling
    assert make_cfg("algorithm=mamlpp").model.activation.value == "leaky_relu"
    assert make_cfg("algorithm=mamlpp", "dataset=miniimagenet").model.activation.value == (
        "leaky_relu"
    )
    assert make_cfg("experiment=ablation_maml_plus_one").model.activation.value == "leaky_relu"
    assert make_cfg("algorithm=reptile").model.bn_eps == 1e-3
    mini = make_cfg("algorithm=reptile", "dataset=miniimagenet").model
    assert (mini.bn_eps, mini.pool_padding.value) == (1e-3, "same")
    assert make_cfg("algorithm=maml").model.activation.value == "relu"
    # MAML's TF batch norm (cbfinn/maml utils.py: tf.contrib batch_norm's defaults)
    for dataset in ("omniglot", "miniimagenet"):
        m = make_cfg("algorithm=maml", f"dataset={dataset}").model
        assert (m.bn_eps, m.bn_scale) == (1e-3, False)
    assert make_cfg("algorithm=mamlpp", "dataset=miniimagenet").model.bn_eps == 1e-5


def test_mamlpp_algorithm_is_the_authors_run_and_the_papers_da_one_override_away():
    pp = make_cfg("algorithm=mamlpp").algorithm
    assert (pp.da, pp.msl, pp.bnwb, pp.lslr, pp.ca, pp.bnrs) == (
        False,
        True,
        True,
        True,
        True,
        False,
    )
    paper = make_cfg("algorithm=mamlpp", "algorithm.da=true").algorithm
    assert paper.da and paper.da_epochs == 50


@pytest.mark.parametrize("task", ["omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s",
                                  "omniglot_20w5s", "miniimagenet_5w1s", "miniimagenet_5w5s"])  # fmt: skip
def test_reptile_with_transduction_is_reptile_tested_transductively(task):
    """The two Reptile rows differ in model.bn_eval alone and test the final weights, so
    one run re-tested (metatrain-eval model.bn_eval=transductive) is the other row:
    summarize and plot give it that row's published number."""
    plain = make_cfg(f"experiment=reptile_{task}", "model.bn_eval=transductive")
    twin = make_cfg(f"experiment=reptile_transductive_{task}")
    assert OmegaConf.to_container(plain) == OmegaConf.to_container(twin)
    assert twin.eval.test_from.value == "last"
