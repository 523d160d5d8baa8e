"""No ablation cell is a no-op.

Every cell of every conf/experiment/ablation_* sweep is composed with Hydra's
compose API (the sweep's own overrides, plus a tiny network), built from the
same initial parameters, and run on one fixed batch: the meta-gradient at the
first iteration, then two meta-updates, then predictions on fixed evaluation
tasks. Each cell must differ from the sweep's baseline cell (`ablation=none`)
in the meta-gradient or in the evaluation logits, where recomputing the
baseline gives exactly the same numbers (float64, CPU).

`python -m pytest tests/test_ablation_cells.py -s` prints the table.
"""

import itertools

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from metatrain.algorithms import build_learner
from metatrain.cli import CONF_DIR
from metatrain.train import build_model
from tests.conftest import REPO, random_tasks

# Far above float64 rounding (a reordered sum differs by ~1e-16 relative), far below
# what a switch does to gradients and logits of order 1e-3 to 1.
NOISE = 1e-8
SWEEPS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("ablation_*.yaml"))
CPU = torch.device("cpu")
# The cells' own settings at a fraction of the size: 4 filters, 16x16 inputs, two
# tasks per meta-batch, a two-iteration run of one-iteration epochs (so that cosine
# annealing, stepped per epoch, moves).
TINY = [
    "model.filters=4",
    "dataset.image_size=16",
    "algorithm.meta_batch=2",
    "train.iterations=2",
    "train.iters_per_epoch=1",
    "train.backend=loop",
    "device=cpu",
    "logger=none",
]


def sweep_cells(name: str) -> list[list[str]]:
    """The override lists of every cell of sweep `name`, as its multirun would run them."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hcfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = hcfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(cell) for cell in itertools.product(*axes)]


def run_cell(name: str, cell: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", *cell, *TINY])
    torch.manual_seed(0)
    model = build_model(cfg, CPU).double()
    learner = build_learner(cfg, model, CPU)
    init = {n: p.detach().clone() for n, p in model.params().items()}
    ways, shots, queries = cfg.dataset.ways, cfg.dataset.shots, cfg.dataset.queries
    size, n = cfg.dataset.image_size, cfg.algorithm.meta_batch
    batches = [random_tasks(n, ways, shots, queries, size, seed=s) for s in (1, 2)]
    learner.optimizer.zero_grad(set_to_none=True)
    learner.meta_gradient(batches[0], 0)
    grad = {k: p.grad.clone() for k, p in model.params().items() if p.grad is not None}
    for it, batch in enumerate(batches):
        learner.meta_step(batch, it)
    logits = learner.predict(random_tasks(3, ways, shots, 3, size, seed=3))
    return {"init": init, "grad": grad, "logits": logits}


def difference(a: dict, b: dict) -> tuple[float, float, float]:
    """(max |meta-gradient difference| over the parameters both have, max |logit
    difference|, fraction of evaluation predictions that changed)."""
    common = [k for k in a["grad"] if k in b["grad"] and a["grad"][k].shape == b["grad"][k].shape]
    dg = max((a["grad"][k] - b["grad"][k]).abs().max().item() for k in common)
    dl = (a["logits"] - b["logits"]).abs().max().item()
    changed = (a["logits"].argmax(-1) != b["logits"].argmax(-1)).double().mean().item()
    return dg, dl, changed


@pytest.fixture
def one_thread():
    # Tensors this small run fastest on one thread, and far faster than on many
    # threads of a shared machine (measured: 1.2 s against 25 s per cell).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_ablation_cell_changes_something(name, one_thread):
    cells = sweep_cells(name)
    baseline = [c for c in cells if "ablation=none" in c]
    assert len(cells) > 1 and len(baseline) == 1, cells
    base = run_cell(name, baseline[0])
    # Recomputed, the baseline is bit-identical: any difference below is the switch's.
    assert difference(base, run_cell(name, baseline[0])) == (0.0, 0.0, 0.0)
    rows, inert = [], []
    for cell in cells:
        if cell is baseline[0]:
            continue
        out = run_cell(name, cell)
        # Same initial network: the parameters both cells have start equal.
        for k in set(out["init"]) & set(base["init"]):
            if out["init"][k].shape == base["init"][k].shape:
                assert torch.equal(out["init"][k], base["init"][k]), (cell, k)
        dg, dl, changed = difference(out, base)
        rows.append(f"| {name} | {','.join(cell)} | {dg:.3g} | {dl:.3g} | {changed:.2f} |")
        if dg < NOISE and dl < NOISE:
            inert.append(cell)
    print("\n| sweep | cell | max abs d meta-grad | max abs d logits | preds changed |")
    print("\n".join(rows))
    assert not inert, f"cells that compute what the baseline computes: {inert}"
