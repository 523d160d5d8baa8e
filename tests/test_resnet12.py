"""ResNet-12: shapes, an independent torch.nn reference for the forward pass and the
exact second-order MAML meta-gradient (float64), DropBlock, and the config group."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatrain.algorithms.maml import Maml
from metatrain.models import build_model
from metatrain.models.resnet12 import ResNet12, drop_block
from tests.conftest import make_cfg, maml_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")


class Stage(nn.Module):
    """The residual stage built from torch.nn layers (native batch norm, batch stats)."""

    def __init__(self, cin, cout):
        super().__init__()

        def bn():
            return nn.BatchNorm2d(cout, track_running_stats=False, dtype=torch.float64)

        def conv(a, k):
            return nn.Conv2d(a, cout, k, padding=k // 2, bias=False, dtype=torch.float64)

        self.body = nn.Sequential(
            conv(cin, 3), bn(), nn.LeakyReLU(0.1), conv(cout, 3), bn(), nn.LeakyReLU(0.1),
            conv(cout, 3), bn(),
        )  # fmt: skip
        self.shortcut = nn.Sequential(conv(cin, 1), bn())

    def forward(self, x):
        return F.max_pool2d(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1), 2)


def reference(model: ResNet12, cin: int) -> nn.Module:
    """The same network as nn layers, with our parameters copied in."""
    stages, c = [], cin
    for w in model.widths:
        stages.append(Stage(c, w))
        c = w
    net = nn.Sequential(*stages, nn.Flatten(), nn.Linear(1, 1, dtype=torch.float64))
    p = model.params()
    with torch.no_grad():
        for s, st in enumerate(stages):
            convs = [st.body[0], st.body[3], st.body[6], st.shortcut[0]]
            bns = [st.body[1], st.body[4], st.body[7], st.shortcut[1]]
            names = ["conv0", "conv1", "conv2", "shortcut"]
            for name, conv, bn in zip(names, convs, bns):
                conv.weight.copy_(p[f"stage{s}.{name}.weight"])
                bn.weight.copy_(p[f"stage{s}.{name}.bn.weight"])
                bn.bias.copy_(p[f"stage{s}.{name}.bn.bias"])
        net[-1].weight = nn.Parameter(p["head.weight"].detach().clone())
        net[-1].bias = nn.Parameter(p["head.bias"].detach().clone())
    return net


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = ResNet12(1, 3, 16, width=0.05, **kw).double()  # widths 3-8-16-32
    with torch.no_grad():  # batch-norm affine parameters away from 1 and 0
        for n in model.norm_names:
            model.params()[n].add_(0.2 * torch.randn_like(model.params()[n]))
    return model


def test_widths_and_parameter_shapes():
    model = ResNet12(3, 5, 84)
    assert model.widths == [64, 160, 320, 640]
    p = model.params()
    assert p["stage1.conv0.weight"].shape == (160, 64, 3, 3)
    assert p["stage3.shortcut.weight"].shape == (640, 320, 1, 1)
    assert p["head.weight"].shape == (5, 640 * 5 * 5)  # 84 -> 42 -> 21 -> 10 -> 5
    assert ResNet12(3, 5, 84, width=0.5).widths == [32, 80, 160, 320]
    assert not model.stochastic  # DropBlock off by default


def test_forward_equals_the_torch_nn_reference():
    model = tiny()
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    ours = model(model.params(), x)[0]
    torch.testing.assert_close(ours, reference(model, 1)(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_second_order_meta_gradient_equals_the_reference(backend):
    model = tiny()
    batch = random_tasks(tasks=2)
    cfg = maml_cfg(inner_lr=0.3, train_steps=2)
    lrn = Maml(cfg, model, train_cfg(backend=backend), "batch", CPU)
    lrn.optimizer.zero_grad(set_to_none=True)
    lrn.meta_gradient(batch, 0)

    ref = reference(model, 1)
    names = list(dict(ref.named_parameters()))
    theta = dict(ref.named_parameters())
    losses = []
    for t in range(len(batch)):
        fast = dict(theta)
        for _ in range(2):
            out = torch.func.functional_call(ref, fast, (batch.xs[t],))
            g = torch.autograd.grad(F.cross_entropy(out, batch.ys[t]), list(fast.values()),
                                    create_graph=True)  # fmt: skip
            fast = {n: p - 0.3 * gi for (n, p), gi in zip(fast.items(), g)}
        out = torch.func.functional_call(ref, fast, (batch.xq[t],))
        losses.append(F.cross_entropy(out, batch.yq[t]))
    expected = dict(
        zip(names, torch.autograd.grad(torch.stack(losses).mean(), list(theta.values())))
    )
    ours = model.params()
    for s in range(4):
        for j, name in enumerate(["conv0", "conv1", "conv2"]):
            i = 3 * j
            pairs = [(f"stage{s}.{name}.weight", f"{s}.body.{i}.weight"),
                     (f"stage{s}.{name}.bn.weight", f"{s}.body.{i + 1}.weight"),
                     (f"stage{s}.{name}.bn.bias", f"{s}.body.{i + 1}.bias")]  # fmt: skip
            for a, b in pairs:
                torch.testing.assert_close(ours[a].grad, expected[b], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            ours[f"stage{s}.shortcut.weight"].grad, expected[f"{s}.shortcut.0.weight"],
            rtol=1e-9, atol=1e-12,
        )  # fmt: skip
    torch.testing.assert_close(
        ours["head.weight"].grad, expected["5.weight"], rtol=1e-9, atol=1e-12
    )


def test_dropblock_drops_about_p_and_only_in_training():
    torch.manual_seed(0)
    x = torch.ones(64, 8, 10, 10, dtype=torch.float64)
    y = drop_block(x, 0.1, 3)
    dropped = (y == 0).double().mean().item()
    assert 0.06 < dropped < 0.14  # overlapping blocks make it a little under p
    assert y.mean().item() == pytest.approx(1.0, abs=1e-12)  # rescaled to keep the mean
    model = tiny(dropblock=0.1, dropblock_size=2)
    assert model.stochastic
    model.eval()
    assert not model.stochastic
    x = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(model(model.params(), x)[0], model(model.params(), x)[0])


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_dropblock_is_off_in_predict_and_on_in_meta_training(backend):
    from metatrain.algorithms.reptile import Reptile
    from metatrain.config import Backend
    from tests.conftest import reptile_cfg

    batch = random_tasks(tasks=2, shots=2, queries=3, size=16)
    tc = train_cfg(backend=Backend(backend))
    maml = Maml(
        maml_cfg(inner_lr=0.1, train_steps=1, eval_steps=2), tiny(dropblock=0.5), tc, "batch", CPU
    )
    reptile = Reptile(
        reptile_cfg(eval_iters=2, eval_batch=4), tiny(dropblock=0.5), tc, "batch", CPU
    )
    for lrn in (maml, reptile):
        first = lrn.predict(batch)
        torch.testing.assert_close(lrn.predict(batch), first, rtol=0, atol=0)
        assert lrn.net.training  # predict gives the training mode back
    # ... and the same logits as a network without DropBlock: nothing was dropped
    plain = Maml(maml_cfg(inner_lr=0.1, train_steps=1, eval_steps=2), tiny(), tc, "batch", CPU)
    torch.testing.assert_close(maml.predict(batch), plain.predict(batch), rtol=0, atol=0)

    # Meta-training still drops: two meta-gradients from one state and batch differ.
    def meta_grad():
        maml.optimizer.zero_grad(set_to_none=True)
        maml.meta_gradient(batch, 0, backend=backend)
        return torch.cat([p.grad.flatten() for p in maml.model.parameters()])

    assert not torch.equal(meta_grad(), meta_grad())


def test_config_group_builds_it_with_per_step_batch_norm():
    cfg = make_cfg(
        "model=resnet12",
        "model.width=0.05",
        "algorithm=mamlpp",
        "algorithm.bnrs=true",
        "logger=none",
    )
    model = build_model(cfg, CPU)
    assert isinstance(model, ResNet12)
    steps = cfg.algorithm.train_steps
    assert model.params()["stage0.conv0.bn.weight"].shape == (steps, 3)
    assert model.buffer("stage0.conv0.bn.running_mean").shape == (steps, 3)
    stats = model(model.params(), torch.zeros(2, 1, 28, 28), step=1)[1]
    model.update_running_stats(torch.stack([stats] * steps))  # (steps, 2, sum of C)
