"""The speed paths compute the same maths: fused conv block, hand-written
derivatives, layouts, backends, chunking and the optional bf16/compile switches.
Correctness only, on CPU; timings live in scripts/bench.py."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.inner import (
    VMAP_CPU_MAX_PIXELS,
    SpeedOptions,
    pick_backend,
    setup_device,
    task_pixels,
)
from metatrain.algorithms.maml import Maml
from metatrain.config import Backend
from metatrain.models.conv4 import Conv4
from metatrain.models.kernels import Conv3x3, conv_block, to_channels_last
from metatrain.models.norm import BatchStats, batch_norm
from tests.conftest import maml_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


def reference_block(x, w, b, gamma, beta, mean=None, var=None, stride=1, pool=True):
    """conv -> batch norm from mean/var ops -> ReLU -> max-pool, as written in the papers."""
    y, stats = batch_norm(F.conv2d(x, w, b, stride, 1), gamma, beta, mean, var)
    y = F.relu(y)
    return (F.max_pool2d(y, 2) if pool else y), stats


def block_inputs(seed=0, channels=5, negative=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = r(4, 3, 8, 8)
    w, b = r(channels, 3, 3, 3) * 0.5, r(channels) * 0.1
    gamma = r(channels).abs() + 0.5
    if negative:
        gamma[::2] *= -1  # the sign-flip path of conv_block
    beta = r(channels)
    return [t.requires_grad_() for t in (x, w, b, gamma, beta)]


@pytest.mark.parametrize(
    "pool,stride,running",
    [(True, 1, False), (True, 1, True), (False, 2, False), (False, 1, True)],
    ids=["pool", "pool-running", "stride", "stride1-running"],
)
def test_conv_block_matches_reference_to_second_order(pool, stride, running):
    inputs = block_inputs()
    mean = var = None
    if running:
        mean = torch.randn(5, dtype=torch.float64)
        var = torch.rand(5, dtype=torch.float64) + 0.5
    outs = []
    for block in (reference_block, conv_block):
        x, w, b, gamma, beta = inputs
        out, stats = block(
            x, w, b, gamma=gamma, beta=beta, mean=mean, var=var, stride=stride, pool=pool
        )
        probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        g1 = torch.autograd.grad((out * probe).sum() + (out**2).sum(), inputs, create_graph=True)
        g2 = torch.autograd.grad(sum((g**2).sum() for g in g1), inputs)
        outs.append([[out, stats], g1, g2])
    for ref, ours in zip(*outs):
        # Conv biases feed batch norm: their true gradient is 0 and both sides hold
        # rounding noise, so the tolerance scales with the largest gradient of its order.
        scale = max(t.abs().max().item() for t in ref)
        for a, b in zip(ref, ours):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-13 * scale)


def test_conv_block_flips_only_where_needed_and_agrees_either_way():
    """With every gamma >= 0 the loop skips the sign flip; the result is the same."""
    inputs = block_inputs(negative=False)
    x, w, b, gamma, beta = inputs
    out, _ = conv_block(x, w, b, gamma=gamma, beta=beta)
    ref, _ = reference_block(x, w, b, gamma, beta)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_batch_stats_derivatives_are_exact():
    y = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BatchStats.apply, (y,))
    assert torch.autograd.gradgradcheck(BatchStats.apply, (y,))
    mean, var = BatchStats.apply(y)
    torch.testing.assert_close(mean, y.mean((0, 2, 3)))
    torch.testing.assert_close(var, y.var((0, 2, 3), unbiased=False))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("padding", [(1, 1), (0, 1)])  # (0, ...): TF 'SAME' on even rows
def test_conv3x3_derivatives_are_exact(stride, input_grad, padding):
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=input_grad)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        return Conv3x3.apply(*args, stride, 1, padding)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_to_channels_last_keeps_values_and_makes_every_slice_nhwc():
    for shape in [(2, 3, 1, 6, 6), (2, 3, 3, 6, 6), (3, 1, 6, 6), (3, 3, 6, 6)]:
        x = torch.randn(*shape)
        y = to_channels_last(x)
        assert torch.equal(x, y)
        image = y if y.dim() == 4 else y[1]
        assert image.stride(1) == 1, shape  # channels innermost, even for one channel
    # One-channel input gives an NHWC network (oneDNN would otherwise pick NCHW).
    model = Conv4(1, 3, 16, filters=4)
    h = F.conv2d(to_channels_last(torch.randn(2, 1, 16, 16)), model.params()["conv0.weight"])
    assert h.is_contiguous(memory_format=torch.channels_last)


# -- learners ------------------------------------------------------------------------


def make(backend="loop", seed=0, negative=False, tc=None, **kw):
    torch.manual_seed(seed)
    model = Conv4(
        1,
        3,
        16,
        filters=4,
        bn_weight_steps=2 if kw.get("bnwb") else 0,
        bn_stat_steps=2 if kw.get("bnrs") else 1,
    ).double()
    if negative:  # some negative batch-norm gammas: the flipped path
        with torch.no_grad():
            for n, p in model.params().items():
                if n.startswith("bn") and n.endswith("weight"):
                    p[..., ::2] *= -1.5
    cfg = maml_cfg(**{"inner_lr": 0.3, "train_steps": 2, **kw})
    return Maml(cfg, model, tc or train_cfg(backend=Backend[backend]), "batch", CPU)


def meta_grad(lrn, batch, iteration=0):
    lrn.optimizer.zero_grad(set_to_none=True)
    stats = lrn.meta_gradient(batch, iteration)[2]
    return torch.cat([p.grad.flatten() for p in lrn.net.parameters()]), stats


SWITCHES = [{}, {"msl": True, "lslr": True, "bnwb": True, "bnrs": True}]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("switches", SWITCHES, ids=["maml", "mamlpp"])
def test_backends_agree_with_negative_gammas(first_order, switches):
    batch = random_tasks(tasks=3)
    grads = {}
    for backend in ("loop", "vmap", "groups"):
        lrn = make(backend, negative=True, first_order=first_order, **switches)
        grads[backend] = meta_grad(lrn, batch)
    for other in ("vmap", "groups"):
        torch.testing.assert_close(grads["loop"][0], grads[other][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(grads["loop"][1], grads[other][1], rtol=0, atol=1e-10)


def test_chunked_vmap_equals_unchunked():
    batch = random_tasks(tasks=5)
    whole = meta_grad(make("vmap", msl=True), batch)
    for chunk in (1, 2, 3):
        tc = train_cfg(backend=Backend.vmap, vmap_chunk=chunk)
        part = meta_grad(make(tc=tc, msl=True), batch)
        torch.testing.assert_close(part[0], whole[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(part[1], whole[1], rtol=0, atol=1e-12)


def test_channels_last_does_not_change_the_meta_gradient():
    batch = random_tasks(tasks=3)
    nhwc = meta_grad(make(tc=train_cfg(backend=Backend.loop, channels_last="true")), batch)
    nchw = meta_grad(make(tc=train_cfg(backend=Backend.loop, channels_last="false")), batch)
    torch.testing.assert_close(nhwc[0], nchw[0], rtol=0, atol=1e-12)


def test_predict_agrees_across_backends():
    batch = random_tasks(tasks=3)
    loop = make("loop", eval_steps=3).predict(batch)
    vmap = make("vmap", eval_steps=3).predict(batch)
    groups = make("groups", eval_steps=3).predict(batch)
    assert loop.shape == (3, 9, 3)
    torch.testing.assert_close(loop, vmap, rtol=0, atol=1e-10)
    torch.testing.assert_close(loop, groups, rtol=0, atol=1e-10)


def test_bf16_autocast_stays_close_to_float32():
    """bf16 keeps 8 mantissa bits: ~1% on a forward pass, and the inner steps of a
    meta-gradient amplify it, the reason it is off unless asked for."""
    batch = random_tasks(tasks=3)
    batch = type(batch)(batch.xs.float(), batch.ys, batch.xq.float(), batch.yq)

    def run(amp, first_order):
        torch.manual_seed(0)
        model = Conv4(1, 3, 16, filters=8)
        cfg = maml_cfg(inner_lr=0.3, train_steps=1, first_order=first_order)
        lrn = Maml(cfg, model, train_cfg(amp_bf16=amp), "batch", CPU)
        with lrn.speed.autocast():
            logits = model(model.params(), batch.xs[0])[0]
        g, stats = meta_grad(lrn, batch)
        assert g.dtype == torch.float32 and stats.dtype == torch.float32
        assert torch.isfinite(g).all()
        keep = torch.cat(
            [
                torch.full((p.numel(),), not n.endswith("bias") or n == "head.bias")
                for n, p in model.params().items()
            ]
        )  # conv biases: true gradient 0, both sides noise
        return logits.float(), g[keep], lrn.predict(batch)

    l32, g32, p32 = run(False, True)
    l16, g16, p16 = run(True, True)
    assert (l16 - l32).norm() < 0.03 * l32.norm()
    assert F.cosine_similarity(g32, g16, dim=0) > 0.8
    assert p16.dtype == torch.float32 and (p32.argmax(-1) == p16.argmax(-1)).float().mean() > 0.8
    run(True, False)  # second order runs under bf16 too


# -- backend choice and options ------------------------------------------------------------


def test_auto_backend_follows_its_documented_rule():
    cuda = torch.device("cuda")
    assert pick_backend("auto", cuda, True, 10**9) == "vmap"
    assert pick_backend("auto", CPU, True, VMAP_CPU_MAX_PIXELS) == "vmap"
    assert pick_backend("auto", CPU, False, VMAP_CPU_MAX_PIXELS + 1) == "loop"
    assert pick_backend("auto", CPU, False, None) == "loop"  # size unknown (Reptile)
    for explicit in ("loop", "vmap"):
        assert pick_backend(explicit, cuda, True, 1) == explicit
        assert pick_backend(explicit, CPU, True, 10**9) == explicit
    # The learner measures one task's support and query images: images x H x W.
    lrn = make("auto")
    small = random_tasks(tasks=2, ways=3, shots=2, queries=3, size=16)  # 15 x 256 = 3,840
    assert task_pixels(small.xs, small.xq) == 3840 and lrn.backend(True, small) == "vmap"
    # 6 support images are 1,536 pixels, but 45 queries take the task past the limit.
    many_queries = random_tasks(tasks=2, ways=3, shots=2, queries=15, size=16)  # 12,768
    assert lrn.backend(True, many_queries) == "loop"
    big = random_tasks(tasks=2, ways=3, shots=2, queries=1, size=40)  # 9 x 1,600 = 14,400
    assert lrn.backend(True, big) == "loop"


def test_speed_options_resolve_per_device():
    cpu = SpeedOptions.from_config(train_cfg(), CPU)
    assert cpu.channels_last and not cpu.amp_bf16 and not cpu.compile and not cpu.cuda_graphs
    off = SpeedOptions.from_config(train_cfg(channels_last="false"), CPU)
    assert not off.channels_last
    # CUDA graphs exist on CUDA only; there they imply compilation.
    assert not SpeedOptions.from_config(train_cfg(cuda_graphs=True), CPU).compile
    gpu = SpeedOptions.from_config(train_cfg(cuda_graphs=True), torch.device("cuda"))
    assert gpu.compile and gpu.cuda_graphs
    with pytest.raises(ValueError, match="channels_last"):
        SpeedOptions.from_config(train_cfg(channels_last="sometimes"), CPU)


def test_setup_device_on_cpu_leaves_results_unchanged():
    batch = random_tasks(tasks=2)
    before = meta_grad(make(), batch)[0]
    done = setup_device(CPU, train_cfg())
    assert set(done) == {"cpu_allocator"}
    torch.testing.assert_close(meta_grad(make(), batch)[0], before, rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_model_gives_the_same_first_order_gradient():
    pytest.importorskip("torch._inductor")
    batch = random_tasks(tasks=2)
    eager = meta_grad(make(first_order=True), batch)[0]
    tc = train_cfg(backend=Backend.loop, compile=True)
    compiled = meta_grad(make(tc=tc, first_order=True), batch)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-11)


# -- the benchmark's FLOP count ------------------------------------------------------------


def _bench_module():
    spec = importlib.util.spec_from_file_location("metatrain_bench", REPO / "scripts/bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("metatrain_bench", module)
    spec.loader.exec_module(module)
    return module


def test_flop_count_includes_the_double_backward():
    count_flops = _bench_module().count_flops
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    conv = 2 * 2 * 4 * 3 * 9 * 6 * 6  # one 3x3 convolution of x, padding 1

    def forward():
        Conv3x3.apply(x, w, None, 1, 1, (1, 1))

    def second_order():
        y = Conv3x3.apply(x, w, None, 1, 1, (1, 1))
        (g,) = torch.autograd.grad((y * y).sum(), w, create_graph=True)
        (g * g).sum().backward()

    assert count_flops(forward) == conv
    # forward, weight gradient, and in the double backward: d/dy (conv of x) and the
    # weight gradient of the (y * y) path again.
    assert count_flops(second_order) >= 3 * conv


def test_bench_merges_interleaved_rounds_into_the_median_round():
    bench = _bench_module()

    def row(s, mem, busy, times):
        return {
            "s_per_iter": s,
            "s_per_iter_min": min(times),
            "times": times,
            "tasks": 4,
            "peak_mem_mb": mem,
            "other_cores_busy": busy,
            "flops_per_iter": 10,
        }

    parts = [
        row(2.0, 100, 0.1, [2.0, 2.1]),
        row(1.0, 300, 0.0, [1.0, 0.9]),
        row(4.0, 50, 0.5, [4.0]),
    ]
    merged = bench.merge_rounds(parts + [{"error": "RuntimeError: x"}])
    assert merged["round_s"] == [2.0, 1.0, 4.0] and merged["s_per_iter"] == 2.0
    assert merged["tasks_per_s"] == 2.0 and merged["s_per_iter_min"] == 0.9
    assert merged["peak_mem_mb"] == 300 and merged["other_cores_busy"] == 0.5
    assert merged["times"] == [2.0, 2.1, 1.0, 0.9, 4.0] and merged["flops_per_iter"] == 10
    assert bench.merge_rounds([parts[0]]) == parts[0]
    assert bench.merge_rounds([{"error": "e"}]) == {"error": "e"}


def test_bench_reports_the_exception_line_of_a_failed_worker():
    bench = _bench_module()
    stderr = (
        "Traceback (most recent call last):\n  File 'x.py', line 3, in f\n"
        "AssertionError: grads must exist when\n  and param.grad is not None\n"
    )
    assert bench._error_line(stderr) == "AssertionError: grads must exist when"
    assert bench._error_line("killed\n") == "killed" and bench._error_line("") == "failed"
