"""model.activation, model.bn_eps and model.pool_padding: Conv4 against the same network
written out by hand (F.conv2d, F.batch_norm, F.leaky_relu, F.max_pool2d on a -inf-padded
edge for TF's 'same'), in float64: its outputs and gradients, second-order MAML
meta-gradients on every backend (per-task loop, vmap, channel groups, recomputed inner
steps) and evaluation's predictions on every backend."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.maml import Maml
from metatrain.config import Backend
from metatrain.errors import MetatrainError
from metatrain.models import task_groups
from metatrain.models.conv4 import Conv4
from tests.conftest import make_cfg, maml_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")
SIZE = 21  # odd: 21-11-6-3-2 pooled 'same', 21-10-5-2-1 'valid'
# (ReLU or leaky slope, batch-norm eps, pool padding, downsample)
VARIANTS = [
    (0.0, 1e-5, "valid", "pool"),  # the default network
    (0.01, 1e-5, "valid", "pool"),  # MAML++'s
    (0.0, 1e-3, "same", "pool"),  # Reptile's MiniImageNet net
    (0.2, 1e-3, "same", "pool"),
    (0.01, 1e-3, "valid", "stride"),
]
IDS = ["relu", "leaky", "tf-same-eps", "leaky-same-eps", "leaky-stride-eps"]


def tf_same_pool(h):
    """TF's max_pooling2d(2, 2, padding='same'): an odd edge padded after, with -inf."""
    return F.max_pool2d(F.pad(h, (0, h.shape[-1] % 2, 0, h.shape[-2] % 2), value=-torch.inf), 2)


def by_hand(params, x, slope, eps, padding, downsample, running=None):
    """The network, one plain op at a time; `running`: [(mean, var)] per block."""
    h = x
    for i in range(4):
        stride = 2 if downsample == "stride" else 1
        h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride, 1)
        w, b = params[f"bn{i}.weight"], params[f"bn{i}.bias"]
        if running is None:
            h = F.batch_norm(h, None, None, w, b, training=True, eps=eps)
        else:
            h = F.batch_norm(h, *running[i], w, b, training=False, eps=eps)
        h = F.relu(h) if slope == 0 else F.leaky_relu(h, slope)
        if downsample == "pool":
            h = tf_same_pool(h) if padding == "same" else F.max_pool2d(h, 2)
    return F.linear(h.flatten(1), params["head.weight"], params["head.bias"])


def network(slope, eps, padding, downsample, seed=0):
    """A float64 Conv4 with some negative gammas (the fused block flips those channels)
    and non-trivial running statistics."""
    torch.manual_seed(seed)
    model = Conv4(
        2, 3, SIZE, 4, downsample=downsample, leaky_slope=slope, pool_padding=padding, bn_eps=eps
    ).double()
    with torch.no_grad():
        for i in range(4):
            model.params()[f"bn{i}.weight"].normal_()
            model.params()[f"bn{i}.bias"].normal_(0, 0.5)
            model.running_stats(i)[0].normal_()
            model.running_stats(i)[1].uniform_(0.1, 2)
    return model


def running_of(model):
    return [tuple(t[0] for t in model.running_stats(i)) for i in range(4)]


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=what)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("running", [False, True], ids=["batch-stats", "running-stats"])
def test_outputs_and_gradients_equal_the_hand_written_network(variant, running):
    model = network(*variant)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.params().items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, SIZE, SIZE, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    ours, _ = model(params, x, running=running)
    ref = by_hand(params, x, *variant, running_of(model) if running else None)
    close(ours, ref, "logits")
    g_ours = torch.autograd.grad(F.cross_entropy(ours, y), list(params.values()))
    g_ref = torch.autograd.grad(F.cross_entropy(ref, y), list(params.values()))
    for n, a, b in zip(params, g_ours, g_ref):
        # conv biases feed batch norm: their true gradient is 0 under batch statistics
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=n)


def test_pool_padding_same_gives_the_tf_feature_map_sizes():
    # Reptile's MiniImageNet net: 84-42-21-11-6, 32 * 6 * 6 = 1,152 features; floor: 5x5, 800.
    same = Conv4(3, 5, 84, 32, pool_padding="same")
    valid = Conv4(3, 5, 84, 32)
    assert same.params()["head.weight"].shape == (5, 1152)
    assert valid.params()["head.weight"].shape == (5, 800)


def test_a_negative_slope_is_refused():
    with pytest.raises(MetatrainError, match="activation_slope"):
        Conv4(1, 5, 28, 4, leaky_slope=-0.1)


def hand_maml(params, batch, variant, steps, lr, second_order):
    """Mean over tasks of the final query loss after `steps` SGD steps on the support
    set, every parameter adapted, through the hand-written network."""
    total = 0
    for t in range(len(batch)):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(by_hand(fast, batch.xs[t], *variant), batch.ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {n: p - lr * gr for (n, p), gr in zip(fast.items(), grads)}
        total = total + F.cross_entropy(by_hand(fast, batch.xq[t], *variant), batch.yq[t])
    return total / len(batch), fast


def learner(variant, bn_eval="batch", **train):
    model = network(*variant)
    cfg = maml_cfg(inner_lr=0.3, train_steps=2, eval_steps=2)
    return Maml(cfg, model, train_cfg(**train), bn_eval, CPU)


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=IDS[1:])
@pytest.mark.parametrize(
    "backend,recompute",
    [("loop", False), ("vmap", False), ("groups", False), ("loop", True), ("vmap", True)],
    ids=["loop", "vmap", "groups", "loop-recomputed", "vmap-recomputed"],
)
def test_second_order_meta_gradient_equals_the_hand_written_maml(variant, backend, recompute):
    lrn = learner(variant, inner_checkpoint=recompute, channels_last="false")
    batch = random_tasks(tasks=2, size=SIZE, channels=2, seed=4)
    params = {n: p.detach().clone().requires_grad_() for n, p in lrn.model.params().items()}
    loss, _ = hand_maml(params, batch, variant, 2, 0.3, second_order=True)
    ref = torch.autograd.grad(loss, list(params.values()))
    lrn.optimizer.zero_grad(set_to_none=True)
    if backend == "groups":
        assert task_groups.supports(lrn.model)
    ours_loss, _, _ = lrn.meta_gradient(batch, 0, backend=backend)
    close(ours_loss, loss.detach(), "meta-loss")
    for (n, p), r in zip(lrn.model.params().items(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=IDS[1:])
@pytest.mark.parametrize("bn_eval", ["batch", "running"])
@pytest.mark.parametrize("backend", ["loop", "vmap", "groups"])
def test_evaluation_predictions_equal_the_hand_written_adaptation(variant, bn_eval, backend):
    lrn = learner(variant, bn_eval, backend=Backend(backend))
    batch = random_tasks(tasks=3, size=SIZE, channels=2, seed=5)
    assert lrn.backend_for(batch, 0, evaluation=True) == backend
    running = running_of(lrn.model) if bn_eval == "running" else None
    expected = []
    for t in range(len(batch)):
        fast = {n: p.detach() for n, p in lrn.model.params().items()}
        for _ in range(2):
            fast = {n: p.requires_grad_() for n, p in fast.items()}
            out = by_hand(fast, batch.xs[t], *variant, running)
            grads = torch.autograd.grad(F.cross_entropy(out, batch.ys[t]), list(fast.values()))
            fast = {n: (p - 0.3 * gr).detach() for (n, p), gr in zip(fast.items(), grads)}
        expected.append(by_hand(fast, batch.xq[t], *variant, running))
    close(lrn.predict(batch), torch.stack(expected), "logits")


def test_presets_build_the_authors_networks():
    from metatrain.train import build_model

    mamlpp = build_model(make_cfg("experiment=mamlpp_miniimagenet_5w1s"), CPU)
    assert (mamlpp.leaky_slope, mamlpp.bn_eps, mamlpp.pool_ceil) == (0.01, 1e-5, False)
    reptile = build_model(make_cfg("experiment=reptile_miniimagenet_5w1s"), CPU)
    assert (reptile.leaky_slope, reptile.bn_eps, reptile.pool_ceil) == (0.0, 1e-3, True)
    assert reptile.params()["head.weight"].shape == (5, 1152)
    omniglot = build_model(make_cfg("experiment=reptile_omniglot_5w1s"), CPU)
    assert (omniglot.bn_eps, omniglot.downsample) == (1e-3, "stride")
    assert omniglot.conv_same and not omniglot.head_mean  # TF 'same' stride-2 convs
    # the default run is MAML's TF network: ReLU, TF batch norm's eps, TF 'SAME' convs
    maml = build_model(make_cfg(), CPU)
    assert (maml.leaky_slope, maml.bn_eps, maml.conv_same, maml.head_mean) == (
        0.0,
        1e-3,
        True,
        True,
    )
    assert "bn0.weight" not in maml.params()  # shift-only batch norm
    # conv4's own defaults: ReLU, PyTorch's eps, floor pooling, symmetric padding
    plain = build_model(make_cfg("algorithm=mamlpp", "model.activation=relu"), CPU)
    assert (plain.leaky_slope, plain.bn_eps, plain.pool_ceil) == (0.0, 1e-5, False)
    assert not plain.conv_same and not plain.head_mean
