"""train.inner_checkpoint: the recomputed second-order meta-gradient equals the
unrolled one (float64, 1e-10) in both backends, with every switch that adds meta-
parameters or query losses."""

import pytest
import torch

from metatrain.algorithms.maml import Maml
from metatrain.models.resnet12 import ResNet12
from tests.conftest import maml_cfg, random_tasks, train_cfg
from tests.test_maml import tiny_model

CPU = torch.device("cpu")
SWITCHES = {
    "maml": {},
    "mamlpp": {"msl": True, "lslr": True, "bnwb": True, "bnrs": True},
    "anil": {"anil": True},
    "metasgd": {"metasgd": True},
}


def grads(model, switches, backend, recompute, batch):
    cfg = maml_cfg(inner_lr=0.3, train_steps=3, **switches)
    tc = train_cfg(backend=backend, inner_checkpoint=recompute, vmap_chunk=2)
    lrn = Maml(cfg, model, tc, "batch", CPU)
    lrn.optimizer.zero_grad(set_to_none=True)
    loss, _, stats = lrn.meta_gradient(batch, 0)
    out = {f"model.{n}": p.grad.clone() for n, p in model.params().items()}
    if "rates" in lrn.net:
        out.update({f"rate.{n}": r.grad.clone() for n, r in lrn.net["rates"].tensors().items()})
    return out, loss, stats


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("switches", list(SWITCHES), ids=str)
def test_recomputed_meta_gradient_equals_the_unrolled_one(backend, switches):
    sw = SWITCHES[switches]
    steps = 3 if sw.get("bnwb") else 0
    model = tiny_model(bn_weight_steps=steps, bn_stat_steps=max(steps, 1))
    batch = random_tasks(tasks=3)
    ref, ref_loss, ref_stats = grads(model, sw, backend, False, batch)
    got, loss, stats = grads(model, sw, backend, True, batch)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-10, atol=1e-12)


def test_recomputed_meta_gradient_on_resnet12():
    torch.manual_seed(0)
    model = ResNet12(1, 3, 16, width=0.05).double()
    batch = random_tasks(tasks=2)
    ref, _, _ = grads(model, {"msl": True}, "loop", False, batch)
    got, _, _ = grads(model, {"msl": True}, "vmap", True, batch)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
