"""Second-order MAML meta-gradients whose memory does not grow with inner steps.

Differentiating through k inner steps keeps, for every step, the support pass's
activations and the graph of its gradient, so memory grows linearly with k. Here
the inner loop runs twice. Forward: only the adapted parameters theta_1..theta_k
are kept (one parameter copy per step). Backward, from the last step to the
first: step i is recomputed from theta_i with its graph, and the adjoint
lambda_{i+1} = dL/dtheta_{i+1} is pulled back through it by one vector-Jacobian
product, which gives lambda_i and this step's share of the gradient of every
meta-parameter (weights that are not adapted, learned rates). The query losses
of the multi-step loss add their own gradients on the way. Only one step's graph
is alive at a time; the meta-gradient is the same as autograd's through the
whole unrolled loop (tests/test_inner_checkpoint.py, float64, to 1e-10).

torch.utils.checkpoint (non-reentrant) gives the right second-order gradient
around a step that calls torch.autograd.grad(create_graph=True), but measured no
memory saving (the inner backward that runs inside the forward pass needs the
step's activations at once) and its saved-tensor hooks do not run under
torch.func.vmap; hence this explicit form with torch.func, which runs the same
in the per-task loop and under vmap.
"""

import torch

from metatrain.algorithms.maml_task import InnerLoop, TaskOut, inner_step


def map_tree(f, *trees: dict) -> dict:
    """f over the leaves of equally shaped nested dicts of tensors."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: map_tree(f, *(t[k] for t in trees)) for k in first}
    return f(*trees)


def recomputed_meta_grads(step_fn, query_fn, theta0: dict, meta: dict, steps: int, weights):
    """Loss, final query logits, per-step statistics and d loss / d meta.

    step_fn(i, theta, meta, create_graph) -> (theta_next, stats): inner step i.
    query_fn(i, theta, meta) -> (query loss, logits) after step i.
    theta0: the adapted parameters at the start (a sub-dict of meta["model"]).
    meta: every meta-learned tensor in nested dicts, detached.
    The loss is sum_i weights[i] * query loss after step i.
    """
    thetas, stats = [theta0], []
    with torch.no_grad():
        for i in range(steps):
            theta, s = step_fn(i, thetas[-1], meta, False)
            thetas.append(theta)
            stats.append(s)

    g_meta = map_tree(torch.zeros_like, meta)
    lam = {n: torch.zeros_like(t) for n, t in theta0.items()}
    loss, logits = None, None
    for i in reversed(range(steps)):
        if weights[i] != 0.0 or i == steps - 1:
            w = weights[i]

            def weighted(theta, m, i=i, w=w):
                q_loss, q_logits = query_fn(i, theta, m)
                return w * q_loss, (q_loss.detach(), q_logits.detach())

            (g_theta, g_m), (q_loss, q_logits) = torch.func.grad(
                weighted, argnums=(0, 1), has_aux=True
            )(thetas[i + 1], meta)
            if i == steps - 1:
                logits = q_logits
            if w != 0.0:
                lam = {n: lam[n] + g_theta[n] for n in lam}
                g_meta = map_tree(torch.add, g_meta, g_m)
                loss = w * q_loss if loss is None else loss + w * q_loss

        def step(theta, m, i=i):
            return step_fn(i, theta, m, True)[0]

        _, pull = torch.func.vjp(step, thetas[i], meta)
        lam, g_m = pull(lam)
        g_meta = map_tree(torch.add, g_meta, g_m)
    # theta_0 is the meta-parameters themselves
    g_model = dict(g_meta["model"])
    for n, g in lam.items():
        g_model[n] = g_model[n] + g
    return loss, logits, torch.stack(stats), {**g_meta, "model": g_model}


def recomputed_task(
    params: dict, rates: dict | None, ys, yq, *, passes, rule, run: InnerLoop
) -> TaskOut:
    """maml_task.task_loss, plus the task's meta-gradient {"model": ..., "rates": ...}
    in TaskOut.grads. params and rates come in detached; passes(model params) -> the
    task's Passes and rule(rates) -> its InnerRule rebuild both from the meta-parameters
    that recomputed_meta_grads differentiates."""

    def step_fn(i, theta, m, create_graph):
        fast = {**m["model"], **theta}
        fast, s = inner_step(
            fast, i, ys, passes=passes(m["model"]), rule=rule(m["rates"] or None),
            create_graph=create_graph,
        )  # fmt: skip
        return {n: fast[n] for n in theta}, s

    def query_fn(i, theta, m):
        logits, _ = passes(m["model"]).query({**m["model"], **theta}, i)
        return rule(m["rates"] or None).query_loss(logits, yq), logits

    meta = {"model": params, "rates": rates or {}}
    theta0 = {n: params[n] for n in rule(rates).adapted}
    loss, logits, stats, grads = recomputed_meta_grads(
        step_fn, query_fn, theta0, meta, run.steps, run.weights
    )
    acc = (logits.argmax(-1) == yq).float().mean(-1)
    return TaskOut(loss, acc, logits, stats, grads)


def accumulate_grads(net, grads: dict, n: int) -> None:
    """Add summed per-task gradients / n to .grad, as backward() of the mean would.
    net: the learner's ModuleDict ("model", optional "rates")."""
    named = {("model", k): p for k, p in net["model"].params().items()}
    if "rates" in net:
        named.update({("rates", k): r for k, r in net["rates"].tensors().items()})
    for (group, k), p in named.items():
        g = grads[group][k] / n
        p.grad = g if p.grad is None else p.grad + g
