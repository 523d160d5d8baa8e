"""ANIL and Meta-SGD meta-gradients against by-hand float64 references."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from metatrain.algorithms.maml import Maml
from metatrain.errors import MetatrainError
from tests.conftest import make_cfg, maml_cfg, random_tasks, train_cfg
from tests.test_maml import meta_grad, tiny_model

CPU = torch.device("cpu")
HEAD = ("head.weight", "head.bias")


def learner(model, backend="loop", **kw):
    cfg = maml_cfg(**{"inner_lr": 0.3, "train_steps": 2, **kw})
    return Maml(cfg, model, train_cfg(backend=backend), "batch", CPU)


def unrolled_loss(model, params, rates, batch, steps, adapted):
    """MAML's meta-loss written out with autograd: `adapted` parameters take SGD steps
    with per-element rates (a float, or a dict of tensors), the rest stay fixed."""
    losses = []
    for t in range(len(batch)):
        fast = dict(params)
        for i in range(steps):
            loss = F.cross_entropy(model(fast, batch.xs[t], step=i)[0], batch.ys[t])
            g = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
            for n, gn in zip(adapted, g):
                lr = rates if isinstance(rates, float) else rates[n]
                fast[n] = fast[n] - lr * gn
        losses.append(F.cross_entropy(model(fast, batch.xq[t], step=steps - 1)[0], batch.yq[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_anil_adapts_only_the_head_and_matches_the_unrolled_reference(backend):
    model = tiny_model()
    batch = random_tasks()
    lrn = learner(model, backend, anil=True)
    assert lrn.adapted == list(HEAD)
    ours = meta_grad(lrn, batch)
    params = model.params()
    ref = torch.autograd.grad(
        unrolled_loss(model, params, 0.3, batch, 2, list(HEAD)), list(params.values())
    )
    for (n, g), r in zip(ours.items(), ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=n)
    assert ours["conv0.weight"].abs().sum() > 0  # the trunk learns through the query loss


def test_anil_one_step_head_gradient_by_hand():
    """One step, one task, head theta = (W, b) on fixed trunk features:
    d/dtheta L_q(theta - a grad L_s(theta)) = (I - a H_s) grad L_q(theta'), with H_s
    the Hessian of the support loss in theta."""
    model = tiny_model()
    batch = random_tasks(tasks=1)
    ours = meta_grad(learner(model, anil=True, train_steps=1), batch)
    p = {n: t.detach() for n, t in model.params().items()}
    hs = model.trunk(p, batch.xs[0], 0, False)[0]
    hq = model.trunk(p, batch.xq[0], 0, False)[0]
    shape_w = p["head.weight"].shape
    k = p["head.weight"].numel()

    def loss(theta, h, y):
        return F.cross_entropy(F.linear(h, theta[:k].view(shape_w), theta[k:]), y)

    theta = torch.cat([p["head.weight"].flatten(), p["head.bias"]])
    x = theta.clone().requires_grad_()
    gs = torch.autograd.grad(loss(x, hs, batch.ys[0]), x)[0]
    hess = torch.autograd.functional.hessian(lambda t: loss(t, hs, batch.ys[0]), theta)
    y = (theta - 0.3 * gs).requires_grad_()
    gq = torch.autograd.grad(loss(y, hq, batch.yq[0]), y)[0]
    expected = gq - 0.3 * hess @ gq
    got = torch.cat([ours["head.weight"].flatten(), ours["head.bias"]])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_metasgd_matches_the_unrolled_reference(backend):
    model = tiny_model()
    batch = random_tasks()
    lrn = learner(model, backend, metasgd=True)
    rates = lrn.net["rates"]
    for n, p in model.params().items():  # one rate per element, starting at inner_lr
        assert rates.tensors()[n].shape == p.shape
        assert torch.all(rates.tensors()[n] == 0.3)
    with torch.no_grad():  # distinct rates, so that a mix-up of elements would show
        for r in rates.tensors().values():
            r.uniform_(0.1, 0.5)
    lrn.optimizer.zero_grad(set_to_none=True)
    lrn.meta_gradient(batch, 0)
    params, alphas = model.params(), rates.tensors()
    names = list(params)
    ref = torch.autograd.grad(
        unrolled_loss(model, params, alphas, batch, 2, names),
        [*params.values(), *(alphas[n] for n in names)],
    )
    for n, r in zip(names, ref[: len(names)]):
        torch.testing.assert_close(params[n].grad, r, rtol=1e-10, atol=1e-12, msg=n)
    for n, r in zip(names, ref[len(names) :]):
        torch.testing.assert_close(alphas[n].grad, r, rtol=1e-10, atol=1e-12, msg=f"rate {n}")


def test_metasgd_one_step_rate_gradient_by_hand():
    """One step: theta' = theta - alpha * g_s, so dL_q/dalpha = -g_q(theta') * g_s."""
    model = tiny_model()
    batch = random_tasks(tasks=1)
    lrn = learner(model, metasgd=True, train_steps=1)
    lrn.optimizer.zero_grad(set_to_none=True)
    lrn.meta_gradient(batch, 0)
    p = {n: t.detach().requires_grad_() for n, t in model.params().items()}
    gs = torch.autograd.grad(
        F.cross_entropy(model(p, batch.xs[0])[0], batch.ys[0]), list(p.values())
    )
    q = {n: (t - 0.3 * g).detach().requires_grad_() for (n, t), g in zip(p.items(), gs)}
    gq = torch.autograd.grad(
        F.cross_entropy(model(q, batch.xq[0])[0], batch.yq[0]), list(q.values())
    )
    rates = lrn.net["rates"].tensors()
    for n, a, b in zip(p, gq, gs):
        torch.testing.assert_close(rates[n].grad, -a * b, rtol=1e-9, atol=1e-13, msg=n)


def test_lslr_and_metasgd_together_are_refused():
    with pytest.raises(MetatrainError, match="lslr and algorithm.metasgd"):
        learner(tiny_model(), lslr=True, metasgd=True)


@pytest.mark.parametrize("name", ["anil", "metasgd"])
def test_presets_compose_and_switch_on(name):
    cfg = make_cfg(f"algorithm={name}", "logger=none")
    assert cfg.algorithm.name == "maml" and cfg.algorithm[name] is True


@pytest.mark.parametrize(
    ("preset", "label", "paper"),
    [
        # ANIL's published rows were dropped from summarize: no checked source
        ("anil_omniglot_20w1s", "anil", None),
        ("metasgd_miniimagenet_5w1s", "metasgd", "50.47 ± 1.87"),
    ],
)
def test_presets_are_named_as_their_method_beside_the_paper(preset, label, paper):
    from metatrain.naming import algorithm_label
    from tests.test_summarize import summarize

    cfg = make_cfg(f"experiment={preset}", "logger=none")
    assert algorithm_label(cfg) == label
    task = summarize.task_name(OmegaConf.to_container(cfg, resolve=True))
    assert summarize.published(label, "batch", task) == paper
