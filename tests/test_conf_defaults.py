"""Defaults exist once, in the dataclass schemas: the root config and each group's
default option (the one conf/config.yaml's defaults list picks) set no value that a
schema already holds, neither repeating it nor contradicting it. Other options of a
group exist to differ from the schema (fomaml.yaml's first_order: true) and may set
any value. `name` is kept in every option file: it is the option's identity."""

import shutil
from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from metatrain.cli import CONF_DIR

GROUPS = ("algorithm", "dataset", "model", "logger")
NOT_VALUES = ("defaults", "name", "hydra")  # the defaults list, identities, Hydra's own


def _schema(path: str) -> dict:
    node = ConfigStore.instance().load(path).node
    return OmegaConf.to_container(node, enum_to_str=True, throw_on_missing=False)


def _schema_name(defaults: list) -> str:
    (name,) = [d for d in defaults if isinstance(d, str) and d.endswith("_schema")]
    return name


def _compare(where: str, values: dict, schema: dict, prefix: str = "") -> list[str]:
    problems = []
    for key, value in values.items():
        if not prefix and key in NOT_VALUES:
            continue
        full, default = prefix + key, schema.get(key, MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            problems += _compare(where, value, default, full + ".")
        elif default == MISSING:
            continue  # a required key without a default: the file has to give it
        elif value == default:
            problems.append(f"{where}: {full}: {value!r} repeats the schema default; delete it")
        else:
            problems.append(
                f"{where}: {full}: {value!r} disagrees with the schema default {default!r}; "
                "put the value in the schema"
            )
    return problems


def conf_problems(conf: Path) -> list[str]:
    root = yaml.safe_load((conf / "config.yaml").read_text())
    problems = _compare("config.yaml", root, _schema(f"{_schema_name(root['defaults'])}.yaml"))
    chosen = {k: v for d in root["defaults"] if isinstance(d, dict) for k, v in d.items()}
    for group in GROUPS:
        path = conf / group / f"{chosen[group]}.yaml"
        values = yaml.safe_load(path.read_text())
        schema = _schema(f"{group}/{_schema_name(values['defaults'])}.yaml")
        problems += _compare(f"{group}/{path.name}", values, schema)
    return problems


def test_default_options_and_root_config_hold_no_schema_default():
    assert conf_problems(Path(CONF_DIR)) == []


def test_a_repeated_or_contradicting_default_is_named(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    with open(conf / "algorithm" / "maml.yaml", "a") as f:
        f.write("meta_lr: 1.0e-3\ninner_lr: 0.5\n")
    with open(conf / "config.yaml", "a") as f:
        f.write("train:\n  backend: auto\n")
    assert conf_problems(conf) == [
        "config.yaml: train.backend: 'auto' repeats the schema default; delete it",
        "algorithm/maml.yaml: meta_lr: 0.001 repeats the schema default; delete it",
        (
            "algorithm/maml.yaml: inner_lr: 0.5 disagrees with the schema default 0.4; "
            "put the value in the schema"
        ),
    ]


def test_the_default_option_is_the_one_the_defaults_list_picks(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    root = conf / "config.yaml"
    root.write_text(root.read_text().replace("  - algorithm: maml\n", "  - algorithm: fomaml\n"))
    problems = conf_problems(conf)
    assert (
        "algorithm/fomaml.yaml: first_order: True disagrees with the schema default "
        "False; put the value in the schema" in problems
    )
    assert "algorithm/fomaml.yaml: meta_batch: 32 repeats the schema default; delete it" in problems
