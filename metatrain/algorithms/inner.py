"""Inner-loop building blocks shared by MAML and Reptile.

Two ways to take a gradient inside a task: torch.autograd.grad for the
per-task loop, torch.func.grad for tasks batched under torch.func.vmap.
"""

import torch


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


def pick_backend(requested: str, device: torch.device, second_order: bool) -> str:
    if requested != "auto":
        return requested
    # On CPU the per-task loop is faster at both orders (scripts/bench.py); batching
    # the tasks pays where kernels are launch-bound, on a GPU.
    return "vmap" if device.type == "cuda" else "loop"


def adam_step(p, g, m, v, t: int, lr: float, betas=(0.0, 0.999), eps: float = 1e-8):
    """One functional Adam update at step t (1-based); returns (p, m, v)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v
