"""Prototypical Networks against by-hand float64 maths, and a short real Omniglot run
trained, re-tested by metatrain-eval and summarised."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from metatrain.algorithms.protonet import ProtoNet, ProtoNetConfig
from metatrain.config import Backend
from metatrain.eval_run import evaluate_run
from metatrain.models.conv4 import Conv4
from metatrain.train import train
from tests.conftest import REPO, TINY, make_cfg, random_tasks, train_cfg

CPU = torch.device("cpu")
BACKENDS = ["loop", "vmap", "groups"]


def tiny_model(ways=3, seed=0):
    torch.manual_seed(seed)
    return Conv4(1, ways, 16, filters=4).double()


def learner(model, backend="loop", bn_eval="transductive", **kw):
    cfg = OmegaConf.structured(ProtoNetConfig(**kw))
    return ProtoNet(cfg, model, train_cfg(backend=Backend[backend]), bn_eval, CPU)


def by_hand_logits(model, params, batch):
    """Snell et al.'s classifier written out per task, class and query: c_k the mean of
    class k's support embeddings, logit -sum_j (f(x)_j - c_kj)^2."""
    out = []
    for t in range(len(batch)):
        hs = model.trunk(params, batch.xs[t], 0, False)[0]  # the support set's own statistics
        hq = model.trunk(params, batch.xq[t], 0, False)[0]  # the query set's own
        ways = int(batch.ys[t].max()) + 1
        protos = [hs[batch.ys[t] == k].mean(0) for k in range(ways)]
        rows = [torch.stack([-((q - c) ** 2).sum() for c in protos]) for q in hq]
        out.append(torch.stack(rows))
    return torch.stack(out)  # (tasks, ways*queries, ways)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_are_negative_squared_distances_to_the_prototypes(backend):
    model = tiny_model()
    batch = random_tasks(tasks=3, ways=3, shots=2, queries=3)
    ours = learner(model, backend).predict(batch)
    assert ours.shape == (3, 9, 3)
    torch.testing.assert_close(
        ours, by_hand_logits(model, model.params(), batch), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_gradient_is_the_gradient_of_the_query_loss_on_every_backend(backend):
    model = tiny_model()
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    lrn = learner(model, backend, meta_lr=0.0)  # a zero step: .grad is left to read
    lrn.meta_step(batch, 0)
    params = model.params()
    logits = by_hand_logits(model, params, batch)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.yq.flatten())
    trunk = [n for n in params if not n.startswith("head.")]
    ref = torch.autograd.grad(loss, [params[n] for n in trunk])
    for n, r in zip(trunk, ref):
        torch.testing.assert_close(params[n].grad, r, rtol=1e-9, atol=1e-11, msg=n)
    assert params["head.weight"].grad is None  # the head never enters a logit


def test_float64_gradcheck_of_the_query_loss():
    model = tiny_model(seed=1)
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2, seed=1)
    lrn = learner(model)
    params = {n: p.detach() for n, p in model.params().items()}
    names = ("conv0.weight", "bn3.bias")

    def loss(*tensors):
        logits, _ = lrn.logits({**params, **dict(zip(names, tensors))}, batch, "loop")
        return F.cross_entropy(logits.flatten(0, 1), batch.yq.flatten())

    inputs = tuple(params[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_each_query_with_the_support_set_alone():
    """support_plus_query: a query's embedding depends on no other query."""
    model = tiny_model()
    batch = random_tasks(tasks=2, ways=3, shots=2, queries=2)
    lrn = learner(model, "vmap", bn_eval="support_plus_query")
    full = lrn.predict(batch)
    batch.xq[:, 1:] = torch.randn_like(batch.xq[:, 1:])  # every query but the first changes
    torch.testing.assert_close(lrn.predict(batch)[:, 0], full[:, 0], rtol=1e-10, atol=1e-10)
    groups = learner(model, "groups", bn_eval="support_plus_query").predict(batch)
    torch.testing.assert_close(groups, lrn.predict(batch), rtol=1e-10, atol=1e-10)


def test_learning_rate_halves_on_schedule_and_config_composes():
    lrn = learner(tiny_model(), meta_lr=1e-3, lr_halve_every=2000)
    assert [lrn.meta_lr(i) for i in (0, 1999, 2000, 4000)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    cfg = make_cfg("algorithm=protonet")
    assert cfg.algorithm.name == "protonet" and cfg.algorithm.meta_batch == 1


def test_real_omniglot_run_learns_is_re_tested_and_summarised(omniglot_data, tmp_path):
    overrides = [*TINY, "algorithm=protonet", "algorithm.meta_batch=4", "train.iterations=40"]
    overrides += ["train.val_interval=20", "train.checkpoint_interval=20", "eval.test_tasks=60"]
    cfg = make_cfg(*overrides)
    results = train(cfg, tmp_path)
    acc = results["test"]["acc"]
    assert acc > 20 + 3 * results["test"]["ci95"], results["test"]  # chance: 20% (5-way)
    # metatrain-eval under another protocol: its own file, a number of its own
    path, record = evaluate_run(tmp_path, ["dataset.shots=5"], log=lambda *_: None)
    assert path.exists() and record["algorithm"] == "protonet"
    assert record["protocol"]["shots"] == 5 and record["single"]["acc"] > acc
    # a summary row as for any run (.hydra/ is Hydra's, written here by hand)
    (tmp_path / ".hydra").mkdir()
    saved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    spec = importlib.util.spec_from_file_location("summarize", REPO / "scripts" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    assert summarize.main([str(tmp_path), "--evals"]) == 0
    table = (tmp_path / "summary.md").read_text()
    assert table.count("| protonet | Omniglot 5w1s |") == 1
    assert "| protonet | Omniglot 5w5s |" in table
