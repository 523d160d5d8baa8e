"""Settings that are on but cannot change the run are named at its start."""

import pytest

from metatrain.inert import inert_settings
from tests.conftest import REPO, TINY, make_cfg, run_cli

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["algorithm=fomaml", "algorithm.da=true"], "first_order=true is first order throughout"),
        (["algorithm=mamlpp", "algorithm.da=true", "algorithm.da_epochs=0"], "da=true changes"),
        (["algorithm=mamlpp", "algorithm.da=true", "train.iterations=1000"], "covers all 2"),
        (["algorithm=maml", "algorithm.msl=true"], "msl=true changes nothing with one inner step"),
        (["algorithm=mamlpp", "algorithm.msl_epochs=0"], "msl=true changes nothing"),
        (["algorithm=mamlpp", "algorithm.min_lr=1e-3"], "ca=true changes nothing"),
        (["algorithm=mamlpp", "train.iterations=1"], "ca=true changes nothing with a single"),
        (["algorithm=mamlpp", "train.iterations=500"], "with a single epoch"),
        (["model.activation_slope=0.1"], "activation_slope changes nothing"),
        (["model.pool_padding=same", "model.downsample=stride"], "pool_padding=same changes"),
        (
            ["algorithm=maml", "algorithm.bnrs=true"],
            "bnrs=true changes nothing unless evaluation reads running",
        ),
        (
            ["algorithm=maml", "algorithm.bnrs=true", "model.bn_eval=running"],
            "bnrs=true changes nothing with one inner step",
        ),
        (["algorithm=reptile", "algorithm.meta_lr=0.1"], "unused by Reptile"),
        (["algorithm=reptile", "algorithm.grad_clip=10"], "grad_clip is unused"),
        (["eval.ensemble_top_k=3", "eval.test_from=last"], "ensemble_top_k=3 changes nothing"),
        (["eval.ensemble_top_k=6", "eval.test_from=best"], "capped at 5"),
        (["model.bn_momentum=0.5"], "bn_momentum changes nothing"),
    ],
)
def test_inert_setting_is_named(overrides, expected):
    lines = inert_settings(make_cfg(*overrides))
    assert len(lines) == 1 and expected in lines[0], lines


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["algorithm=mamlpp"],
        ["algorithm=mamlpp", "algorithm.bnrs=true", "model.bn_eval=running"],
        ["algorithm=reptile", "model.bn_eval=running", "model.bn_momentum=0.5"],
    ],
)
def test_effective_settings_are_not_named(overrides):
    assert inert_settings(make_cfg(*overrides)) == []


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_no_preset_sets_an_inert_switch(name):
    assert inert_settings(make_cfg(f"experiment={name}")) == []


def test_run_prints_the_warning_at_start(omniglot_data, tmp_path):
    out = run_cli(
        *TINY,
        "algorithm=fomaml",
        "algorithm.da=true",
        "train.iterations=1",
        "eval.val_tasks=2",
        "eval.test_tasks=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = "warning: algorithm.da=true changes nothing: algorithm.first_order=true"
    assert out.stderr.count(line) == 1
    assert out.stderr.index(line) < out.stderr.index("test, single model")
