"""The two baselines scripts/bench.py times beside metatrain, on the same shapes.

naive: the per-task loop a user would write from the papers with stock PyTorch:
an nn.Module Conv4 (nn.Conv2d, nn.BatchNorm2d without running statistics, ReLU,
max-pool or stride 2, nn.Linear), called with torch.func.functional_call on a
dict of fast weights, inner gradients from torch.autograd.grad per task, the
meta-gradient accumulated task by task, torch.optim.Adam. Same maths as the
setting (steps, multi-step loss weights, derivative order, Reptile's inner Adam
with beta1 = 0), none of metatrain's speed work.

authors: the MAML++ authors' implementation (github.com/AntreasAntoniou/
HowToTrainYourMAMLPytorch), imported from a checkout given with --authors-dir and
driven through its own entry points (get_args on its experiment_config JSON,
MAMLFewShotClassifier, run_train_iter / run_validation_iter) on synthetic batches
of the setting's shapes. Nothing of it is copied here.

Each `build_*` returns a callable that runs one timed unit (a meta-iteration, or the
evaluation of one batch of tasks) on a fresh random batch.
"""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

# -- naive per-task loop --------------------------------------------------------------


def naive_conv4(channels, ways, size, filters, downsample) -> nn.Module:
    layers, c = [], channels
    for _ in range(4):
        stride = 2 if downsample == "stride" else 1
        layers += [
            nn.Conv2d(c, filters, 3, stride, 1),
            nn.BatchNorm2d(filters, track_running_stats=False),
            nn.ReLU(),
        ]
        if downsample == "pool":
            layers.append(nn.MaxPool2d(2))
        c = filters
    trunk = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        features = trunk(torch.zeros(2, channels, size, size)).shape[1]
    return nn.Sequential(trunk, nn.Linear(features, ways))


def _adapt(net, params, x, y, steps, lr, create_graph, query=None, weights=None):
    """SGD steps from params on (x, y); with `query` (xq, yq) the weighted query loss."""
    fast, loss = dict(params), 0.0
    for i in range(steps):
        inner = F.cross_entropy(functional_call(net, fast, (x,)), y)
        grads = torch.autograd.grad(inner, list(fast.values()), create_graph=create_graph)
        fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        if query is not None and weights[i] != 0.0:
            loss = loss + weights[i] * F.cross_entropy(
                functional_call(net, fast, (query[0],)), query[1]
            )
    return fast, loss


def build_naive(cfg, sampler, generator, kind: str, iteration: int, weights, second_order):
    """The naive loop for a composed config: `kind` train or eval."""
    a, ds = cfg.algorithm, cfg.dataset
    net = naive_conv4(
        ds.channels, ds.ways, ds.image_size, cfg.model.filters, cfg.model.downsample.value
    )
    params = dict(net.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    reptile = a.name == "reptile"
    tasks = cfg.eval.batch if kind == "eval" else a.meta_batch

    def maml_step():
        batch = sampler.sample(tasks, generator)
        opt.zero_grad()
        for t in range(tasks):
            _, loss = _adapt(
                net,
                params,
                batch.xs[t],
                batch.ys[t],
                a.train_steps,
                a.inner_lr,
                second_order,
                (batch.xq[t], batch.yq[t]),
                weights,
            )
            (loss / tasks).backward()
        opt.step()

    def reptile_task(x, y, iters, bsz):
        fast = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        m = {n: torch.zeros_like(p) for n, p in fast.items()}
        v = {n: torch.zeros_like(p) for n, p in fast.items()}
        for i in range(iters):
            ids = torch.randint(0, x.shape[0], (bsz,), generator=generator)
            loss = F.cross_entropy(functional_call(net, fast, (x[ids],)), y[ids])
            grads = torch.autograd.grad(loss, list(fast.values()))
            with torch.no_grad():
                for (n, p), g in zip(list(fast.items()), grads):
                    m[n] = g  # beta1 = 0
                    v[n] = 0.999 * v[n] + 0.001 * g * g
                    fast[n] = p - a.inner_lr * g / ((v[n] / (1 - 0.999 ** (i + 1))).sqrt() + 1e-8)
                    fast[n].requires_grad_()
        return fast

    def reptile_step():
        batch = sampler.sample(tasks, generator)
        ws = [
            reptile_task(batch.xs[t], batch.ys[t], a.inner_iters, a.inner_batch)
            for t in range(tasks)
        ]
        with torch.no_grad():
            for n, p in params.items():
                p += 1.0 * (sum(w[n] for w in ws) / tasks - p)

    def evaluate():
        batch = sampler.sample(tasks, generator)
        out = []
        for t in range(tasks):
            if reptile:
                fast = reptile_task(batch.xs[t], batch.ys[t], a.eval_iters, a.eval_batch)
            else:
                fast, _ = _adapt(
                    net, params, batch.xs[t], batch.ys[t], a.eval_steps, a.inner_lr, False
                )
            with torch.no_grad():
                out.append(functional_call(net, fast, (batch.xq[t],)))
        return torch.stack(out)

    if kind == "eval":
        return evaluate
    return reptile_step if reptile else maml_step


# -- the MAML++ authors' code ------------------------------------------------------------

# Our setting -> the authors' experiment_config file of the same shapes.
AUTHORS_CONFIG = {
    ("omniglot", 20, 1): "omniglot_maml++-omniglot_1_8_0.1_64_20_0.json",
    ("omniglot", 5, 1): "omniglot_maml++-omniglot_1_8_0.1_64_5_0.json",
    ("miniimagenet", 5, 1): "mini-imagenet_maml++-mini-imagenet_1_2_0.01_48_5_0.json",
    ("miniimagenet", 5, 5): "mini-imagenet_maml++-mini-imagenet_5_2_0.01_48_5_0.json",
}


def build_authors(cfg, sampler, generator, kind: str, authors_dir: str):
    """run_train_iter (epoch 0: second order, multi-step loss) or run_validation_iter of
    the authors' MAMLFewShotClassifier on random batches shaped like ours."""
    ds = cfg.dataset
    key = (ds.name, ds.ways, ds.shots)
    if key not in AUTHORS_CONFIG:
        raise ValueError(f"no authors' config for {key}")
    root = Path(authors_dir).resolve()
    config = root / "experiment_config" / AUTHORS_CONFIG[key]
    sys.path.insert(0, str(root))
    os.environ.setdefault("DATASET_DIR", str(root / "datasets"))
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every argument
        from few_shot_learning_system import MAMLFewShotClassifier
        from utils.parser_utils import get_args

        argv, sys.argv = (
            sys.argv,
            [str(root / "train_maml_system.py"), "--name_of_args_json_file", str(config)],
        )
        try:
            args, device = get_args()
        finally:
            sys.argv = argv
        shape = (2, args.image_channels, args.image_height, args.image_width)
        model = MAMLFewShotClassifier(im_shape=shape, device=device, args=args)
    spec = json.loads(config.read_text())
    # Their evaluation, like their training, takes batch_size tasks at a time (all of
    # MiniImageNet's 50 at once took more than 24 GB); ratios are per task.
    tasks = spec["batch_size"]
    queries = spec["num_target_samples"]

    def data():
        b = sampler.sample(tasks, generator)
        s, n = b.xs.shape[2:], ds.ways
        # (tasks, ways, per class, C, H, W) and (tasks, ways, per class), class-major as ours.
        # On the host, as their data loader hands them over: run_train_iter wraps them in
        # torch.Tensor (CPU only) and copies them to their device, inside their time.
        return tuple(
            t.cpu()
            for t in (
                b.xs.reshape(tasks, n, ds.shots, *s),
                b.xq.reshape(tasks, n, -1, *s)[:, :, :queries],
                b.ys.reshape(tasks, n, ds.shots),
                b.yq.reshape(tasks, n, -1)[:, :, :queries],
            )
        )

    def train():
        with contextlib.redirect_stdout(io.StringIO()):
            model.run_train_iter(data_batch=data(), epoch=0)

    def evaluate():
        with contextlib.redirect_stdout(io.StringIO()):
            model.run_validation_iter(data_batch=data())

    info = {"authors_config": config.name, "authors_tasks": tasks, "authors_queries": queries}
    return (evaluate if kind == "eval" else train), info
