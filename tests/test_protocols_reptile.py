"""The authors' Reptile protocols: support-plus-one-query batch norm at test and an
inner Adam whose state is carried across tasks, each against a by-hand computation."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.maml import Maml
from metatrain.algorithms.reptile import InnerState, Reptile
from metatrain.config import Backend
from metatrain.models.conv4 import Conv4
from tests.conftest import maml_cfg, random_tasks, reptile_cfg, train_cfg
from tests.test_reptile import comparable

CPU = torch.device("cpu")
BACKENDS = ["loop", "vmap", "groups"]


def reptile(backend="loop", bn_eval="transductive", iterations=10, **kw):
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, filters=4).double()
    cfg = reptile_cfg(**{"inner_lr": 0.01, "inner_iters": 3, "inner_batch": 6, **kw})
    tc = train_cfg(iterations=iterations, backend=Backend[backend])
    return Reptile(cfg, model, tc, bn_eval, CPU)


def per_query_by_hand(model, w: dict, xs, xq):
    """Each query's logits from its own pass over the support set plus it (batch
    statistics of S+1 images), one task with weights w."""
    rows = [model(w, torch.cat([xs, xq[j : j + 1]]))[0][-1] for j in range(xq.shape[0])]
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reptile_support_plus_query_is_one_pass_per_query(backend):
    lrn = reptile(backend, "support_plus_query", eval_iters=4, eval_batch=6)
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    got = lrn.predict(batch)
    # The fine-tuned weights, as predict computes them (same fixed minibatches).
    phi = {n: p.detach() for n, p in lrn.model.params().items()}
    g = torch.Generator().manual_seed(0)
    w, _, _, _ = lrn._train_tasks(phi, batch.xs, batch.ys, iters=4, batch=6, generator=g)
    want = torch.stack(
        [
            per_query_by_hand(lrn.model, {n: t[i] for n, t in w.items()}, batch.xs[i], batch.xq[i])
            for i in range(2)
        ]
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    # and it is neither transductive nor running-statistics evaluation
    other = reptile(backend, "transductive", eval_iters=4, eval_batch=6).predict(batch)
    assert (other - got).abs().max() > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("anil", [False, True])
def test_maml_support_plus_query_is_one_pass_per_query(backend, anil):
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, filters=4).double()
    cfg = maml_cfg(inner_lr=0.1, train_steps=1, eval_steps=2, anil=anil)
    lrn = Maml(cfg, model, train_cfg(backend=Backend[backend]), "support_plus_query", CPU)
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    got = lrn.predict(batch)
    want = []
    for t in range(2):
        fast = {n: p.detach().clone().requires_grad_() for n, p in model.params().items()}
        adapted = list(model.head_names) if anil else list(fast)
        for _ in range(2):  # SGD on the support set with batch statistics
            loss = F.cross_entropy(model(fast, batch.xs[t])[0], batch.ys[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted])
            for n, g in zip(adapted, grads):
                fast[n] = (fast[n] - 0.1 * g).detach().requires_grad_()
        want.append(per_query_by_hand(model, fast, batch.xs[t], batch.xq[t]).detach())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-9, atol=1e-11)


def carried_by_hand(model, phi, tasks, iters, lr, eps, meta_iters):
    """Reptile whose inner torch.optim.Adam (beta1 = 0) is created once and never
    reset: every task restarts the weights at phi, not the optimiser."""
    w = {n: p.detach().clone().requires_grad_() for n, p in phi.items()}
    opt = torch.optim.Adam(w.values(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    phi = {n: p.clone() for n, p in phi.items()}
    for _ in range(meta_iters):
        ends = []
        for xs, ys in tasks:
            with torch.no_grad():
                for n, p in w.items():
                    p.copy_(phi[n])
            for _ in range(iters):
                opt.zero_grad()
                F.cross_entropy(model(w, xs)[0], ys).backward()
                opt.step()
            ends.append({n: p.detach().clone() for n, p in w.items()})
        phi = {n: phi[n] + eps * (sum(e[n] for e in ends) / len(ends) - phi[n]) for n in phi}
    return phi, opt, w


@pytest.mark.parametrize("backend", BACKENDS)
def test_carried_inner_adam_equals_one_optimiser_never_reset(backend):
    lrn = reptile(backend, inner_state=InnerState.carry, meta_step=0.6, meta_step_final=0.6)
    batch = random_tasks(tasks=3, ways=3, shots=2, queries=1)  # minibatch = whole task
    phi0 = {n: p.detach().clone() for n, p in lrn.model.params().items()}
    for it in range(2):
        lrn.meta_step(batch, it)
    tasks = [(batch.xs[t], batch.ys[t]) for t in range(3)]
    want, opt, _ = carried_by_hand(lrn.model, phi0, tasks, 3, 0.01, 0.6, 2)
    for n, p in lrn.model.params().items():
        if comparable(n):
            torch.testing.assert_close(p.detach(), want[n], rtol=1e-9, atol=1e-12, msg=n)
    m, v, steps = lrn.net["adam"].get()
    assert steps == 2 * 3 * 3
    ref = {n: opt.state[p] for n, p in zip(want, opt.param_groups[0]["params"])}
    for n in want:
        if comparable(n):
            torch.testing.assert_close(m[n], ref[n]["exp_avg"], rtol=1e-9, atol=1e-15, msg=n)
            torch.testing.assert_close(v[n], ref[n]["exp_avg_sq"], rtol=1e-9, atol=1e-15, msg=n)


def test_carried_state_differs_from_reset_and_survives_a_checkpoint():
    batch = random_tasks(tasks=3, ways=3, shots=2, queries=1)
    carry, reset = reptile(inner_state=InnerState.carry), reptile()
    for it in range(2):
        carry.meta_step(batch, it)
        reset.meta_step(batch, it)
    diff = (carry.model.params()["head.weight"] - reset.model.params()["head.weight"]).abs()
    assert diff.max() > 1e-6
    again = reptile(inner_state=InnerState.carry)
    again.load_state_dict(carry.state_dict())
    assert again.net["adam"].get()[2] == carry.net["adam"].get()[2] == 18
    for a, b in zip(again.net["adam"].get()[1].values(), carry.net["adam"].get()[1].values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluation_starts_each_task_from_the_carried_state_and_keeps_it(backend):
    lrn = reptile(backend, inner_state=InnerState.carry, eval_iters=3, eval_batch=6)
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    lrn.meta_step(batch, 0)
    before = [t.clone() for t in lrn.net["adam"].get()[1].values()]
    got = lrn.predict(batch)
    again = lrn.predict(batch)
    assert torch.equal(got, again), "evaluation must leave the carried state as it was"
    assert all(torch.equal(a, b) for a, b in zip(before, lrn.net["adam"].get()[1].values()))
    # By hand: each task fine-tunes with an optimiser holding the end-of-training state.
    phi = {n: p.detach() for n, p in lrn.model.params().items()}
    m, v, steps = lrn.net["adam"].get()
    for t in range(2):
        w = {n: p.clone().requires_grad_() for n, p in phi.items()}
        opt = torch.optim.Adam(w.values(), lr=0.01, betas=(0.0, 0.999), eps=1e-8)
        for n, p in w.items():
            opt.state[p] = {
                "step": torch.tensor(float(steps), dtype=torch.float64),
                "exp_avg": m[n].clone(),
                "exp_avg_sq": v[n].clone(),
            }
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(lrn.model(w, batch.xs[t])[0], batch.ys[t]).backward()
            opt.step()
        want = lrn.model(w, batch.xq[t])[0].detach()
        torch.testing.assert_close(got[t], want, rtol=1e-8, atol=1e-10)
