"""Reptile's meta-update against a hand computation, its schedule and its variants."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.inner import adam_step, adam_steps_
from metatrain.algorithms.reptile import InnerOptimizer, Reptile, minibatch_ids
from metatrain.config import Backend
from metatrain.models.conv4 import Conv4
from tests.conftest import random_tasks, reptile_cfg, train_cfg

CPU = torch.device("cpu")


def comparable(name: str, optimizer: str = "adam") -> bool:
    """Conv biases feed batch norm, which removes them: their true gradient is 0 and
    what autograd returns is rounding noise (~1e-17) that Adam scales up to full
    steps of lr * sign(noise). They change nothing downstream, so they are left out
    of exact comparisons under Adam; the networks' outputs are compared instead."""
    return optimizer != "adam" or not (name.startswith("conv") and name.endswith("bias"))


def build(seed=0, backend="loop", iterations=10, **kw):
    torch.manual_seed(seed)
    model = Conv4(1, 3, 16, filters=4).double()
    cfg = reptile_cfg(**{"inner_lr": 0.01, "inner_iters": 3, "inner_batch": 6, **kw})
    tc = train_cfg(iterations=iterations, backend=Backend[backend])
    return Reptile(cfg, model, tc, "batch", CPU)


def by_hand(model, phi, xs, ys, iters, lr, betas=(0.0, 0.999), sgd=False):
    """W from `iters` full-batch steps of torch.optim.Adam (or SGD) from phi."""
    w = {n: p.detach().clone().requires_grad_() for n, p in phi.items()}
    opt = (
        torch.optim.SGD(w.values(), lr=lr)
        if sgd
        else torch.optim.Adam(w.values(), lr=lr, betas=betas, eps=1e-8)
    )
    for _ in range(iters):
        opt.zero_grad()
        F.cross_entropy(model(w, xs)[0], ys).backward()
        opt.step()
    return {n: p.detach() for n, p in w.items()}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_meta_step_equals_hand_computed_update(optimizer):
    # inner_batch = all six examples, so every minibatch is the whole task and the
    # hand computation needs no sampling.
    lrn = build(meta_step=0.7, inner_optimizer=InnerOptimizer[optimizer])
    batch = random_tasks(tasks=3, ways=3, shots=2, queries=1)
    phi = {n: p.detach().clone() for n, p in lrn.model.params().items()}
    ws = [
        by_hand(lrn.model, phi, batch.xs[t], batch.ys[t], 3, 0.01, sgd=optimizer == "sgd")
        for t in range(3)
    ]
    lrn.meta_step(batch, 0)
    expected = {n: phi[n] + 0.7 * (sum(w[n] for w in ws) / 3 - phi[n]) for n in phi}
    for n, p in lrn.model.params().items():
        if comparable(n, optimizer):
            torch.testing.assert_close(p.detach(), expected[n], rtol=1e-9, atol=1e-12, msg=n)
    x = batch.xs[0]
    torch.testing.assert_close(lrn.model(lrn.model.params(), x)[0], lrn.model(expected, x)[0])


def test_inner_adam_has_no_momentum():
    lrn = build(meta_step=1.0, inner_iters=3)
    batch = random_tasks(tasks=1, ways=3, shots=2, queries=1)
    phi = {n: p.detach().clone() for n, p in lrn.model.params().items()}
    momentum = by_hand(lrn.model, phi, batch.xs[0], batch.ys[0], 3, 0.01, betas=(0.9, 0.999))
    lrn.meta_step(batch, 0)  # eps = 1: phi becomes W
    diff = max((lrn.model.params()[n].detach() - momentum[n]).abs().max() for n in phi)
    assert diff > 1e-6, "the inner Adam must not be the default beta1=0.9 one"


def test_meta_step_size_is_linear_from_meta_step_to_final():
    lrn = build(meta_step=1.0, meta_step_final=0.2, iterations=100)
    assert lrn.meta_step_size(0) == pytest.approx(1.0)
    assert lrn.meta_step_size(50) == pytest.approx(0.6)
    assert lrn.meta_step_size(100) == pytest.approx(0.2)


def test_minibatches_are_shuffled_passes_over_the_task():
    g = torch.Generator().manual_seed(0)
    ids = minibatch_ids(n=10, iters=7, batch=4, generator=g, tasks=2)
    assert ids.shape == (2, 7, 4)
    flat = ids.reshape(2, -1)
    for t in range(2):
        assert sorted(flat[t, :10].tolist()) == list(range(10))
        assert sorted(flat[t, 10:20].tolist()) == list(range(10))


def test_serial_and_batched_agree_with_one_task():
    batch = random_tasks(tasks=1, ways=3, shots=3, queries=1)
    a, b = build(serial=False, inner_batch=4), build(serial=True, inner_batch=4)
    a.meta_step(batch, 3)
    b.meta_step(batch, 3)
    for (n, p), q in zip(a.model.params().items(), b.model.params().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_serial_differs_from_batched_with_several_tasks():
    batch = random_tasks(tasks=3, ways=3, shots=2, queries=1)
    a, b = build(serial=False, meta_step=0.5), build(serial=True, meta_step=0.5)
    a.meta_step(batch, 0)
    b.meta_step(batch, 0)
    assert not torch.allclose(a.model.params()["head.weight"], b.model.params()["head.weight"])


def test_loop_and_vmap_backends_agree():
    batch = random_tasks(tasks=3, ways=3, shots=3, queries=2)
    a, b = build(backend="loop", inner_batch=4), build(backend="vmap", inner_batch=4)
    a.meta_step(batch, 0)
    b.meta_step(batch, 0)
    for (n, p), q in zip(a.model.params().items(), b.model.params().values()):
        if comparable(n):
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10, msg=n)
    torch.testing.assert_close(a.predict(batch), b.predict(batch), rtol=1e-8, atol=1e-10)


def test_predict_fine_tunes_on_the_support_set():
    lrn = build(eval_iters=30, eval_batch=6, inner_lr=0.05)
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=4)
    logits = lrn.predict(batch)
    assert logits.shape == (2, 12, 3)
    # Fine-tuned predictions fit the support set's own examples better than phi.
    support = Reptile.predict(lrn, type(batch)(batch.xs, batch.ys, batch.xs, batch.ys))
    phi = lrn.model.params()
    before = torch.stack([lrn.model(phi, batch.xs[t])[0] for t in range(2)])
    assert F.cross_entropy(support.flatten(0, 1), batch.ys.flatten()) < F.cross_entropy(
        before.flatten(0, 1), batch.ys.flatten()
    )


@pytest.mark.parametrize("backend", ["loop", "vmap", "groups"])
def test_logged_loss_is_the_adapted_weights_on_each_tasks_last_minibatch(backend):
    lrn = build(backend=backend, inner_batch=4)  # 3 inner steps
    batch = random_tasks(tasks=3, ways=3, shots=3, queries=1)  # 9 examples, minibatches of 4
    phi = {n: p.detach().clone() for n, p in lrn.model.params().items()}
    g = torch.Generator().manual_seed(0)
    g.set_state(lrn.generator.get_state())
    ids = minibatch_ids(9, 3, 4, g, 3)  # (tasks, steps, 4): each task's minibatches
    logits, labels = [], []
    for t in range(3):
        x, y = batch.xs[t], batch.ys[t]
        # torch.optim.Adam over the first two minibatches, one at a time, as published
        w = {n: p.clone().requires_grad_() for n, p in phi.items()}
        opt = torch.optim.Adam(w.values(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
        for i in range(2):
            opt.zero_grad()
            F.cross_entropy(lrn.model(w, x[ids[t, i]])[0], y[ids[t, i]]).backward()
            opt.step()
        with torch.no_grad():
            logits.append(lrn.model(w, x[ids[t, 2]])[0])  # the third, before its step
        labels.append(y[ids[t, 2]])
    logits, labels = torch.cat(logits), torch.cat(labels)
    metrics = lrn.meta_step(batch, 0)
    torch.testing.assert_close(metrics["loss"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(metrics["acc"], (logits.argmax(-1) == labels).float().mean())
    # Not the starting weights' loss: two steps of Adam at 0.01 move it.
    start = torch.cat([lrn.model(phi, batch.xs[t][ids[t, 2]])[0] for t in range(3)])
    assert abs(F.cross_entropy(start, labels) - metrics["loss"]) > 1e-3


def test_serial_logs_each_task_from_the_weights_it_trained():
    batch = random_tasks(tasks=3, ways=3, shots=3, queries=1)
    serial, one_at_a_time = build(serial=True, inner_batch=4), build(inner_batch=4)
    metrics = serial.meta_step(batch, 0)
    # Serial = the batched step on one task after another (same minibatch draws).
    parts = [one_at_a_time.meta_step(batch.task(t), 0) for t in range(3)]
    loss = sum(m["loss"] for m in parts) / 3  # equal minibatches: the mean of the means
    torch.testing.assert_close(metrics["loss"], loss)
    torch.testing.assert_close(metrics["acc"], sum(m["acc"] for m in parts) / 3)


def test_fused_inner_adam_equals_the_functional_step_for_any_gradient_layout():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 3, 3, 3), (6,), (4, 6)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads[0] = grads[0].contiguous(memory_format=torch.channels_last)  # as conv weights' are
    ms = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    vs = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    want = [
        adam_step(p, gr, m, v, 3, 0.01, (0.0, 0.999)) for p, gr, m, v in zip(params, grads, ms, vs)
    ]
    ps, mm, vv = [p.clone() for p in params], [m.clone() for m in ms], [v.clone() for v in vs]
    adam_steps_(ps, grads, mm, vv, 3, 0.01, (0.0, 0.999))
    for (wp, wm, wv), p, m, v in zip(want, ps, mm, vv):
        torch.testing.assert_close(p, wp, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(m, wm, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(v, wv, rtol=1e-13, atol=1e-15)
