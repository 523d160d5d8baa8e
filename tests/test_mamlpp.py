"""Each MAML++ switch shows its own behaviour, not only that it runs."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.maml import Maml, msl_weights
from metatrain.evaluate import evaluate
from metatrain.models.conv4 import Conv4
from metatrain.models.norm import batch_norm
from tests.conftest import TINY, maml_cfg, random_tasks, run_cli, train_cfg

CPU = torch.device("cpu")
STEPS = 3


def build(seed=0, bnwb=False, bnrs=False, bn_eval="batch", iters_per_epoch=1, iterations=100, **kw):
    torch.manual_seed(seed)
    model = Conv4(
        1,
        3,
        16,
        filters=4,
        bn_weight_steps=STEPS if bnwb else 0,
        bn_stat_steps=STEPS if bnrs else 1,
    ).double()
    cfg = maml_cfg(
        **{
            "inner_lr": 0.2,
            "train_steps": STEPS,
            "eval_steps": STEPS,
            "bnwb": bnwb,
            "bnrs": bnrs,
            **kw,
        }
    )
    tc = train_cfg(iters_per_epoch=iters_per_epoch, iterations=iterations)
    return Maml(cfg, model, tc, bn_eval, CPU)


def grads(lrn, batch, iteration):
    lrn.optimizer.zero_grad(set_to_none=True)
    lrn.meta_gradient(batch, iteration)
    return torch.cat([p.grad.flatten() for p in lrn.model.parameters()])


# -- MSL --------------------------------------------------------------------


def test_msl_weights_follow_the_formula():
    # N = 5 steps, E = 10 epochs: decay = 1/5/10 = 0.02, floor = 0.03/5 = 0.006.
    assert msl_weights(5, 0, 10) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 3, 10) == pytest.approx([0.14] * 4 + [0.44])
    assert msl_weights(5, 9, 10) == pytest.approx([0.02] * 4 + [0.92])
    assert msl_weights(5, 10, 10) == [0, 0, 0, 0, 1.0]
    # Past the point where the decay would go below the floor, the floor holds.
    w = msl_weights(5, 3, 4)  # decay 0.05: 0.2 - 0.15 = 0.05 > floor; final 0.2 + 0.6
    assert w == pytest.approx([0.05] * 4 + [0.8])
    w = msl_weights(2, 9, 10)  # decay 0.05: 0.5 - 0.45 = 0.05 > 0.015
    assert w == pytest.approx([0.05, 0.95])


def test_msl_meta_loss_is_the_weighted_sum_over_steps():
    lrn = build(msl=True, msl_epochs=10, first_order=True)
    batch = random_tasks(tasks=2)
    w = msl_weights(STEPS, 4, 10)
    ours = grads(lrn, batch, iteration=4)
    model = lrn.model
    params = model.params()
    total = 0
    for t in range(2):
        fast = {n: p for n, p in params.items()}
        for i in range(STEPS):
            loss = F.cross_entropy(model(fast, batch.xs[t], step=i)[0], batch.ys[t])
            g = torch.autograd.grad(loss, list(fast.values()))
            fast = {n: p - 0.2 * gi for (n, p), gi in zip(fast.items(), g)}
            total = (
                total + w[i] * F.cross_entropy(model(fast, batch.xq[t], step=i)[0], batch.yq[t]) / 2
            )
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(total, list(params.values()))])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


# -- DA ---------------------------------------------------------------------


def test_da_is_first_order_before_its_epoch_and_second_order_after():
    batch = random_tasks()
    da = build(da=True, da_epochs=2, iters_per_epoch=5)
    fo, so = build(first_order=True), build()
    assert not da.second_order(9) and da.second_order(10)
    torch.testing.assert_close(grads(da, batch, 9), grads(fo, batch, 9), rtol=0, atol=1e-14)
    torch.testing.assert_close(grads(da, batch, 10), grads(so, batch, 10), rtol=0, atol=1e-14)
    assert not torch.allclose(grads(fo, batch, 10), grads(so, batch, 10))


# -- BNWB -------------------------------------------------------------------


def test_bnwb_weights_are_per_step_meta_learned_and_not_adapted():
    lrn = build(bnwb=True)
    params = lrn.model.params()
    assert params["bn0.weight"].shape == (STEPS, 4) and params["bn2.bias"].shape == (STEPS, 4)
    assert not any(n.startswith("bn") for n in lrn.adapted)
    lrn.optimizer.zero_grad()
    lrn.meta_gradient(random_tasks(), 0)
    for i in range(4):
        g = params[f"bn{i}.weight"].grad
        assert g is not None and (g.abs().sum(-1) > 0).all(), "every step's row is learned"
    # Row i is the one used at step i.
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        params["bn0.bias"][1] += 1.0
    out0, _ = lrn.model(params, x, step=0)
    out1, _ = lrn.model(params, x, step=1)
    out2, _ = lrn.model(params, x, step=2)
    assert not torch.allclose(out0, out1) and torch.allclose(out0, out2)


# -- BNRS -------------------------------------------------------------------


def test_bnrs_keeps_statistics_per_step_and_evaluation_uses_them():
    lrn = build(bnrs=True, bn_eval="running", first_order=True)
    rm, rv = lrn.model.running_stats(0)
    assert rm.shape == (STEPS, 4) and rv.shape == (STEPS, 4)
    lrn.meta_step(random_tasks(), 0)
    assert not torch.allclose(rm[0], rm[1]) and not torch.allclose(rm[1], rm[2])
    # One step of momentum 0.1 from (0, 1) towards the batch statistics of step i.
    assert torch.all(rm.abs() > 0) and torch.all(rv != 1)
    # Forward in running mode at step i normalises with row i: with the first
    # block's output computed by hand from rm[2], rv[2], the logits match only
    # when the later blocks also use row 2.
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    p = lrn.model.params()
    h = F.conv2d(x, p["conv0.weight"], p["conv0.bias"], 1, 1)
    by_hand, _ = batch_norm(h, p["bn0.weight"], p["bn0.bias"], rm[2], rv[2])
    by_hand = F.max_pool2d(F.relu(by_hand), 2)
    for i in range(1, 4):
        h = F.conv2d(by_hand, p[f"conv{i}.weight"], p[f"conv{i}.bias"], 1, 1)
        rmi, rvi = lrn.model.running_stats(i)
        h, _ = batch_norm(h, p[f"bn{i}.weight"], p[f"bn{i}.bias"], rmi[2], rvi[2])
        by_hand = F.max_pool2d(F.relu(h), 2)
    expected = F.linear(by_hand.flatten(1), p["head.weight"], p["head.bias"])
    torch.testing.assert_close(lrn.model(p, x, step=2, running=True)[0], expected)
    assert not torch.allclose(lrn.model(p, x, step=1, running=True)[0], expected)
    # And evaluation in running mode differs from transductive evaluation.
    batch = random_tasks()
    running = lrn.predict(batch)
    lrn.bn_running = False
    assert not torch.allclose(running, lrn.predict(batch))


def test_shared_running_statistics_average_the_steps():
    lrn = build(first_order=True)  # no bnrs: one row
    rm, _ = lrn.model.running_stats(0)
    assert rm.shape == (1, 4)
    stats = torch.rand(STEPS, 4, 2, 4, dtype=torch.float64)
    lrn.model.update_running_stats(stats)
    torch.testing.assert_close(rm[0], 0.1 * stats[:, 0, 0].mean(0))


# -- LSLR -------------------------------------------------------------------


def test_lslr_rates_have_the_documented_shape_start_at_inner_lr_and_learn():
    lrn = build(lslr=True)
    rates = lrn.net["rates"]
    assert set(rates.rates) == {n.replace(".", "-") for n in lrn.adapted}
    for r in rates.rates.values():
        assert r.shape == (STEPS,) and torch.all(r == 0.2)
    lrn.optimizer.zero_grad()
    lrn.meta_gradient(random_tasks(), 50)
    g = rates.rates["conv1-weight"].grad
    assert g is not None and torch.all(g != 0)
    # d(meta-loss)/d(rate) against central differences.
    r = rates.rates["head-weight"]
    analytic = r.grad[1].item()
    h, vals = 1e-6, []
    for d in (h, -h):
        with torch.no_grad():
            r[1] += d
        lrn.optimizer.zero_grad()
        vals.append(lrn.meta_gradient(random_tasks(), 50)[0].item())
        with torch.no_grad():
            r[1] -= d
    assert analytic == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-5)


def test_lslr_rates_are_the_step_sizes_used():
    lrn = build(lslr=True)
    with torch.no_grad():
        for r in lrn.net["rates"].rates.values():
            r.zero_()
    batch = random_tasks()
    # With every rate zero, adaptation changes nothing: logits equal the unadapted ones.
    logits = lrn.predict(batch)
    plain = torch.stack(
        [lrn.model(lrn.model.params(), batch.xq[t], step=STEPS - 1)[0] for t in range(len(batch))]
    )
    torch.testing.assert_close(logits, plain.detach())


# -- CA ---------------------------------------------------------------------


@pytest.mark.parametrize("every", ["iteration", "epoch"])
def test_ca_follows_the_cosine_from_meta_lr_to_min_lr(every):
    # 12 iterations of 3 per epoch: per epoch (the MAML++ authors' code, T_max = the
    # run's 4 epochs) one rate for each epoch's 3 steps; per iteration T = 12.
    lrn = build(
        ca=True, ca_every=every, meta_lr=1e-3, min_lr=1e-5, iterations=12, iters_per_epoch=3,
        first_order=True,
    )  # fmt: skip
    batch = random_tasks(tasks=1)
    used = []
    for it in range(12):
        lrn.meta_step(batch, it)
        used.append(lrn.optimizer.param_groups[0]["lr"])  # the rate this step used
    t, total = (list(range(12)), 12) if every == "iteration" else ([k // 3 for k in range(12)], 4)
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / total)) / 2 for k in t]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[0] == 1e-3 and (every == "iteration" or used[2] == 1e-3)
    no_ca = build(meta_lr=1e-3, iterations=8, first_order=True)
    no_ca.meta_step(batch, 0)
    assert no_ca.optimizer.param_groups[0]["lr"] == 1e-3


def test_grad_clip_clamps_the_networks_gradients_not_the_learned_rates():
    # MAML++'s meta_update clamps its classifier's gradients to +-10 and leaves the LSLR
    # rates' alone: after a step from equal states, a clipped learner moved the rates
    # as an unclipped one did, and the network differently.
    batch = random_tasks(tasks=2)
    runs = {}
    for clip in (0.0, 1e-4):
        lrn = build(lslr=True, grad_clip=clip, first_order=False)
        lrn.optimizer.zero_grad(set_to_none=True)
        lrn.meta_gradient(batch, 0)
        rate_grads = [p.grad.clone() for p in lrn.net["rates"].parameters()]
        model_grads = [p.grad.clone() for p in lrn.model.parameters()]
        runs[clip] = (lrn, rate_grads, model_grads)
        lrn.meta_step(batch, 0)
    _, rates, grads = runs[0.0]
    assert max(g.abs().max().item() for g in rates) > 1e-4  # clipping would bind on them
    assert max(g.abs().max().item() for g in grads) > 1e-4
    (plain, *_), (clipped, *_) = runs[0.0], runs[1e-4]
    for a, b in zip(plain.net["rates"].parameters(), clipped.net["rates"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(
        not torch.equal(a, b) for a, b in zip(plain.model.parameters(), clipped.model.parameters())
    )


# -- ensemble ---------------------------------------------------------------


def test_ensemble_prediction_is_the_average_of_the_members_logits():
    from metatrain.data.tasks import EpisodeSampler, FixedTasks

    lrn = build()
    images = (torch.rand(12, 6, 1, 16, 16) * 255).to(torch.uint8)
    tasks = FixedTasks(EpisodeSampler(images, 3, 1, 2, [0.5], [0.25]), 10, seed=0)
    members = []
    for seed in (1, 2, 3):
        members.append({k: v.clone() for k, v in build(seed=seed).net.state_dict().items()})
    lrn.model.float()
    logits = []
    for m in members:
        lrn.net.load_state_dict(m)
        logits.append(torch.cat([lrn.predict(b) for b in tasks.batches(4)]))
    mean = torch.stack(logits).mean(0)
    labels = torch.cat([b.yq for b in tasks.batches(4)])
    expected = (mean.argmax(-1) == labels).double().mean(-1) * 100
    own = {k: v.clone() for k, v in lrn.net.state_dict().items()}
    result = evaluate(lrn, tasks, 4, members)
    assert result["acc"] == pytest.approx(expected.mean().item())
    # the learner's own weights are back afterwards
    assert all(torch.equal(own[k], v) for k, v in lrn.net.state_dict().items())
    # and a single member's accuracy differs from the ensemble's somewhere
    singles = [(lg.argmax(-1) == labels).double().mean(-1) for lg in logits]
    assert any(not torch.equal(s, expected / 100) for s in singles)


# -- checkpoint state -------------------------------------------------------


def test_state_dict_carries_rates_statistics_optimiser_and_schedule():
    switches = ("msl", "da", "bnrs", "bnwb", "lslr", "ca")
    kw = {**dict.fromkeys(switches, True), "da_epochs": 2, "iterations": 20}
    a, b = build(**kw), build(seed=5, **kw)
    batches = [random_tasks(seed=s) for s in range(6)]
    for it in range(3):
        a.meta_step(batches[it], it)
    # Through bytes, as on resume (a state dict shares tensors with its owner).
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for it in range(3, 6):
        a.meta_step(batches[it], it)
        b.meta_step(batches[it], it)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert set(sa) == set(sb) and any("rates" in k for k in sa)
    assert any("running_mean" in k for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [
        ["algorithm=mamlpp", "dataset.ways=20", "dataset.queries=1", "algorithm.meta_batch=2"],
        ["algorithm=maml", "algorithm.lslr=true"],
        ["algorithm=mamlpp", "algorithm.da=false", "model.bn_eval=running"],
    ],
    ids=["mamlpp-20w1s", "maml+lslr", "mamlpp-da"],
)
def test_presets_compose_and_run(omniglot_data, tmp_path, preset):
    out = run_cli(
        *TINY,
        *preset,
        "train.iterations=4",
        "train.iters_per_epoch=2",
        "algorithm.msl_epochs=1",
        "algorithm.da_epochs=1",
        "eval.val_tasks=4",
        "eval.test_tasks=4",
        "eval.ensemble_top_k=2",
        "train.val_interval=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "results.json").exists()
