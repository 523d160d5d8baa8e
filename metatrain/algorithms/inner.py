"""Inner-loop building blocks shared by MAML and Reptile, and how they execute.

Two ways to take a gradient inside a task: torch.autograd.grad for the
per-task loop, torch.func.grad for tasks batched under torch.func.vmap.
`pick_backend` chooses between them, `SpeedOptions` holds the train.* speed
switches (layout, bf16, compilation) and `setup_device` makes the process-wide
settings once per run. None of them changes the maths beyond rounding, except
bf16 autocast, which is off unless asked for.
"""

import contextlib
import ctypes
import platform
from dataclasses import dataclass

import torch

from metatrain.models.norm import under_transform


def grads_autograd(loss_fn, params: dict, create_graph: bool):
    """Gradient of loss_fn(params) -> (loss, aux) for the per-task loop. Detached
    inputs (evaluation, Reptile) become fresh leaves so autograd can differentiate."""
    params = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad():
        loss, aux = loss_fn(params)
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
    return dict(zip(names, grads)), aux


def grads_func(loss_fn, params: dict, create_graph: bool):
    """The same with torch.func.grad, usable under vmap. Without create_graph the
    result is detached, so no outer gradient flows through it (first order)."""
    grads, aux = torch.func.grad(lambda p: loss_fn(p), has_aux=True)(params)
    if not create_graph:
        grads = {n: g.detach() for n, g in grads.items()}
    return grads, aux


GRADS = {"loop": grads_autograd, "vmap": grads_func}

# Per-task images x height x width (support plus query) up to which batching the
# tasks beats the per-task loop on CPU: vmap (any backbone, any derivative order)
# up to VMAP_CPU_MAX_PIXELS, channel groups (conv4, first-order passes: evaluation
# and Reptile) up to GROUPS_CPU_MAX_PIXELS. Small tasks leave the loop bound by
# per-op overhead, which a batched pass pays once for all tasks; large ones favour
# the loop's dense NHWC convolutions, whose working set is one task's. Measured with
# scripts/bench.py on an idle 2-core AMD EPYC (AVX-512), 2 threads, s per iteration
# or per batch of evaluation tasks:
#   MAML Omniglot 5w1s train (5+5 images, 7,840 px): vmap 0.23, loop 0.44
#   FOMAML Omniglot 5w1s, 15 queries (80 images, 62,720 px): loop 0.34, vmap 0.48-0.63
#   MAML++ Omniglot 20w1s train (40 images, 31,360 px): loop 1.95, vmap 2.5-3
#   Reptile Omniglot 5w5s train (minibatches of 10, 7,840 px): groups 0.11, loop 0.17
#   evaluation, MAML++ Omniglot 20w1s, 20 tasks (31,360 px): groups 1.0, loop 1.5
#   evaluation, MAML++ MiniImageNet 5w1s, 50 tasks (80 images, 564,480 px): loop 8.0,
#     groups 17.0 (50 tasks' activations at 84 x 84 no longer fit in cache)
VMAP_CPU_MAX_PIXELS = 8192
GROUPS_CPU_MAX_PIXELS = 32768


def task_pixels(*parts: torch.Tensor) -> int:
    """Images x height x width of one task across `parts`, each (tasks, N, C, H, W)."""
    return sum(x[0].numel() // x.shape[2] for x in parts)


def requested_backend(train_cfg, groups_usable: bool) -> str:
    """train.backend, with `groups` turned into `auto` where channel groups cannot run
    (a backbone without a channel-groups pass, bf16 autocast, recomputed steps): the
    run goes on with the fastest of the other backends instead of failing."""
    requested = train_cfg.backend.value
    return "auto" if requested == "groups" and not groups_usable else requested


def pick_backend(
    requested: str,
    device: torch.device,
    second_order: bool,
    pixels: int | None = None,
    groups_ok: bool = False,
) -> str:
    """`loop`, `vmap` or `groups` for `requested` in auto|loop|vmap|groups.

    `pixels`: the images x H x W one task's pass touches (task_pixels), None if
    unknown; `groups_ok`: auto may pick channel groups (models/task_groups.py).

    auto: vmap on CUDA, where a per-task loop is launch-bound. On CPU, channel
    groups where allowed for tasks of at most GROUPS_CPU_MAX_PIXELS, else vmap for
    tasks of at most VMAP_CPU_MAX_PIXELS, else (and when the size is unknown) the
    per-task loop. The derivative order does not change the choice (both orders
    measured).
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "vmap"
    if pixels is None:
        return "loop"
    if groups_ok and pixels <= GROUPS_CPU_MAX_PIXELS:
        return "groups"
    return "vmap" if pixels <= VMAP_CPU_MAX_PIXELS else "loop"


def to_bool_auto(value, name: str) -> bool | None:
    """'auto' -> None, true/false (any case, or a bool) -> bool."""
    text = str(value).lower()
    if text == "auto":
        return None
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"{name}={value!r}: expected auto, true or false")


@dataclass
class SpeedOptions:
    """Execution switches from train.* resolved for one device."""

    device_type: str = "cpu"
    channels_last: bool = False  # NHWC inputs in the per-task loop
    amp_bf16: bool = False  # bf16 autocast of the task computation
    compile: bool = False  # torch.compile the model for once-differentiated passes
    cuda_graphs: bool = False  # ... in "reduce-overhead" mode (CUDA graphs), CUDA only

    @classmethod
    def from_config(cls, train_cfg, device: torch.device) -> "SpeedOptions":
        def get(key, default):
            return getattr(train_cfg, key, default) if train_cfg is not None else default

        cl = to_bool_auto(get("channels_last", "auto"), "train.channels_last")
        cuda = device.type == "cuda"
        return cls(
            device_type=device.type,
            # auto: on. oneDNN (CPU) runs these convolutions and max-pools 1.3-2x faster
            # on NHWC (scripts/bench.py), cuDNN's tensor-core kernels want NHWC too.
            channels_last=True if cl is None else cl,
            amp_bf16=bool(get("amp_bf16", False)),
            compile=bool(get("compile", False)) or (cuda and bool(get("cuda_graphs", False))),
            cuda_graphs=cuda and bool(get("cuda_graphs", False)),
        )

    def autocast(self):
        if not self.amp_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def compile_model(self, model):
        """The compiled model, or None when compilation is off. The learner calls it
        only for passes whose graph is differentiated at most once (compiled graphs
        have no double backward): first-order support passes, query passes, and
        evaluation."""
        if not self.compile:
            return None
        if not self.cuda_graphs:
            return torch.compile(model, dynamic=False)
        graphed = torch.compile(model, mode="reduce-overhead", dynamic=False)

        def call(*args, **kwargs):
            # A CUDA graph replays into the same output buffers: copy the (small)
            # outputs out before the next replay can overwrite them.
            return tuple(t.clone() for t in graphed(*args, **kwargs))

        return call

    def step_begin(self) -> None:
        """Tell CUDA graph trees that a new meta-iteration (or evaluation batch) starts."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS.

    glibc serves each allocation above a threshold with a fresh mmap, so every
    activation of a MiniImageNet pass (up to 100 MB) is page-faulted in again on
    each use, and every large elementwise op runs at a fraction of memory speed
    (measured: a 100 MB multiply 42 ms -> 5 ms; MAML++ MiniImageNet 11.0 -> 6.5 s per
    iteration on one core). With mmap off and trimming above 2 GiB, freed blocks
    are reused. Returns whether the settings took (glibc on Linux only).
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def setup_device(device: torch.device, train_cfg=None) -> dict:
    """Process-wide speed settings for a run on `device`; returns what was set.

    CUDA: TF32 matmuls and convolutions (train.tf32, default on) and cuDNN's
    autotuner. CPU: the allocator settings above. Nothing here changes results
    beyond rounding (TF32 rounds matmul inputs to 10 mantissa bits).
    """
    done = {}
    if device.type == "cuda":
        tf32 = bool(getattr(train_cfg, "tf32", True)) if train_cfg is not None else True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        done.update(tf32=tf32, cudnn_benchmark=True)
    else:
        done["cpu_allocator"] = tune_cpu_allocator()
    return done


def adam_step(p, g, m, v, t: int, lr: float, betas=(0.0, 0.999), eps: float = 1e-8):
    """One functional Adam update at step t (1-based); returns (p, m, v)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def adam_steps_(params: list, grads: list, ms: list, vs: list, t: int, lr: float, betas, eps=1e-8):
    """adam_step for lists of plain tensors, in place: one fused kernel over every
    tensor (torch's fused Adam; the same formula, measured 7-12x faster than the
    dozen elementwise ops per tensor of adam_step on a Reptile network of 5-50
    tasks). Under torch.func transforms, whose tensors the fused kernel cannot
    take, the functional adam_step per tensor."""
    if any(under_transform(p) or under_transform(g) for p, g in zip(params, grads)):
        for i, (p, g) in enumerate(zip(params, grads)):
            params[i], ms[i], vs[i] = adam_step(p, g, ms[i], vs[i], t, lr, betas, eps)
        return
    # The kernel walks each tensor's memory in order: every gradient is laid out as
    # its parameter (convolutions hand back NHWC weight gradients for NCHW weights).
    grads = [
        g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
        for p, g in zip(params, grads)
    ]
    steps = [torch.tensor(float(t), device=p.device) for p in params]
    torch._fused_adam_(
        params,
        grads,
        ms,
        vs,
        [],
        steps,
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )
