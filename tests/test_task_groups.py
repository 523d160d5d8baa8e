"""Tasks as channel groups compute the per-task maths: network outputs, statistics and
gradients of every task, and the predictions of MAML's and Reptile's evaluation,
against the per-task loop in float64."""

import pytest
import torch
import torch.nn.functional as F

from metatrain.algorithms.inner import GROUPS_CPU_MAX_PIXELS, pick_backend
from metatrain.algorithms.maml import Maml
from metatrain.algorithms.reptile import Reptile
from metatrain.config import Backend
from metatrain.models import task_groups
from metatrain.models.conv4 import Conv4
from tests.conftest import maml_cfg, random_tasks, reptile_cfg, train_cfg

CPU = torch.device("cpu")


def model_and_params(tasks, downsample="pool", steps=0, stat_steps=1, seed=0):
    """A float64 Conv4 with some negative gammas, and per-task parameters that differ."""
    torch.manual_seed(seed)
    model = Conv4(
        2, 3, 16, 4, downsample=downsample, bn_weight_steps=steps, bn_stat_steps=stat_steps
    )
    model = model.double()
    with torch.no_grad():
        for i in range(4):
            model.running_stats(i)[0].normal_()
            model.running_stats(i)[1].uniform_(0.5, 2)
    params = task_groups.stack(model.params(), tasks)
    for n, p in params.items():
        p.add_(torch.randn_like(p) * (1.0 if n.startswith("bn") and "weight" in n else 0.1))
    return model, params


@pytest.mark.parametrize(
    "downsample,running,steps,stat_steps",
    [("pool", False, 0, 1), ("stride", False, 0, 1), ("pool", True, 2, 2), ("stride", True, 2, 1)],
    ids=["pool", "stride", "pool-running-per-step", "stride-running-per-step-weights"],
)
def test_forward_and_gradients_equal_each_tasks_own(downsample, running, steps, stat_steps):
    tasks, step = 3, 1
    model, params = model_and_params(tasks, downsample, steps, stat_steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, 5, 2, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (tasks, 5), generator=g)
    logits, stats = task_groups.forward(model, params, x, step, running)
    grads, _, out_all = task_groups.grads(model, params, list(params), x, y, step, running)
    torch.testing.assert_close(out_all, logits)
    assert logits.shape == (tasks, 5, 3) and stats.shape == (tasks, 4, 2, 4)
    for t in range(tasks):
        own = {n: p[t].clone().requires_grad_() for n, p in params.items()}
        out, s = model(own, x[t], step=step, running=running)
        torch.testing.assert_close(logits[t], out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[t], s, rtol=1e-12, atol=1e-12)
        ref = torch.autograd.grad(F.cross_entropy(out, y[t]), list(own.values()))
        for n, r in zip(own, ref):
            # Conv biases feed batch norm: their true gradient is 0 (rounding noise
            # either way) unless running statistics replace the batch's.
            atol = 1e-12 * max(r.abs().max().item(), 1.0) if n.endswith("bias") else 1e-12
            torch.testing.assert_close(grads[n][t], r, rtol=1e-10, atol=atol, msg=n)


def maml(backend, **kw):
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, 4, bn_weight_steps=3 if kw.get("bnwb") else 0, bn_stat_steps=3)
    model = model.double()
    with torch.no_grad():
        model.params()["bn1.weight"].mul_(-1)  # the sign-flip path
        for i in range(4):
            model.running_stats(i)[1].uniform_(0.5, 2)
    cfg = maml_cfg(**{"inner_lr": 0.3, "train_steps": 3, "eval_steps": 3, **kw})
    bn_eval = "running" if kw.get("bnrs") else "batch"
    return Maml(cfg, model, train_cfg(backend=Backend[backend]), bn_eval, CPU)


@pytest.mark.parametrize(
    "switches", [{}, {"lslr": True, "bnwb": True, "bnrs": True}], ids=["maml", "mamlpp"]
)
def test_maml_predictions_equal_the_per_task_loop(switches):
    batch = random_tasks(tasks=4)
    groups, loop = maml("groups", **switches), maml("loop", **switches)
    if switches:  # learned rates that differ per layer and step
        with torch.no_grad():
            for r in groups.net["rates"].parameters():
                r.copy_(torch.tensor([0.3, 0.1, 0.2], dtype=r.dtype))
        loop.net.load_state_dict(groups.net.state_dict())
    assert groups.backend_for(batch, 0, True) == "groups"
    assert loop.backend_for(batch, 0, True) == "loop"
    torch.testing.assert_close(groups.predict(batch), loop.predict(batch), rtol=1e-9, atol=1e-10)


def reptile(backend, optimizer="adam"):
    torch.manual_seed(0)
    model = Conv4(1, 3, 16, filters=4).double()
    cfg = reptile_cfg(inner_lr=0.01, inner_iters=3, inner_batch=4, eval_iters=7, eval_batch=4)
    cfg.inner_optimizer = optimizer
    return Reptile(cfg, model, train_cfg(backend=Backend[backend]), "running", CPU)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_reptile_evaluation_and_meta_step_equal_the_per_task_loop(optimizer):
    batch = random_tasks(tasks=3, ways=3, shots=3, queries=2)
    groups, loop = reptile("groups", optimizer), reptile("loop", optimizer)
    # 7 Adam steps on minibatches of 4 (50 at test time in the presets), per task.
    # Conv biases feed batch norm: their true gradient is 0, and Adam scales the
    # rounding noise of each layout's kernels up to a full step (~1e-10 in the logits).
    tol = {"rtol": 1e-6, "atol": 1e-9} if optimizer == "adam" else {"rtol": 1e-8, "atol": 1e-10}
    torch.testing.assert_close(groups.predict(batch), loop.predict(batch), **tol)
    groups.meta_step(batch, 0)
    loop.meta_step(batch, 0)
    x = batch.xs[0]
    a, b = groups.model.params(), loop.model.params()
    torch.testing.assert_close(groups.model(a, x)[0], loop.model(b, x)[0], rtol=1e-8, atol=1e-10)
    for i in range(4):  # running statistics folded from every task's minibatches
        torch.testing.assert_close(groups.model.running_stats(i), loop.model.running_stats(i))


def test_auto_picks_groups_for_small_first_order_passes_on_cpu_only():
    limit = GROUPS_CPU_MAX_PIXELS
    assert pick_backend("auto", CPU, False, limit, groups_ok=True) == "groups"
    assert pick_backend("auto", CPU, False, limit + 1, groups_ok=True) == "loop"
    assert pick_backend("auto", CPU, False, None, groups_ok=True) == "loop"
    assert pick_backend("auto", torch.device("cuda"), False, 1, groups_ok=True) == "vmap"
    assert pick_backend("groups", CPU, True, 10**9) == "groups"  # asked for: given
    assert maml("auto").backend(True) == "loop"  # meta-training: the size rule, no groups
    small = random_tasks(tasks=2, ways=3, shots=2, queries=1, size=16)  # 9 x 256 pixels
    large = random_tasks(tasks=2, ways=3, shots=20, queries=1, size=28)  # 63 x 784
    assert maml("auto").backend_for(small, 0, evaluation=True) == "groups"
    assert maml("auto").backend_for(large, 0, evaluation=True) == "loop"
    # Reptile's inner loop sees minibatches: 4 images of 28 x 28 are small.
    assert reptile("auto").backend_for(large, 0) == "groups"
    assert reptile("auto").backend_for(random_tasks(shots=20, size=96), 0) == "loop"  # 4 x 9,216


@pytest.mark.parametrize("channels", [1, 3])
def test_grouped_input_is_nhwc_in_memory_for_any_channel_count(channels):
    # With one channel a reshape alone would keep the tasks' NCHW memory, and oneDNN
    # would then run the whole grouped network NCHW.
    x = torch.randn(5, 10, channels, 28, 28)
    h = task_groups.to_groups(x)
    assert h.shape == (10, 5 * channels, 28, 28) and h.stride(1) == 1
    assert h.stride() == (28 * 28 * 5 * channels, 1, 28 * 5 * channels, 5 * channels)
    # task t's images in its own channels
    torch.testing.assert_close(h[:, 2 * channels : 3 * channels], x[2])
