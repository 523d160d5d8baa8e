"""MAML's own Omniglot network (cbfinn/maml): TF 'SAME' stride-2 convolutions, a
shift-only batch norm (eps 1e-3) that is meta-learned but not adapted, and a head on
the spatial mean of the last feature map, against a network written out here."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.maml import Maml
from metatrain.config import Backend
from metatrain.models.conv4 import Conv4
from tests.conftest import maml_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")
OPTIONS = {
    "downsample": "stride",
    "conv_padding": "same",
    "bn_scale": False,
    "head_input": "mean",
    "bn_eps": 1e-3,
}


def net(ways=3, size=16, **kw):
    torch.manual_seed(0)
    return Conv4(1, ways, size, **{"filters": 4, **OPTIONS, **kw}).double()


def tf_same_stride2(x, w, b):
    """TF's conv2d(stride 2, 'SAME') for a 3x3 kernel, from the stride-1 convolution:
    output i reads rows 2i..2i+2 of x zero-extended at the end on even sizes (TF pads
    bottom/right), rows 2i-1..2i+1 on odd ones (one zero each side): the stride-1
    symmetric output at row 2i+1, resp. 2i."""
    full = F.conv2d(x, w, b, 1, 1)  # (N, C, H, W)
    r0, c0 = int(x.shape[-2] % 2 == 0), int(x.shape[-1] % 2 == 0)
    return full[:, :, r0::2, c0::2]


def written_out(params, x, eps=1e-3):
    """Four blocks of TF-SAME stride-2 conv, shift-only batch norm of the batch's
    statistics, ReLU; the head on the channel means."""
    for i in range(4):
        y = tf_same_stride2(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"])
        y = F.batch_norm(y, None, None, None, params[f"bn{i}.bias"], True, 0.0, eps)
        x = y.relu()
    return F.linear(x.mean((2, 3)), params["head.weight"], params["head.bias"])


@pytest.mark.parametrize("size", [28, 16, 15])
def test_forward_equals_the_network_written_out(size):
    model = net(size=size)
    assert "bn0.weight" not in model.params()  # no learned scale
    x = torch.randn(6, 1, size, size, dtype=torch.float64)
    got = model(model.params(), x)[0]
    torch.testing.assert_close(got, written_out(model.params(), x), rtol=1e-10, atol=1e-12)
    # and the symmetric padding differs (the windows start one pixel earlier)
    sym = net(size=size, conv_padding="symmetric")
    sym.load_state_dict(model.state_dict())
    if size % 2 == 0:
        assert (sym(sym.params(), x)[0] - got).abs().max() > 1e-6


def test_head_on_the_channel_means_and_its_normal_init():
    model = net(ways=5, head_init="normal", filters=64)
    w = model.params()["head.weight"]
    assert w.shape == (5, 64)  # the channels, whatever the image size
    assert abs(w.std().item() - 1) < 0.15 and abs(w.mean().item()) < 0.15


def maml_by_hand(model, params, batch, lr, steps, adapted):
    """Second-order MAML's mean query loss over tasks, the inner SGD adapting only
    `adapted`, on the network written out."""
    total = 0
    for t in range(len(batch)):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(written_out(fast, batch.xs[t]), batch.ys[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
            fast.update({n: fast[n] - lr * g for n, g in zip(adapted, grads)})
        total = total + F.cross_entropy(written_out(fast, batch.xq[t]), batch.yq[t])
    return total / len(batch)


@pytest.mark.parametrize("backend", ["loop", "vmap", "groups"])
def test_meta_gradient_with_batch_norm_meta_learned_only(backend):
    model = net()
    cfg = maml_cfg(inner_lr=0.2, train_steps=2, adapt_bn=False)
    lrn = Maml(cfg, model, train_cfg(backend=Backend[backend]), "transductive", CPU)
    assert not any(n.startswith("bn") for n in lrn.adapted)
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.params().items()}
    adapted = [n for n in params if not n.startswith("bn")]
    want = torch.autograd.grad(
        maml_by_hand(model, params, batch, 0.2, 2, adapted), list(params.values())
    )
    lrn.optimizer.zero_grad()
    lrn.meta_gradient(batch, 0, backend)
    for (n, p), g in zip(model.params().items(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-11, msg=n)
    assert model.params()["bn0.bias"].grad.abs().max() > 0  # meta-learned all the same
