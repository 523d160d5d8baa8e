"""Registries: every YAML option resolves to a registered implementation, unknown
names fail with the known ones, and a new module registers itself."""

import ast
import sys

import pytest
import torch
from omegaconf import OmegaConf

from metatrain.errors import MetatrainError
from metatrain.models import build_model
from metatrain.registry import BACKBONES, DATASETS, LEARNERS, Registry
from tests.conftest import REPO, make_cfg


@pytest.mark.parametrize("registry", [LEARNERS, BACKBONES, DATASETS], ids=lambda r: r.group)
def test_every_yaml_option_is_registered(registry):
    for path in sorted((REPO / "conf" / registry.group).glob("*.yaml")):
        cfg = make_cfg(f"{registry.group}={path.stem}", "logger=none")
        entry = registry.get(cfg[registry.group].name)
        # the YAML is typed by the schema its module registered
        assert OmegaConf.get_type(cfg[registry.group]) is entry.schema, path.name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(MetatrainError, match="unknown model 'nope'; known: .*conv4"):
        BACKBONES.get("nope")


def test_a_new_module_registers_itself(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mlp.py").write_text(
        "from tests.test_registry import TOY\n@TOY.register('mlp')\ndef mlp():\n    return 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert TOY.names() == ["mlp"] and TOY.get("mlp").target() == 1
    sys.modules.pop("toy_models.mlp", None)


TOY = Registry("toy", "toy_models")


def test_build_model_follows_the_registry():
    cfg = make_cfg("logger=none", "model.filters=4", "algorithm=mamlpp")
    model = build_model(cfg, torch.device("cpu"))
    assert type(model) is BACKBONES.get("conv4").target
    # MAML++ asks for per-step batch-norm weights: (steps, C)
    assert model.params()["bn0.weight"].shape == (cfg.algorithm.train_steps, 4)


def test_no_algorithm_imports_the_data_package():
    for path in (REPO / "metatrain" / "algorithms").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n == "metatrain.data" or n.startswith("metatrain.data.")]
            assert not bad, f"{path.name} imports {bad}"
