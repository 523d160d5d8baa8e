"""MAML's own protocol (cbfinn/maml): quarter-turned evaluation tasks, the loss summed
and divided by the shots, and test queries apart from training queries, each checked
against a computation written out here."""

import pytest
import torch

from metatrain.algorithms.maml import Maml
from metatrain.config import Backend
from metatrain.data.tasks import EpisodeSampler, FixedTasks
from metatrain.models.conv4 import Conv4
from tests.conftest import make_cfg, maml_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")


def class_images(n_classes=9, per_class=6, size=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_classes, per_class, 1, size, size), generator=g).to(torch.uint8)


def test_rotated_evaluation_tasks_are_rot90_of_the_upright_ones_per_class():
    images = class_images()
    ways, shots, queries = 4, 2, 3
    s = EpisodeSampler(images, ways, shots, queries, [0.0], [1.0])
    upright = FixedTasks(s, 30, seed=11)
    turned = FixedTasks(s, 30, seed=11, rotate=True)
    # same classes and images: a rotated set pairs task by task with the upright one
    assert torch.equal(turned.cls, upright.cls) and torch.equal(turned.ids, upright.ids)
    assert turned.rot.shape == (30, ways) and set(turned.rot.unique().tolist()) == {0, 1, 2, 3}
    a = list(upright.batches(7))
    b = list(turned.batches(7))
    for i, (u, r) in enumerate(zip(a, b)):
        rot = turned.rot[7 * i : 7 * i + 7]
        for t in range(len(rot)):
            for j in range(ways):
                k = int(rot[t, j])
                # class j's rows: support j*shots.., query j*queries..; one turn for both
                for xr, xu, n in ((r.xs, u.xs, shots), (r.xq, u.xq, queries)):
                    want = torch.rot90(xu[t, j * n : (j + 1) * n], k, dims=(-2, -1))
                    assert torch.equal(xr[t, j * n : (j + 1) * n], want)
        assert torch.equal(r.ys, u.ys) and torch.equal(r.yq, u.yq)
    # fixed by the seed: a second construction (another call) gives the same bytes
    again = next(iter(FixedTasks(s, 30, seed=11, rotate=True).batches(30)))
    assert torch.equal(again.xq, torch.cat([x.xq for x in b]))
    other = FixedTasks(s, 30, seed=12, rotate=True)
    assert not torch.equal(other.rot, turned.rot)


def test_eval_rotation_needs_square_images():
    from metatrain.errors import MetatrainError

    s = EpisodeSampler(torch.zeros(5, 4, 1, 3, 4, dtype=torch.uint8), 2, 1, 1, [0.0], [1.0])
    with pytest.raises(MetatrainError, match="eval_rotation needs square images"):
        FixedTasks(s, 3, seed=0, rotate=True)


def tiny(ways=3):
    torch.manual_seed(0)
    return Conv4(1, ways, 16, filters=4, downsample="stride").double()


def sum_ce(out, y, shots):
    """cbfinn/maml's loss written out: per-example cross-entropies summed, / shots."""
    logp = out.log_softmax(-1)
    return -sum(logp[i, y[i]] for i in range(len(y))) / shots


def by_hand(model, params, batch, steps, lr, shots, second_order):
    """(mean meta-loss over tasks, its gradient) with that loss for the inner gradient
    (support) and the meta-loss (query); first order: the query gradient at the
    adapted parameters, inner steps detached."""
    losses, grads = [], {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(len(batch)):
        fast = dict(params) if second_order else {n: p.detach() for n, p in params.items()}
        for i in range(steps):
            if not second_order:
                fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
            loss = sum_ce(model(fast, batch.xs[t], step=i)[0], batch.ys[t], shots)
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {n: p - lr * gi for (n, p), gi in zip(fast.items(), g)}
        if not second_order:
            fast = {n: p.detach().requires_grad_() for n, p in fast.items()}
        q = sum_ce(model(fast, batch.xq[t], step=steps - 1)[0], batch.yq[t], shots)
        wrt = params if second_order else fast
        for n, gi in zip(wrt, torch.autograd.grad(q, list(wrt.values()))):
            grads[n] += gi / len(batch)
        losses.append(q.detach())
    return torch.stack(losses).mean(), grads


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("backend", ["loop", "vmap", "groups", "recompute"])
def test_sum_div_shots_meta_gradient_matches_the_loss_written_out(backend, first_order):
    shots = 2
    batch = random_tasks(tasks=3, ways=3, shots=shots, queries=3)
    model = tiny()
    cfg = maml_cfg(
        inner_lr=0.3, train_steps=2, loss_reduction="sum_div_shots", first_order=first_order
    )
    tc = train_cfg(backend=Backend.loop if backend == "recompute" else Backend[backend])
    tc.inner_checkpoint = backend == "recompute"
    lrn = Maml(cfg, model, tc, "batch", CPU, shots=shots)
    lrn.optimizer.zero_grad(set_to_none=True)
    loss, _, _ = lrn.meta_gradient(batch, 0, None if backend == "recompute" else backend)
    params = model.params()
    ref_loss, ref = by_hand(model, params, batch, 2, 0.3, shots, not first_order)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("backend", ["loop", "vmap", "groups"])
def test_sum_div_shots_adapts_at_test_as_ways_times_the_rate(backend):
    """At test the support loss is ways x its mean: an inner rate lr under sum_div_shots
    adapts exactly as lr * ways under the mean (cbfinn/maml's 0.4 is 2.0 on the mean)."""
    batch = random_tasks(tasks=4, ways=3, shots=2, queries=3)
    model = tiny()
    tc = train_cfg(backend=Backend[backend])
    summed = Maml(maml_cfg(inner_lr=0.4, eval_steps=3, loss_reduction="sum_div_shots"),
                  model, tc, "batch", CPU, shots=2)  # fmt: skip
    mean = Maml(maml_cfg(inner_lr=0.4 * 3, eval_steps=3), model, tc, "batch", CPU)
    torch.testing.assert_close(summed.predict(batch), mean.predict(batch), rtol=1e-10, atol=1e-12)
    plain = Maml(maml_cfg(inner_lr=0.4, eval_steps=3), model, tc, "batch", CPU)
    assert not torch.allclose(summed.predict(batch), plain.predict(batch))


def test_rotated_test_tasks_give_the_same_logits_on_every_backend():
    images = class_images(n_classes=12, per_class=8, size=16)
    s = EpisodeSampler(images, 3, 2, 3, [0.0], [1.0])
    tasks = FixedTasks(s, 6, seed=5, rotate=True)
    model = Conv4(1, 3, 16, filters=4, downsample="stride").double()
    out = {}
    for backend in ("loop", "vmap", "groups"):
        lrn = Maml(maml_cfg(inner_lr=0.4, eval_steps=3, loss_reduction="sum_div_shots"),
                   model, train_cfg(backend=Backend[backend]), "batch", CPU, shots=2)  # fmt: skip
        out[backend] = torch.cat([lrn.predict(double(b)) for b in tasks.batches(4)])
    torch.testing.assert_close(out["vmap"], out["loop"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["groups"], out["loop"], rtol=1e-10, atol=1e-12)


def double(b):
    return type(b)(b.xs.double(), b.ys, b.xq.double(), b.yq)


def test_maml_presets_are_the_authors_protocol():
    for algo in ("maml", "fomaml"):
        for row in ("omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s", "omniglot_20w5s"):
            cfg = make_cfg(f"experiment={algo}_{row}")
            d = cfg.dataset
            assert cfg.eval.test_from.value == "last"  # main.py: test_iter -1
            # their summed loss on their network (docs/presets.md)
            assert cfg.algorithm.loss_reduction.value == "sum_div_shots"
            assert not cfg.algorithm.adapt_bn and not cfg.model.bn_scale
            assert cfg.model.bn_eps == 1e-3 and cfg.dataset.resample.value == "nearest"
            assert (cfg.model.conv_padding.value, cfg.model.head_input.value) == ("same", "mean")
            assert cfg.model.head_init.value == "normal"
            assert (d.rotations, d.augment_rotation, d.eval_rotation) == (False, True, True)
            assert d.queries == d.shots  # DataGenerator(update_batch_size * 2)
        for shots in (1, 5):
            cfg = make_cfg(f"experiment={algo}_miniimagenet_5w{shots}s")
            assert cfg.eval.test_from.value == "last"
            assert (cfg.dataset.queries, cfg.eval.queries) == (15, shots)
            assert list(cfg.dataset.mean) == [0.0] * 3 and list(cfg.dataset.std) == [1.0] * 3
            assert cfg.algorithm.loss_reduction.value == "sum_div_shots"
            assert not cfg.algorithm.adapt_bn and not cfg.model.bn_scale
            assert cfg.model.conv_padding.value == "symmetric"  # stride 1: 'SAME' is symmetric
    # the paper's text, one override away, and MAML++ keeps its own protocol
    paper = make_cfg("experiment=maml_omniglot_5w1s", "dataset.rotations=true",
                     "dataset.augment_rotation=false", "dataset.eval_rotation=false")  # fmt: skip
    assert paper.dataset.rotations and not paper.dataset.eval_rotation
    pp = make_cfg("experiment=mamlpp_omniglot_5w1s")
    assert not pp.dataset.eval_rotation and pp.algorithm.loss_reduction.value == "mean"
    abl = make_cfg("experiment=ablation_maml_plus_one")  # MAML on MAML++'s network and data
    assert not abl.dataset.eval_rotation and abl.algorithm.loss_reduction.value == "mean"
    assert abl.algorithm.adapt_bn and abl.model.bn_scale and abl.eval.test_from.value == "best"
