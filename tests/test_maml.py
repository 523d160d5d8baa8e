"""MAML and FOMAML meta-gradients against independent float64 computations."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.maml import Maml
from metatrain.models.conv4 import Conv4
from tests.conftest import maml_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")


def tiny_model(ways=3, seed=0, **kw):
    torch.manual_seed(seed)
    return Conv4(1, ways, 16, filters=4, **kw).double()


def learner(model, backend="loop", **kw):
    cfg = maml_cfg(**{"inner_lr": 0.3, "train_steps": 2, **kw})
    return Maml(cfg, model, train_cfg(backend=backend), "batch", CPU)


def meta_grad(lrn, batch, iteration=0, backend=None):
    lrn.optimizer.zero_grad(set_to_none=True)
    lrn.meta_gradient(batch, iteration, backend)
    return {n: p.grad.clone() for n, p in lrn.model.params().items()}


def reference_meta_loss(model, params, batch, steps, lr, second_order=True):
    """Textbook MAML written out directly: mean over tasks of the query loss after
    `steps` SGD steps on the support loss."""
    losses = []
    for t in range(len(batch)):
        fast = dict(params)
        for i in range(steps):
            loss = F.cross_entropy(model(fast, batch.xs[t], step=i)[0], batch.ys[t])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {n: p - lr * gi for (n, p), gi in zip(fast.items(), g)}
        losses.append(F.cross_entropy(model(fast, batch.xq[t], step=steps - 1)[0], batch.yq[t]))
    return torch.stack(losses).mean()


def test_second_order_matches_reference_and_finite_differences():
    model = tiny_model()
    batch = random_tasks()
    ours = meta_grad(learner(model), batch)
    params = model.params()
    ref = torch.autograd.grad(
        reference_meta_loss(model, params, batch, 2, 0.3), list(params.values())
    )
    for (n, g), r in zip(ours.items(), ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=n)
    # The reference itself against central differences of the meta-loss.
    h = 1e-6
    for name, idx in [("conv1.weight", (1, 2, 0, 1)), ("bn0.bias", (2,)), ("head.weight", (0, 3))]:
        values = []
        for delta in (h, -h):
            shifted = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
            with torch.no_grad():
                shifted[name][idx] += delta
            values.append(reference_meta_loss(model, shifted, batch, 2, 0.3).item())
        up, down = values
        assert ours[name][idx].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_first_order_is_query_gradient_at_adapted_parameters():
    model = tiny_model()
    batch = random_tasks()
    ours = meta_grad(learner(model, first_order=True), batch)
    # By hand: adapt with detached gradients, then differentiate the query loss with
    # respect to the adapted parameters themselves.
    expected = {n: torch.zeros_like(p) for n, p in model.params().items()}
    for t in range(len(batch)):
        fast = {n: p.detach().clone() for n, p in model.params().items()}
        for i in range(2):
            fast = {n: p.requires_grad_() for n, p in fast.items()}
            loss = F.cross_entropy(model(fast, batch.xs[t], step=i)[0], batch.ys[t])
            g = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: (p - 0.3 * gi).detach() for (n, p), gi in zip(fast.items(), g)}
        fast = {n: p.requires_grad_() for n, p in fast.items()}
        q = F.cross_entropy(model(fast, batch.xq[t], step=1)[0], batch.yq[t])
        for n, gi in zip(fast, torch.autograd.grad(q, list(fast.values()))):
            expected[n] += gi / len(batch)
    for n in ours:
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-10, atol=1e-12, msg=n)


def test_first_and_second_order_differ():
    batch = random_tasks()
    so = meta_grad(learner(tiny_model()), batch)
    fo = meta_grad(learner(tiny_model(), first_order=True), batch)
    diff = torch.cat([(so[n] - fo[n]).flatten() for n in so]).norm()
    assert diff > 1e-3 * torch.cat([g.flatten() for g in so.values()]).norm()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize(
    "switches",
    [{}, {"msl": True, "lslr": True, "bnwb": True, "bnrs": True}],
    ids=["maml", "mamlpp-switches"],
)
def test_loop_and_vmap_backends_agree(first_order, switches):
    batch = random_tasks(tasks=4)
    grads = {}
    for backend in ("loop", "vmap"):
        model = tiny_model(
            bn_weight_steps=2 if switches.get("bnwb") else 0,
            bn_stat_steps=2 if switches.get("bnrs") else 1,
        )
        lrn = learner(model, backend, first_order=first_order, **switches)
        lrn.optimizer.zero_grad()
        lrn.meta_gradient(batch, 0)
        grads[backend] = torch.cat([p.grad.flatten() for p in lrn.net.parameters()])
    torch.testing.assert_close(grads["loop"], grads["vmap"], rtol=0, atol=1e-10)


def test_meta_step_clips_gradient_elements():
    model = tiny_model()
    lrn = learner(model, grad_clip=1e-4, meta_lr=1.0)
    lrn.optimizer = torch.optim.SGD(lrn.net.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.params().items()}
    lrn.meta_step(random_tasks(), 0)
    for n, p in model.params().items():
        assert (before[n] - p.detach()).abs().max() <= 1e-4 + 1e-12, n


def test_predict_adapts_without_touching_meta_parameters():
    model = tiny_model()
    lrn = learner(model, eval_steps=3)
    batch = random_tasks()
    before = [p.detach().clone() for p in model.parameters()]
    logits = lrn.predict(batch)
    assert logits.shape == (3, 9, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # Adapting must help on the support set's own classes: compare with no steps.
    no_steps = learner(tiny_model(), eval_steps=0 + 1, inner_lr=0.0).predict(batch)
    assert not torch.allclose(logits, no_steps)
