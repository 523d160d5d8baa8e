"""One run over two processes (gloo on CPU) computes what one process computes.

Equivalence: 2 ranks x a shard of B = 5 tasks (3 + 2, unequal on purpose) against
1 process x 5 tasks, for every learner, in float64, over several meta-steps. The
ranks average in another order than one process sums, so parameters agree to
rounding: 1e-10 absolute in float64 after 4 Adam steps of 1e-2 (measured ~1e-15;
the tolerance leaves room for Adam dividing small gradients by their RMS). Conv
biases under Adam are left out: they feed batch norm, their true gradient is 0
and autograd's rounding noise (~1e-17) becomes full lr * sign(noise) steps in
either run (tests/test_reptile.py, `comparable`); the logits are compared instead,
which they cannot reach. Evaluation hands whole batches to ranks, so its numbers
must be identical, not close.
"""

import itertools
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from metatrain import distributed
from metatrain.algorithms.maml import Maml
from metatrain.algorithms.reptile import Reptile
from metatrain.data.tasks import EpisodeSampler, FixedTasks
from metatrain.evaluate import evaluate
from metatrain.models.conv4 import Conv4
from tests.conftest import maml_cfg, random_tasks, reptile_cfg, train_cfg

CPU = torch.device("cpu")
TASKS, ITERS, TOL = 5, 4, 1e-10
HEAD = "model.head_weight"

SETTINGS = {
    "maml": {"train_steps": 2},
    "fomaml": {"train_steps": 2, "first_order": True},
    # every MAML++ switch; da flips from first to second order after iteration 2
    "mamlpp": {"train_steps": 2, "msl": True, "msl_epochs": 3, "da": True, "da_epochs": 2,
               "bnrs": True, "bnwb": True, "lslr": True, "ca": True, "grad_clip": 0.5},
    "anil": {"train_steps": 2, "anil": True},
    "metasgd": {"train_steps": 1, "metasgd": True},
    "reptile": {},
}  # fmt: skip


def build(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    kw = SETTINGS[name]
    steps = kw.get("train_steps", 1)
    model = Conv4(
        1, 3, 16, filters=4,
        bn_weight_steps=steps if kw.get("bnwb") else 0,
        bn_stat_steps=steps if kw.get("bnrs") else 1,
    ).to(dtype)  # fmt: skip
    tc = train_cfg(iterations=ITERS, iters_per_epoch=1)
    if name == "reptile":
        cfg = reptile_cfg(inner_lr=0.01, inner_iters=3, inner_batch=4, meta_batch=TASKS)
        return Reptile(cfg, model, tc, "batch", CPU)
    cfg = maml_cfg(inner_lr=0.2, eval_steps=2, meta_lr=1e-2, meta_batch=TASKS, **kw)
    return Maml(cfg, model, tc, "batch", CPU)


def compute() -> dict:
    """Every setting's network after ITERS meta-steps on this rank's shards, its logits
    on a probe batch, and the evaluation of a float32 learner on a fixed task set."""
    out = {}
    probe = random_tasks(tasks=2, seed=99)
    for name in SETTINGS:
        learner = build(name)
        for it in range(ITERS):
            batch = distributed.shard(random_tasks(tasks=TASKS, seed=it))
            learner.meta_step(batch, it)
        state = {k: v.clone() for k, v in learner.net.state_dict().items()}
        out[name] = {"state": state, "logits": learner.predict(probe)}
    images = torch.randint(0, 256, (12, 6, 1, 16, 16), dtype=torch.uint8)
    sampler = EpisodeSampler(images, 3, 1, 2, [0.5], [0.25], "val")
    tasks = FixedTasks(sampler, 7, seed=3)  # batches of 2: 4 batches, the last of 1
    for name in ("maml", "reptile"):
        out[f"eval/{name}"] = evaluate(build(name, torch.float32), tasks, 2)
    return out


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    distributed.setup(CPU, 60)
    try:
        torch.save(compute(), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        distributed.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=2)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process():
    return compute()


def comparable(name: str) -> bool:
    return not (name.startswith("model.conv") and name.endswith("bias"))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_two_ranks_equal_one_process(name, two_ranks, one_process):
    ref = one_process[name]
    for rank in two_ranks:
        got = rank[name]
        assert got["state"].keys() == ref["state"].keys()
        worst = max(
            (got["state"][k] - ref["state"][k]).abs().max().item()
            for k in ref["state"]
            if comparable(k) and ref["state"][k].is_floating_point()
        )
        print(f"{name}: 2 ranks vs 1 process, max parameter difference {worst:.1e}")
        assert worst < TOL
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=TOL)
        # the run moved: a test of nothing would pass too
        start = build(name).net.state_dict()
        assert not torch.equal(got["state"][HEAD], start[HEAD])
    # every rank holds the same network, to the bit
    for k in ref["state"]:
        assert torch.equal(two_ranks[0][name]["state"][k], two_ranks[1][name]["state"][k])


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_sharded_evaluation_is_identical(name, two_ranks, one_process):
    ref = one_process[f"eval/{name}"]
    assert ref["tasks"] == 7
    for rank in two_ranks:
        assert rank[f"eval/{name}"] == ref


def test_shards_cover_the_batch_once():
    for tasks in (1, 5, 8):
        for n in (1, 2, 3):
            if n > tasks:
                continue
            ranges = [distributed.shard_range(tasks, r, n) for r in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == tasks
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
