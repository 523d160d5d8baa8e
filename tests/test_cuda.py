"""The GPU path against the CPU: meta-gradients and Reptile updates computed on CUDA
equal the CPU's, and a short real training run completes there.

Marked `cuda` and skipped where no CUDA device is visible; scripts/gpu_check.sh runs
them on a lent GPU (`pytest -m cuda`). METATRAIN_TEST_DEVICE=cpu runs the same
comparisons against a second CPU computation, which checks the tests themselves on a
machine without a GPU (tolerances then hold trivially).

Tolerances, as the norm of the difference over the norm of the float64 CPU result:
- float64: 1e-10 elementwise, as the CPU loop-vs-vmap tests; only the order of the
  summations differs between cuDNN/cuBLAS and the CPU kernels.
- float32 (TF32 off): 1e-4. The float32 CPU result of these very computations lands
  1.3e-6 to 5.8e-6 from the float64 one (about 100 times float32's unit roundoff,
  6e-8: the inner step at lr 0.4 and batch norm over five images amplify rounding);
  a GPU's other summation order is rounding of the same size. A test keeps that
  premise true on the CPU (FLOAT32_CPU_ERROR).
- TF32 (the default on CUDA, train.tf32): three times what TF32 rounding does to the
  same computation on the CPU, emulated by rounding the inputs of every convolution
  and matmul to TF32's 10 mantissa bits (tf32_emulation, float32 accumulation, as the
  tensor cores). The amplification is large on these noise tasks at initialisation:
  the emulation moves the meta-gradient by about 50% at the inner rate 0.4 and by
  5-14% at 0.01 (Reptile with SGD inside: 9%), so the TF32 tests take 0.01 and are a
  coarse check (NaNs, a wrong kernel, maths that differs on the device); the float64
  and float32 tests are the fine ones. That TF32 moves meta-gradients this much is
  itself a finding for train.tf32's default, which the GPU check's bench (speed mode
  fp32) and training run are there to weigh.
"""

import contextlib
import os

import pytest
import torch

from metatrain.algorithms.maml import Maml
from metatrain.algorithms.reptile import Reptile
from metatrain.config import Backend
from metatrain.models.conv4 import Conv4
from metatrain.task_batch import TaskBatch
from tests.conftest import TINY, maml_cfg, random_tasks, reptile_cfg, run_cli, train_cfg

DEVICE = torch.device(os.environ.get("METATRAIN_TEST_DEVICE", "cuda"))
CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
    ),
]

# Omniglot-shaped, small enough for float64 second order on the CPU in a second.
WAYS, SHOTS, QUERIES, SIZE, FILTERS, TASKS = 5, 1, 2, 28, 16, 4
FLOAT32_TOL = 1e-4
FLOAT32_CPU_ERROR = 2e-5  # the premise of FLOAT32_TOL (measured at most 5.8e-6)
TF32_MARGIN = 3.0  # times the emulated TF32 error
TF32_LR = 0.01

MAML = {}
MAMLPP = {"msl": True, "lslr": True, "bnwb": True, "bnrs": True}
ALGOS = {"maml": MAML, "mamlpp": MAMLPP}


_TF32_OPS = (
    torch.ops.aten.convolution.default,
    torch.ops.aten.convolution_backward.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
)


def round_tf32(x):
    """float32 rounded to nearest at TF32's 10 mantissa bits (13 low bits cleared)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).reshape(x.shape)


def tf32_emulation():
    """A dispatch mode in which every convolution and matmul (forward and backward)
    sees TF32-rounded float32 inputs: TF32 on a CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    class TF32Emulation(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in _TF32_OPS:
                args = tree_map(round_tf32, args)
            return func(*args, **(kwargs or {}))

    return TF32Emulation()


@contextlib.contextmanager
def tf32(on: bool):
    """TF32 matmuls and convolutions on or off (cuDNN's default is on), restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tasks(dtype, device, seed=0) -> TaskBatch:
    b = random_tasks(TASKS, WAYS, SHOTS, QUERIES, SIZE, seed=seed)
    return TaskBatch(
        *(
            t.to(device, dtype) if t.is_floating_point() else t.to(device)
            for t in (b.xs, b.ys, b.xq, b.yq)
        )
    )


def maml_grad(device, dtype, backend, switches, first_order=False, lr=0.4) -> torch.Tensor:
    """The meta-gradient of one task batch, flattened, on the CPU (float64)."""
    torch.manual_seed(0)
    model = Conv4(
        1,
        WAYS,
        SIZE,
        filters=FILTERS,
        downsample="stride",
        bn_weight_steps=2 if switches.get("bnwb") else 0,
        bn_stat_steps=2 if switches.get("bnrs") else 1,
    ).to(device, dtype)
    cfg = maml_cfg(inner_lr=lr, train_steps=2, first_order=first_order, **switches)
    lrn = Maml(cfg, model, train_cfg(backend=Backend[backend]), "batch", device)
    lrn.optimizer.zero_grad(set_to_none=True)
    lrn.meta_gradient(tasks(dtype, device), 0)
    return torch.cat([p.grad.flatten() for p in lrn.net.parameters()]).to(CPU, torch.float64)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - ref).norm() / ref.norm()).item()


_REF = {}


def reference(name: str, first_order=False, lr=0.4) -> torch.Tensor:
    key = (name, first_order, lr)
    if key not in _REF:
        _REF[key] = maml_grad(CPU, torch.float64, "loop", ALGOS[name], first_order, lr)
    return _REF[key]


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_float64_meta_gradient_equals_the_cpu(name, backend, first_order):
    ours = maml_grad(DEVICE, torch.float64, backend, ALGOS[name], first_order)
    ref = reference(name, first_order)
    assert ref.norm() > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_float32_meta_gradient_is_within_rounding(name, backend):
    with tf32(False):
        ours = maml_grad(DEVICE, torch.float32, backend, ALGOS[name])
    assert rel(ours, reference(name)) < FLOAT32_TOL


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_tf32_meta_gradient_is_within_its_rounding(name, backend):
    ref = reference(name, lr=TF32_LR)
    with tf32_emulation():
        emulated = rel(maml_grad(CPU, torch.float32, "loop", ALGOS[name], lr=TF32_LR), ref)
    assert emulated < 0.3  # the premise: TF32 rounding alone stays below order one
    with tf32(True):
        ours = maml_grad(DEVICE, torch.float32, backend, ALGOS[name], lr=TF32_LR)
    assert rel(ours, ref) < TF32_MARGIN * max(emulated, 1e-4)


@pytest.mark.parametrize("name", list(ALGOS))
def test_float32_cpu_error_is_what_the_tolerances_assume(name):
    """The premise of FLOAT32_TOL, checked wherever the suite runs."""
    err = rel(maml_grad(CPU, torch.float32, "loop", ALGOS[name]), reference(name))
    assert err < FLOAT32_CPU_ERROR


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_prediction_equals_the_cpu(backend):
    def predict(dev, backend):
        torch.manual_seed(0)
        model = Conv4(1, WAYS, SIZE, filters=FILTERS).to(dev, torch.float64)
        cfg = maml_cfg(inner_lr=0.4, train_steps=1, eval_steps=3)
        lrn = Maml(cfg, model, train_cfg(backend=Backend[backend]), "batch", dev)
        return lrn.predict(tasks(torch.float64, dev)).to(CPU)

    ref = predict(CPU, "loop")
    assert ref.shape == (TASKS, WAYS * QUERIES, WAYS)
    torch.testing.assert_close(predict(DEVICE, backend), ref, rtol=0, atol=1e-10)


# -- Reptile ------------------------------------------------------------------------------


def reptile_update(device, dtype, backend, optimizer="sgd") -> torch.Tensor:
    """phi' - phi after one meta-step. inner_batch is the whole task (ways * shots), so
    every minibatch holds all of the task's examples and the CPU's and the GPU's random
    streams (which differ) only reorder them: the update is the same maths."""
    torch.manual_seed(0)
    model = Conv4(1, WAYS, SIZE, filters=FILTERS).to(device, dtype)
    shots = 2
    cfg = reptile_cfg(
        inner_lr=0.05 if optimizer == "sgd" else 1e-3,
        inner_iters=3,
        inner_batch=WAYS * shots,
        inner_optimizer=optimizer,
        meta_step=1.0,
    )
    lrn = Reptile(cfg, model, train_cfg(iterations=10, backend=Backend[backend]), "batch", device)
    b = random_tasks(3, WAYS, shots, 1, SIZE, seed=1)
    batch = TaskBatch(
        b.xs.to(device, dtype), b.ys.to(device), b.xq.to(device, dtype), b.yq.to(device)
    )
    before = {n: p.detach().clone() for n, p in model.params().items()}
    lrn.meta_step(batch, 0)
    after = model.params()
    # Conv biases feed batch norm, which removes them: their gradient is rounding noise
    # (tests/test_reptile.py, comparable); left out.
    keep = [n for n in before if not (n.startswith("conv") and n.endswith("bias"))]
    return torch.cat([(after[n] - before[n]).flatten() for n in keep]).to(CPU, torch.float64)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_float64_update_equals_the_cpu(backend, optimizer):
    ref = reptile_update(CPU, torch.float64, "loop", optimizer)
    ours = reptile_update(DEVICE, torch.float64, backend, optimizer)
    assert ref.norm() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("tf32_on", [False, True], ids=["float32", "tf32"])
def test_reptile_float32_update_is_within_rounding(backend, tf32_on):
    """Plain SGD inside: Adam's per-element normalisation turns rounding-sized
    gradients into full-sized steps of either sign, which no tolerance can bound."""
    ref = reptile_update(CPU, torch.float64, "loop")
    tol = FLOAT32_TOL
    if tf32_on:
        with tf32_emulation():
            emulated = rel(reptile_update(CPU, torch.float32, "loop"), ref)
        assert emulated < 0.3
        tol = TF32_MARGIN * max(emulated, 1e-4)
    with tf32(tf32_on):
        ours = reptile_update(DEVICE, torch.float32, backend)
    assert rel(ours, ref) < tol


# -- a real run ---------------------------------------------------------------------------


@pytest.mark.slow
def test_short_real_training_run_completes(omniglot_data, tmp_path):
    """MAML Omniglot 5-way 1-shot for 40 iterations on the device, with validation,
    checkpoints and the meta-test: results.json and metrics.jsonl are written."""
    import json

    out = run_cli(
        "experiment=maml_omniglot_5w1s",
        *[o for o in TINY if not o.startswith(("train.iterations", "model.filters"))],
        f"device={DEVICE.type}",
        "train.iterations=40",
        f"hydra.run.dir={tmp_path}",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    flat = json.dumps(results)
    assert "test" in flat
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any("train/loss" in line for line in lines)
