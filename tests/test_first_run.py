"""What a new user meets: the run header instead of the config dump, cli.log, the
end of a run (test accuracy, results, figures), `make train`, repeated groups and
missing optional extras."""

import os
import subprocess

import pytest

from metatrain import usage
from metatrain.cli import CONF_DIR
from metatrain.errors import MetatrainError
from tests.conftest import REPO, TINY, make_cfg, run_cli


def test_a_run_opens_with_a_short_header_and_logs_to_cli_log(omniglot_data, tmp_path):
    out = run_cli(*TINY, "train.threads=1", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    err = out.stderr.splitlines()
    assert err[:4] == [
        f"run        {tmp_path}",
        "preset     none (the defaults): maml, omniglot 5-way 1-shot, 30 iterations",
        "overrides  " + " ".join([*TINY, "train.threads=1"]),
        "device     cpu, 1 thread (train.threads=1)",
    ]
    assert err[4] == f"config     {tmp_path}/.hydra/config.yaml (or: metatrain --cfg job ...)"
    assert not [ln for ln in err if ln.startswith(("algorithm:", "  meta_batch:"))]  # no dump
    assert f"results: {tmp_path}/results.json" in err
    # the default run is MAML's protocol: the last parameters tested
    assert any(ln.startswith("test, single model (last parameters)") for ln in err)
    figures = next(ln for ln in err if ln.startswith("figures: "))
    assert (tmp_path / "curves.png").stat().st_size and (tmp_path / "test_accuracy.png").exists()
    assert str(tmp_path / "curves.png") in figures
    log = (tmp_path / "cli.log").read_text()
    for line in (err[0], err[3], "iteration 10: val/acc", "test, single model", figures):
        assert line in log, line
    # the whole config is still one command away
    cfg = run_cli("--cfg", "job", *TINY)
    assert cfg.returncode == 0 and "meta_batch: 4" in cfg.stdout and "iterations: 30" in cfg.stdout


def test_make_train_runs_the_quickstart_and_a_published_preset_is_one_variable_away():
    def dry(*args):
        out = subprocess.run(
            ["make", "-n", "-W", "pyproject.toml", "train", *args],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return [ln for ln in out.stdout.splitlines() if "bin/metatrain " in ln]

    assert dry()[-1].endswith("bin/metatrain experiment=quickstart ")
    assert dry("EXPERIMENT=maml_omniglot_5w1s")[-1].endswith("experiment=maml_omniglot_5w1s ")


def test_a_repeated_ablation_combines_into_one_list():
    given = ["experiment=mamlpp_omniglot_5w1s", "ablation=drop_lslr", "ablation=drop_msl"]
    combined = usage.combine_repeats(CONF_DIR, given)
    assert combined == ["experiment=mamlpp_omniglot_5w1s", "ablation=[drop_lslr,drop_msl]"]
    cfg = make_cfg(*combined)
    assert cfg.algorithm.lslr is False and cfg.algorithm.msl is False  # both fixes dropped
    assert cfg.algorithm.bnwb is True and cfg.algorithm.ca is True  # the others stay on
    usage.check(CONF_DIR, combined)  # and the list passes the command line's checks
    assert usage.combine_repeats(CONF_DIR, ["ablation=drop_ca", "ablation=drop_ca"]) == [
        "ablation=[drop_ca]"
    ]


@pytest.mark.parametrize(
    "given, fragment",
    [
        (["algorithm=maml", "algorithm=reptile"], "algorithm is given 2 times (maml, reptile)"),
        (["experiment=quickstart", "experiment=maml_omniglot_5w1s"], "keep one"),
        (["ablation=add_msl", "ablation=drop_msl"], "both set algorithm.msl (True and False)"),
    ],
)
def test_other_repeats_are_refused_with_one_line(given, fragment):
    with pytest.raises(MetatrainError, match=r"^[^\n]*$") as e:
        usage.combine_repeats(CONF_DIR, given)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "swept", ["train.backend=loop,vmap", "logger=none,wandb", "train.threads=range(1,3)"]
)
def test_a_sweep_over_a_key_that_does_not_change_the_maths_is_refused(swept):
    # its cells would share one run directory (the key is left out of the name)
    with pytest.raises(MetatrainError, match=r"^[^\n]*$") as e:
        usage.check(CONF_DIR, ["experiment=quickstart", swept])
    key = swept.split("=")[0]
    assert f"{key} is swept" in str(e.value) and "sweep_name" in str(e.value)
    usage.check(CONF_DIR, ["experiment=quickstart", "seed=0,1", "train.backend=loop"])  # fine


def test_multirun_and_cfg_together_are_one_line():
    out = run_cli("-m", "experiment=quickstart", "--cfg", "job")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr.startswith("metatrain: error: -m and --cfg cannot go together")


def test_a_repeated_plain_key_keeps_its_last_value():
    given = ["train.iterations=5", "train.iterations=10"]
    assert usage.combine_repeats(CONF_DIR, given) == given
    assert make_cfg(*given).train.iterations == 10


def test_the_command_line_combines_before_hydra_reads_it():
    out = run_cli("--cfg", "job", "experiment=mamlpp_omniglot_5w1s", "ablation=drop_lslr",
                  "ablation=drop_msl")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "  lslr: false" in out.stdout and "  msl: false" in out.stdout
    refused = run_cli("algorithm=maml", "algorithm=reptile")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("metatrain: error: algorithm is given 2 times")


@pytest.mark.parametrize("launcher, package", [("local", "joblib"), ("slurm", "submitit")])
def test_a_missing_launcher_extra_is_named(tmp_path, launcher, package):
    # A regular package named hydra_plugins hides the installed launcher plugins, as
    # after `pip install metatrain` without the scale extra.
    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = run_cli("-m", f"hydra/launcher={launcher}", "seed=0,1", env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert out.stderr == (
        f"metatrain: error: hydra/launcher={launcher} needs hydra-{package}-launcher, which is "
        "not installed: pip install 'metatrain[scale]' (make install does)\n"
    )


@pytest.mark.parametrize(
    "override, meant",
    [("eval.test_task=50", "eval.test_tasks"), ("eval.seeds=3", "eval.seed"),
     ("model.bn_evl=running", "model.bn_eval")],
)  # fmt: skip
def test_metatrain_eval_suggests_the_key_meant(override, meant):
    from omegaconf import OmegaConf

    from metatrain.eval_config import compose

    saved = OmegaConf.to_container(make_cfg("experiment=quickstart"), resolve=True,
                                   enum_to_str=True)  # fmt: skip
    key = override.split("=")[0]
    with pytest.raises(MetatrainError) as e:
        compose(saved, [override])
    assert str(e.value) == f"{key} is not a key of this run's config; did you mean {meant}?"
