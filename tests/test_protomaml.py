"""Proto-MAML against Prototypical Networks at step 0, a by-hand float64 unrolled
reference, finite differences, and a short real Omniglot run."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.protomaml import ProtoMaml, ProtoMamlConfig
from metatrain.config import Backend
from metatrain.errors import MetatrainError
from metatrain.models.backbone import Backbone
from metatrain.train import train
from tests.conftest import TINY, make_cfg, random_tasks, train_cfg
from tests.test_protonet import learner as protonet
from tests.test_protonet import tiny_model

CPU = torch.device("cpu")
BACKENDS = ["loop", "vmap", "groups"]


def learner(model, backend="loop", **kw):
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(ProtoMamlConfig(**{"inner_lr": 0.1, "train_steps": 2, **kw}))
    return ProtoMaml(cfg, model, train_cfg(backend=Backend[backend]), "transductive", CPU)


def meta_grad(lrn, batch):
    lrn.optimizer.zero_grad(set_to_none=True)
    loss, _, _ = lrn.meta_gradient(batch, 0)
    return loss, {n: p.grad for n, p in lrn.model.params().items()}


def by_hand_loss(model, params, batch, steps, lr, second_order=True):
    """Triantafillou et al.'s Proto-MAML written out per task: the head set from the
    class means of the support features, then SGD on every parameter."""
    losses = []
    for t in range(len(batch)):
        xs, ys = batch.xs[t], batch.ys[t]
        hs = model.trunk(params, xs, 0, False)[0]
        c = torch.stack([hs[ys == k].mean(0) for k in range(int(ys.max()) + 1)])
        fast = {**params, "head.weight": 2 * c, "head.bias": -(c**2).sum(1)}
        for i in range(steps):
            # torch.func.grad: every weight, the head included, an independent variable
            def support_loss(f, xs=xs, ys=ys, i=i):
                return F.cross_entropy(model(f, xs, step=i)[0], ys)

            g = torch.func.grad(support_loss)(fast)
            g = g if second_order else {n: v.detach() for n, v in g.items()}
            fast = {n: fast[n] - lr * g[n] for n in fast}
        losses.append(F.cross_entropy(model(fast, batch.xq[t], step=steps - 1)[0], batch.yq[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_at_step_zero_the_head_is_the_prototypical_classifier(backend):
    """No inner step (inner_lr 0): logits differ from ProtoNet's by ||f(x)||^2 per query,
    so the softmax is the same."""
    model = tiny_model()
    batch = random_tasks(tasks=3, ways=3, shots=2, queries=3)
    ours = learner(model, backend, inner_lr=0.0, eval_steps=1).predict(batch)
    proto = protonet(model, backend).predict(batch)
    shift = ours - proto  # (tasks, queries, ways): the same in every column of a row
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(ours.softmax(-1), proto.softmax(-1), rtol=1e-10, atol=1e-12)
    hq = torch.stack([model.trunk(model.params(), x, 0, False)[0] for x in batch.xq])
    torch.testing.assert_close(shift[..., 0], (hq**2).sum(-1), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_the_unrolled_reference(backend, first_order):
    model = tiny_model()
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    loss, ours = meta_grad(learner(model, backend, first_order=first_order), batch)
    params = model.params()
    ref_loss = by_hand_loss(model, params, batch, 2, 0.1, second_order=not first_order)
    trunk = [n for n in params if not n.startswith("head.")]
    ref = torch.autograd.grad(ref_loss, [params[n] for n in trunk])
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    for n, r in zip(trunk, ref):
        torch.testing.assert_close(ours[n], r, rtol=1e-9, atol=1e-11, msg=n)
    # the meta-learned head is replaced in every task: it gets no gradient
    assert ours["head.weight"] is None and ours["head.bias"] is None
    if first_order:  # the prototypes' gradient still reaches the trunk
        assert ours["conv0.weight"].abs().sum() > 0


class Smooth(Backbone):
    """Two tanh convolutions and average pools: a meta-loss without the jumps that a
    ReLU's or a max-pool's kinks put into the inner gradient, so finite differences
    apply at any point."""

    def __init__(self, ways=3, filters=3):
        super().__init__()
        for i, c in enumerate((1, filters)):
            w = torch.empty(filters, c, 3, 3)
            torch.nn.init.xavier_uniform_(w)
            self.register_parameter(f"conv{i}.weight", torch.nn.Parameter(w))
        self.add_head(1, 16, ways)

    @classmethod
    def options(cls, cfg) -> dict:
        return {}

    def trunk(self, params, x, step: int, running: bool):
        for i in range(2):
            x = F.avg_pool2d(torch.tanh(F.conv2d(x, params[f"conv{i}.weight"], padding=1)), 2)
        return x.flatten(1), x.new_zeros(0)  # (N, features), no statistics


def test_finite_differences_of_the_meta_loss():
    """Second order, float64: the meta-gradient along random directions against central
    differences of the meta-loss that the learner itself reports."""
    torch.manual_seed(2)
    model = Smooth().double()
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2, seed=2)
    lrn = learner(model)
    _, grads = meta_grad(lrn, batch)
    grads = {n: g.clone() for n, g in grads.items() if g is not None}
    params = model.params()
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(3):
        d = {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in grads}
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, dn in d.items():
                    params[n].add_(sign * eps * dn)
            values.append(meta_grad(lrn, batch)[0].item())
            with torch.no_grad():
                for n, dn in d.items():
                    params[n].sub_(sign * eps * dn)
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = sum((grads[n] * d[n]).sum() for n in d).item()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def test_recomputed_inner_steps_are_refused():
    with pytest.raises(MetatrainError, match="train.inner_checkpoint cannot run"):
        ProtoMaml(
            ProtoMamlConfig(), tiny_model(), train_cfg(inner_checkpoint=True), "transductive", CPU
        )


def test_real_omniglot_run_learns(omniglot_data, tmp_path):
    cfg = make_cfg(*TINY, "algorithm=protomaml", "train.iterations=30", "eval.test_tasks=60")
    assert cfg.algorithm.name == "protomaml" and cfg.algorithm.train_steps == 1
    results = train(cfg, tmp_path)
    assert results["test"]["acc"] > 20 + 3 * results["test"]["ci95"], results["test"]
