"""The contract between the core and its implementations: a learner declares what
evaluation and the run's checks need of it, a backbone its normalisation and its
fast paths, and nothing outside them names them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatrain.algorithms.maml import Maml
from metatrain.algorithms.reptile import Reptile
from metatrain.config import Backend
from metatrain.errors import MetatrainError
from metatrain.eval_config import compose
from metatrain.models import task_groups
from metatrain.models.backbone import Backbone
from metatrain.models.conv4 import Conv4
from metatrain.registry import LEARNERS
from tests.conftest import make_cfg, maml_cfg, random_tasks, reptile_cfg, train_cfg

CPU = torch.device("cpu")


class Plain(Backbone):
    """Two convolutions without normalisation: no batch-norm arguments, no statistics."""

    def __init__(self, in_channels: int, ways: int, image_size: int, filters: int = 4):
        super().__init__()
        for i, c in enumerate((in_channels, filters)):
            w = torch.empty(filters, c, 3, 3)
            nn.init.xavier_uniform_(w)
            self.register_parameter(f"conv{i}.weight", nn.Parameter(w))
        self.add_head(in_channels, image_size, ways)

    @classmethod
    def options(cls, cfg) -> dict:
        return {}

    def trunk(self, params, x, step: int, running: bool):
        for i in range(2):
            x = F.max_pool2d(F.relu(F.conv2d(x, params[f"conv{i}.weight"], padding=1)), 2)
        return x.flatten(1), x.new_zeros(0)  # (N, features), no statistics


class OtherNorm(Conv4):
    """A Conv4 whose trunk is its own (say, another normalisation)."""

    def trunk(self, params, x, step: int, running: bool):
        return super().trunk(params, x, step, running)


def test_a_backbone_without_batch_norm_takes_no_batch_norm_arguments():
    model = Plain.from_config(None, in_channels=1, ways=3, image_size=16, bn_weight_steps=2)
    assert model.norm_options(None, 2, 2) == {} and not model.trunk_varies_with_step(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.update_running_stats(torch.zeros(3, 0))  # nothing to fold: changes nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", ["loop", "vmap", "groups"])
def test_maml_and_reptile_train_and_test_a_backbone_without_batch_norm(backend):
    torch.manual_seed(0)
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=3)
    tc = train_cfg(iterations=4, backend=Backend[backend])
    maml = Maml(maml_cfg(train_steps=2, eval_steps=2), Plain(1, 3, 16).double(), tc, "batch", CPU)
    reptile = Reptile(
        reptile_cfg(inner_iters=2, inner_batch=4, eval_iters=2, eval_batch=4),
        Plain(1, 3, 16).double(), tc, "batch", CPU,
    )  # fmt: skip
    for learner in (maml, reptile):
        # groups asked for: no channel-groups pass is declared, so another backend runs
        assert learner.backend_for(batch, 0) != "groups"
        assert learner.backend_for(batch, 0, evaluation=True) != "groups"
        before = {n: p.detach().clone() for n, p in learner.model.params().items()}
        metrics = learner.meta_step(batch, 0)
        assert torch.isfinite(metrics["loss"])
        moved = any(not torch.equal(before[n], p) for n, p in learner.model.params().items())
        assert moved
        assert learner.predict(batch).shape == (2, 9, 3)


def test_channel_groups_run_only_where_a_backbone_declares_them():
    assert task_groups.supports(Conv4(1, 3, 16, filters=4))
    # A Conv4 subclass with its own trunk has not said its grouped pass is the same.
    other = OtherNorm(1, 3, 16, filters=4)
    assert not OtherNorm.channel_groups and not task_groups.supports(other)
    with pytest.raises(ValueError, match="declares no channel-groups pass"):
        task_groups.forward(
            other, task_groups.stack(other.params(), 2), torch.zeros(2, 3, 1, 16, 16)
        )
    tc = train_cfg(backend=Backend.groups)
    learner = Maml(maml_cfg(), other, tc, "batch", CPU)
    assert learner.backend_for(random_tasks(tasks=2), 0, evaluation=True) != "groups"


def test_every_learner_declares_evaluation_keys_of_its_own_schema():
    # A learner that adapts nothing at test may declare none; those it declares are its own.
    for entry in LEARNERS.entries():
        fields = entry.schema.__dataclass_fields__
        assert all(k in fields for k in entry.target.eval_keys), entry.name
        assert all(k in fields for k in entry.target.positive_keys), entry.name


def saved(*overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(make_cfg(*overrides), resolve=True, enum_to_str=True)


def test_metatrain_eval_takes_the_keys_the_run_s_learner_declares():
    assert (
        compose(saved("algorithm=reptile"), ["algorithm.eval_iters=7"]).cfg.algorithm.eval_iters
        == 7
    )
    # MAML declares no eval_iters: a key of the other learner is not this run's
    with pytest.raises(MetatrainError, match="not a key of this run's config"):
        compose(saved("algorithm=maml"), ["algorithm.eval_iters=7"])
    with pytest.raises(MetatrainError, match="algorithm.eval_batch=0 must be at least 1"):
        compose(saved("algorithm=reptile"), ["algorithm.eval_batch=0"])
    # Learned rates replace inner_lr at test: Meta-SGD's as LSLR's
    for learned in ("algorithm=metasgd", "algorithm=mamlpp"):
        with pytest.raises(MetatrainError, match="the learned rates are used at test"):
            compose(saved(learned), ["algorithm.inner_lr=0.1"])
    assert Maml.eval_protocol(make_cfg("algorithm=metasgd").algorithm)["inner_lr"] is None
