"""Conv4 with group norm (model.norm=group): against a by-hand forward pass, and the
same meta-gradients and predictions on every backend as the per-task loop."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.maml import Maml
from metatrain.algorithms.reptile import Reptile
from metatrain.config import Backend
from metatrain.errors import MetatrainError
from metatrain.inert import inert_settings
from metatrain.models import build_model
from metatrain.models.conv4 import Conv4
from metatrain.train import train
from tests.conftest import TINY, make_cfg, maml_cfg, random_tasks, reptile_cfg, train_cfg
from tests.test_protonet import learner as protonet

CPU = torch.device("cpu")
BACKENDS = ["loop", "vmap", "groups"]


def gn_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Conv4(1, 3, 16, filters=4, norm="group", norm_groups=2, **kw).double()
    with torch.no_grad():  # affine parameters away from their (1, 0) start
        for n in model.norm_names:
            model.params()[n].add_(0.3 * torch.randn_like(model.params()[n]))
    return model


def by_hand(params, x, groups=2, eps=1e-5):
    """conv -> group norm written out (mean and biased variance of each example's
    groups of channels) -> affine -> ReLU -> max-pool, four times, then the head."""
    for i in range(4):
        y = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=1)
        n, c, h, w = y.shape
        g = y.reshape(n, groups, c // groups * h * w)
        mean, var = g.mean(-1, keepdim=True), g.var(-1, unbiased=False, keepdim=True)
        y = ((g - mean) / torch.sqrt(var + eps)).reshape(n, c, h, w)
        y = y * params[f"gn{i}.weight"].view(1, -1, 1, 1) + params[f"gn{i}.bias"].view(1, -1, 1, 1)
        x = F.max_pool2d(y.relu(), 2)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def test_forward_matches_group_norm_by_hand_and_keeps_no_statistics():
    model = gn_model()
    x = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    logits, stats = model(model.params(), x)
    torch.testing.assert_close(logits, by_hand(model.params(), x), rtol=1e-10, atol=1e-12)
    assert stats.numel() == 0 and not any("running" in k for k in model.state_dict())
    # each example is normalised alone: its logits do not depend on the rest of the batch
    torch.testing.assert_close(model(model.params(), x[:1])[0], logits[:1], rtol=1e-10, atol=1e-12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.update_running_stats(torch.zeros(2, 0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def meta_grad(lrn, batch, backend):
    lrn.optimizer.zero_grad(set_to_none=True)
    lrn.meta_gradient(batch, 0, backend)
    return {n: p.grad.clone() for n, p in lrn.model.params().items()}


@pytest.mark.parametrize("bnwb", [False, True])
def test_maml_meta_gradient_and_predictions_agree_on_every_backend(bnwb):
    """Second order, two steps, float64; with per-step affine rows (BNWB) too."""
    batch = random_tasks(tasks=3, ways=3, shots=2, queries=2)
    cfg = maml_cfg(inner_lr=0.3, train_steps=2, eval_steps=2, bnwb=bnwb)
    grads, logits = {}, {}
    for backend in BACKENDS:
        model = gn_model(bn_weight_steps=2 if bnwb else 0)
        lrn = Maml(cfg, model, train_cfg(backend=Backend[backend]), "transductive", CPU)
        assert lrn.backend_for(batch, 0, evaluation=True) == backend
        grads[backend] = meta_grad(lrn, batch, backend)
        logits[backend] = lrn.predict(batch)
    for backend in BACKENDS[1:]:
        for n, g in grads["loop"].items():
            torch.testing.assert_close(grads[backend][n], g, rtol=1e-10, atol=1e-12, msg=n)
        torch.testing.assert_close(logits[backend], logits["loop"], rtol=1e-10, atol=1e-12)
    assert grads["loop"]["gn0.weight"].abs().sum() > 0


def test_reptile_and_protonet_agree_on_every_backend():
    batch = random_tasks(tasks=2, ways=3, shots=3, queries=2)
    cfg = reptile_cfg(inner_iters=2, inner_batch=4, eval_iters=2, eval_batch=4)
    reptile, proto = {}, {}
    for backend in BACKENDS:
        model = gn_model()
        lrn = Reptile(cfg, model, train_cfg(backend=Backend[backend]), "transductive", CPU)
        lrn.meta_step(batch, 0)
        reptile[backend] = ({n: p.detach().clone() for n, p in model.params().items()},)
        reptile[backend] += (lrn.predict(batch),)
        proto[backend] = protonet(gn_model(), backend).predict(batch)
    for backend in BACKENDS[1:]:
        for n, p in reptile["loop"][0].items():
            torch.testing.assert_close(reptile[backend][0][n], p, rtol=1e-10, atol=1e-12, msg=n)
        torch.testing.assert_close(reptile[backend][1], reptile["loop"][1], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(proto[backend], proto["loop"], rtol=1e-10, atol=1e-10)


def test_evaluation_modes_agree_and_are_named_inert():
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    cfg = maml_cfg(inner_lr=0.3, eval_steps=2)
    out = [
        Maml(cfg, gn_model(), train_cfg(backend=Backend.loop), mode, CPU).predict(batch)
        for mode in ("transductive", "support_plus_query", "running")
    ]
    for o in out[1:]:
        torch.testing.assert_close(o, out[0], rtol=1e-10, atol=1e-12)
    lines = inert_settings(make_cfg("model.norm=group", "model.bn_eval=running"))
    assert any("model.bn_eval changes nothing under model.norm=group" in x for x in lines)
    assert not any("model.norm" in x for x in inert_settings(make_cfg("model.norm=group")))
    assert any("norm_groups" in x for x in inert_settings(make_cfg("model.norm_groups=8")))


def test_config_default_is_batch_norm_and_groups_must_divide_the_filters():
    cfg = make_cfg()
    assert cfg.model.norm.value == "batch" and cfg.model.norm_groups == 32
    assert any(n.startswith("bn0") for n in build_model(cfg, CPU).norm_names)
    model = build_model(make_cfg("model.norm=group"), CPU)  # 64 filters, 32 groups
    assert "gn0.bias" in model.norm_names and model.norm_groups == 32
    with pytest.raises(MetatrainError, match="model.norm_groups=12 must be at least 1 and divide"):
        build_model(make_cfg("model.norm=group", "model.norm_groups=12"), CPU)


def test_real_omniglot_run_with_group_norm_learns(omniglot_data, tmp_path):
    overrides = [*TINY, "model.norm=group", "model.norm_groups=4", "algorithm=protonet"]
    overrides += ["algorithm.meta_batch=4", "train.iterations=40", "eval.test_tasks=60"]
    results = train(make_cfg(*overrides), tmp_path)
    assert results["test"]["acc"] > 20 + 3 * results["test"]["ci95"], results["test"]
