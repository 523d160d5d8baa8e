"""The one list of keys that do not change the maths, and everything that uses it."""

import re

from hydra import compose, initialize_config_dir

from metatrain.checkpoint import check_same_config, config_fingerprint
from metatrain.cli import CONF_DIR
from metatrain.keys import NON_MATH_KEYS, is_non_math
from tests.conftest import REPO, make_cfg

# One value for each listed key that differs from its default.
NON_MATH_OVERRIDES = {
    "logger": "logger=wandb",
    "device": "device=cpu",
    "sweep_name": "sweep_name=other",
    "dataset.root": "dataset.root=/elsewhere",
    "dataset.in_memory": "dataset.in_memory=false",
    "train.log_interval": "train.log_interval=7",
    "train.backend": "train.backend=loop",
    "train.vmap_chunk": "train.vmap_chunk=2",
    "train.channels_last": "train.channels_last=false",
    "train.tf32": "train.tf32=false",
    "train.amp_bf16": "train.amp_bf16=true",
    "train.compile": "train.compile=true",
    "train.cuda_graphs": "train.cuda_graphs=true",
    "train.inner_checkpoint": "train.inner_checkpoint=true",
    "train.nonfinite": "train.nonfinite=skip",
    "train.nonfinite_patience": "train.nonfinite_patience=3",
    "train.threads": "train.threads=1",
    "train.dist_timeout_s": "train.dist_timeout_s=60",
    "eval.batch": "eval.batch=3",
}


def hydra_cfg(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_every_listed_key_has_a_test_value():
    assert set(NON_MATH_OVERRIDES) == set(NON_MATH_KEYS), (
        "give each key of metatrain/keys.py a value in NON_MATH_OVERRIDES"
    )


def test_hydra_exclude_keys_are_the_list_and_the_keys_under_it():
    excluded = list(hydra_cfg().hydra.job.config.override_dirname.exclude_keys)
    assert [k for k in excluded if k in NON_MATH_KEYS] == list(NON_MATH_KEYS)
    assert all(is_non_math(k) for k in excluded)
    # Hydra compares by equality, so sub-keys typed on their own must be listed too.
    assert {"logger.mode", "logger.project", "logger.group"} <= set(excluded)


def test_non_math_overrides_leave_the_directory_name_and_fingerprint_alone():
    values = list(NON_MATH_OVERRIDES.values()) + ["logger.mode=online", "logger.project=p"]
    typed = hydra_cfg("seed=1", *values)
    assert typed.hydra.job.override_dirname == "seed=1"
    plain = make_cfg("seed=1")
    assert config_fingerprint(make_cfg("seed=1", *values)) == config_fingerprint(plain)
    assert (
        "algorithm.inner_lr=0.1" in hydra_cfg("algorithm.inner_lr=0.1").hydra.job.override_dirname
    )


def test_a_checkpoint_fingerprint_that_still_holds_a_listed_key_matches(tmp_path):
    # Written before a key joined the list: the saved fingerprint still has it.
    current = config_fingerprint(make_cfg())
    saved = {**current, "train": {**current["train"], "backend": "loop", "tf32": False}}
    check_same_config(saved, current, tmp_path / "last.pt")  # raises on a difference


def test_readme_names_every_listed_key():
    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("Keys that do not change the maths") :].split("\n\n")[0]
    named = set(re.findall(r"`([a-z0-9_.]+)`", paragraph))
    assert set(NON_MATH_KEYS) <= named, (
        f"README.md: list {sorted(set(NON_MATH_KEYS) - named)} beside the other keys"
    )
    assert "metatrain/keys.py" in paragraph
