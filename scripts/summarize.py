"""Summarise a metatrain sweep: one row per configuration (seeds aggregated) beside the
published numbers.

    python scripts/summarize.py outputs/multirun/<sweep_name> [--out DIR] [--sort KEY] [--evals]

A cell is any folder under SWEEP_DIR holding .hydra/config.yaml (one sweep, several, or any
tree of runs). Finished cells (results.json) whose configs differ only in `seed` form one row:
for the single best-validation model and for the top-k ensemble, the mean test accuracy over
seeds, the sample std across seeds and the mean of the per-run 95% CIs; the batch-norm mode at
test and the number of seeds. Unfinished and failed cells get a row each. With --evals, each
re-evaluation made by metatrain-eval (RUN_DIR/eval/*.json) is a row too, seeds aggregated the
same way. The table goes to stdout and to summary.md, the same rows to summary.csv, both in
SWEEP_DIR or in --out DIR. Figures of the same runs
(learning curves, test accuracy with CIs): metatrain-plot SWEEP_DIR, or make plot SWEEP=SWEEP_DIR.
"""

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

import yaml

from metatrain.keys import drop_non_math, is_non_math
from metatrain.metrics import read_metrics
from metatrain.naming import algorithm_label, bn_eval_mode, bn_mode

DATASETS = {
    "omniglot": "Omniglot", "miniimagenet": "MiniImageNet", "cifarfs": "CIFAR-FS",
    "fc100": "FC100", "tieredimagenet": "tieredImageNet", "cub": "CUB",
}  # fmt: skip
DATASET_WAYS = (("Omniglot", 5), ("Omniglot", 20), ("MiniImageNet", 5))  # the paper table
MORE_TASKS = [f"{d} 5w{s}s" for d in ("CIFAR-FS", "FC100", "tieredImageNet", "CUB") for s in (1, 5)]
TASKS = [f"{d} {w}w{s}s" for d, w in DATASET_WAYS for s in (1, 5)]  # the paper table's columns

# Published test accuracy (%, ± 95% CI where given), as in REFERENCE.md's "Published results":
#   MAML, FOMAML: Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation
#     of Deep Networks", ICML 2017 (transductive: batch statistics at meta-test);
#   Reptile: Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018;
#   MAML++: Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019.
# Kept as the paper's text so the table shows each number at its published precision.
PUBLISHED_TABLE = {
    "MAML": "98.7 ± 0.4 | 99.9 ± 0.1 | 95.8 ± 0.3 | 98.9 ± 0.2 | 48.70 ± 1.84 | 63.11 ± 0.92",
    "FOMAML": "98.3 ± 0.5 | 99.2 ± 0.2 | 89.4 ± 0.5 | 97.9 ± 0.1 | 48.07 ± 1.75 | 63.15 ± 0.91",
    "Reptile": "95.39 ± 0.09 | 98.90 ± 0.10 | 88.14 ± 0.15 | 96.65 ± 0.33 | 47.07 ± 0.26 "
    "| 62.74 ± 0.37",
    "Reptile + transduction": "97.68 ± 0.04 | 99.48 ± 0.06 | 89.43 ± 0.14 | 97.12 ± 0.32 "
    "| 49.97 ± 0.32 | 65.99 ± 0.58",
    "MAML++": "99.47 | 99.93 | 97.65 | 99.33 | 52.15 ± 0.26 | 68.32 ± 0.44",
}
PUBLISHED = {
    (method, task): text.strip()
    for method, row in PUBLISHED_TABLE.items()
    for task, text in zip(TASKS, row.split("|"), strict=True)
}
# Cells of the other benchmarks, each with its source. ANIL's rows (Raghu et al. 2020) are
# not shown: the numbers once here were unchecked, and later tables quote others.
PUBLISHED |= {
    # MAML (32 filters) as run by Bertinetto et al., "Meta-learning with differentiable
    # closed-form solvers", ICLR 2019, Table 1 (quoted the same in Lee et al. 2019, Table 2)
    ("MAML", "CIFAR-FS 5w1s"): "58.9 ± 1.9",
    ("MAML", "CIFAR-FS 5w5s"): "71.5 ± 1.0",
    # Li et al., "Meta-SGD", 2017, miniImageNet table, as quoted in later papers' tables
    # (its Omniglot cells are not shown: not checked against a source)
    ("Meta-SGD", "MiniImageNet 5w1s"): "50.47 ± 1.87",
    ("Meta-SGD", "MiniImageNet 5w5s"): "64.03 ± 0.94",
}
TASKS += MORE_TASKS  # the table's column order; new benchmarks after the paper table's
# The published row of each algorithm label and batch-norm mode at test. MAML, FOMAML and
# MAML++ were published transductive only.
PAPER_METHOD = {
    ("maml", "transductive"): "MAML", ("fomaml", "transductive"): "FOMAML",
    ("mamlpp", "transductive"): "MAML++",
    ("reptile", "support_plus_query"): "Reptile", ("reptile", "transductive"): "Reptile + transduction",
    ("anil", "transductive"): "ANIL", ("metasgd", "transductive"): "Meta-SGD",
}  # fmt: skip
METHODS = ["maml", "fomaml", "reptile", "mamlpp"]  # the table's order; others after
BN_SHOWN = {
    "transductive": "transductive",
    "support_plus_query": "support + query",
    "running": "running stats",
}

# acc_mean/acc_std/ci95_mean: the headline test number (results.json's test.acc: the
# ensemble under eval.test_from=best, else the last parameters); then each of the two.
CSV_COLUMNS = [
    "method", "task", "bn_eval", "source", "overrides", "seeds", "acc_mean", "acc_std",
    "ci95_mean", "single_acc_mean", "single_acc_std", "single_ci95_mean", "ensemble_k",
    "ensemble_acc_mean", "ensemble_acc_std", "ensemble_ci95_mean", "paper_acc", "paper_ci95",
    "delta", "val_reached_paper_at", "iterations", "wall_time_s", "s_per_iter", "status",
]  # fmt: skip
MD_COLUMNS = [
    "method", "task", "BN at test", "overrides (seed aside)", "seeds", "single acc %",
    "single 95% CI", "ensemble acc %", "ensemble 95% CI", "std over seeds (single/ens.)",
    "paper", "Δ (ours − paper)", "val ≥ paper at (per seed)", "iterations",
    "wall s (mean/seed)", "s / iteration", "status",
]  # fmt: skip


# A preset that is a published table row: conf/experiment/<method>_<dataset>_<W>w<S>s.yaml.
PRESET_ROW = re.compile(r"[a-z_]+_(omniglot|miniimagenet)_\d+w\d+s")


def published_preset(overrides: list[str]) -> str | None:
    """The published-row preset a run was made with, if its maths is that preset's: an
    `experiment=<row>` override and no other override that changes what is computed
    (seed and metatrain/keys.py's non-maths keys aside). Else None: a quickstart run,
    a partial budget or any changed key is not the published row, and gets no number."""
    presets = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "experiment"]
    if len(presets) != 1 or not PRESET_ROW.fullmatch(presets[0]):
        return None
    others = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] != "experiment"]
    if any(not is_non_math(k) and k.lstrip("+~") != "seed" for k in others):
        return None
    return presets[0]


def paper_method(label: str, bn: str) -> str | None:
    """The published table row that a run with this label and test BN mode reproduces."""
    return PAPER_METHOD.get((label, bn_eval_mode(bn)))


def published(label: str, bn: str, task: str) -> str | None:
    """The published number (text) for an algorithm label, test BN mode and task."""
    return PUBLISHED.get((paper_method(label, bn), task))


def task_name(cfg: dict, ways=None, shots=None) -> str:
    ds = cfg.get("dataset") or {}
    ways, shots = ways or ds.get("ways"), shots or ds.get("shots")
    return f"{DATASETS.get(ds.get('name'), ds.get('name'))} {ways}w{shots}s"


def paper_numbers(text: str | None) -> tuple[float | None, float | None]:
    acc, _, ci = (text or "").partition("±")
    return float(acc) if acc else None, float(ci) if ci else None


def row_key(cfg: dict) -> str:
    """The config minus seed and the keys that do not change the maths, as text: cells
    with equal keys computed the same thing (seed aside) and share a row."""
    cfg = json.loads(json.dumps(cfg, default=str))  # a deep copy to prune
    return json.dumps(drop_non_math(cfg, extra=("seed",)), sort_keys=True)


def shown_overrides(overrides: list[str]) -> str:
    """A cell's command-line overrides that change what it computes, seed aside."""
    return " ".join(
        o
        for o in overrides
        if not is_non_math(k := o.split("=", 1)[0]) and k.lstrip("+~") != "seed"
    )


def test_numbers(test: dict) -> dict:
    """Headline, single and ensemble numbers of a test block. A block written before both
    were recorded has the headline only: it is the single model when it had one member."""
    one = len(test.get("members") or []) <= 1
    single = test.get("single") or ({"acc": test["acc"], "ci95": test["ci95"]} if one else {})
    k = len(test.get("members") or [None])
    ens = test.get("ensemble") or {"acc": test["acc"], "ci95": test["ci95"], "k": k}
    return {"acc": test["acc"], "ci95": test["ci95"], "single_acc": single.get("acc"),
            "single_ci95": single.get("ci95"), "ensemble_acc": ens.get("acc"),
            "ensemble_ci95": ens.get("ci95"), "ensemble_k": ens.get("k")}  # fmt: skip


def _finished(results: dict) -> dict:
    return {"status": "finished", **test_numbers(results["test"]),
            "wall": results.get("wall_time_s"), "iterations": results.get("iterations"),
            "done": results.get("iterations")}  # fmt: skip


def outcome(cell: Path, total: int | None) -> dict:
    """Status and numbers of one cell: finished, failed, or how far it got."""
    try:
        return _finished(json.loads((cell / "results.json").read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        return {"status": "failed: results.json unreadable"}
    if (cell / "error.txt").exists():
        lines = (cell / "error.txt").read_text(errors="replace").strip().splitlines()
        return {"status": f"failed: {lines[0] if lines else '(empty error.txt)'}"}
    last = cell / "checkpoints" / "last.pt"
    if not last.exists():
        return {"status": "unfinished (not started)"}
    import torch  # only here: loading torch costs seconds

    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable checkpoint means the same here
        return {"status": "unfinished (checkpoint unreadable)"}
    if state.get("results"):  # finished, and the final checkpoint keeps the results too
        return _finished(state["results"])
    return {"status": f"unfinished (iteration {state['iteration']} of {total})",
            "wall": state.get("wall_time_s"), "done": state["iteration"]}  # fmt: skip


def read_cell(cell: Path) -> dict:
    try:
        cfg = yaml.safe_load((cell / ".hydra" / "config.yaml").read_text()) or {}
        overrides = yaml.safe_load((cell / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        cfg, overrides = {}, []
    total = (cfg.get("train") or {}).get("iterations")
    run = {"cell": cell, "cfg": cfg, "seed": cfg.get("seed"), "iterations": total,
           "overrides": shown_overrides(overrides), "wall": None, "source": "run",
           "preset": published_preset(overrides),
           "task": task_name(cfg), "bn": bn_mode(cfg), "method": algorithm_label(cfg)}  # fmt: skip
    run.update({k: v for k, v in outcome(cell, total).items() if v is not None})
    if not cfg:
        run["status"] = "failed: .hydra/config.yaml or overrides.yaml unreadable"
    return run


def keeps_preset(cfg: dict, maths: list[str]) -> bool:
    """Whether an evaluation with these maths overrides is still the run's published row, or
    its twin. No override: the run's own protocol. Only `model.bn_eval`, on a run that tests its
    last parameters: training never reads that key and no checkpoint was chosen under it,
    so the evaluation is what the preset differing in that key alone would report (Reptile
    with and without transduction; tests/test_presets.py checks they differ in nothing
    else). The published number then follows the evaluation's batch-norm mode."""
    if not maths:
        return True
    last = str((cfg.get("eval") or {}).get("test_from", "best")).lower() == "last"
    return last and all(o.split("=", 1)[0].lstrip("+") == "model.bn_eval" for o in maths)


def read_evals(run: dict) -> list[dict]:
    """A run's metatrain-eval results (RUN_DIR/eval/*.json), one pseudo-run each."""
    out = []
    for path in sorted((run["cell"] / "eval").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            p, state = record["protocol"], record["run"]
            numbers = test_numbers(record)
        except (OSError, ValueError, KeyError, TypeError):
            print(f"summarize: warning: {path} unreadable, left out", file=sys.stderr)
            continue
        maths = [o for o in record.get("overrides", []) if not is_non_math(o.split("=")[0])]
        shown = ",".join(maths)
        status = "finished" if state["status"] == "finished" else f"eval at {state['iteration']}"
        out.append({**run, **numbers, "source": f"eval: {path.stem}", "status": status,
                    "preset": run["preset"] if keeps_preset(run["cfg"], maths) else None,
                    "test": record,
                    "overrides": f"{run['overrides']} eval:{shown or 'own'}".strip(),
                    "task": task_name(run["cfg"], p["ways"], p["shots"]), "bn": bn_eval_mode(p["bn_eval"]),
                    "iterations": state["iteration"], "wall": None})  # fmt: skip
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def reached_at(cell: Path, target: float) -> str:
    """The first iteration whose validation accuracy reached `target` (%); "—" if none
    did, "no val" for a run without validation (e.g. Reptile's Omniglot split)."""
    accs = [(r["iteration"], r["val/acc"]) for r in read_metrics(cell) if "val/acc" in r]
    return next((str(i) for i, acc in accs if acc >= target), "—" if accs else "no val")


def make_row(runs: list[dict]) -> dict:
    first = runs[0]
    method, task = first["method"], first["task"]
    paper = published(method, first["bn"], task) if first.get("preset") else None
    paper_acc, paper_ci = paper_numbers(paper)
    row = {"method": method, "task": task, "bn_eval": first["bn"], "source": first["source"],
           "overrides": "; ".join(dict.fromkeys(r["overrides"] for r in runs)),
           "seeds": len(runs), "seed_list": [r["seed"] for r in runs], "paper": paper,
           "paper_acc": paper_acc, "paper_ci95": paper_ci, "iterations": first["iterations"],
           "wall_time_s": _mean([r["wall"] for r in runs]), "status": first["status"],
           "s_per_iter": _mean([r["wall"] / r["done"] for r in runs
                                if r.get("wall") and r.get("done")]),
           "ensemble_k": first.get("ensemble_k")}  # fmt: skip
    for prefix in ("", "single_", "ensemble_"):
        values = [r.get(f"{prefix}acc") for r in runs]
        row[f"{prefix}acc_mean"] = _mean(values)
        row[f"{prefix}acc_std"] = _std(values)
        row[f"{prefix}ci95_mean"] = _mean([r.get(f"{prefix}ci95") for r in runs])
    # How soon a run got there: its validation split against the published test number.
    row["val_reached_paper_at"] = (
        " ".join(reached_at(r["cell"], paper_acc) for r in runs)
        if paper_acc is not None and first["source"] == "run"
        else None
    )
    mean = row["acc_mean"]
    row["delta"] = mean - paper_acc if mean is not None and paper_acc is not None else None
    return row


def build_rows(runs: list[dict]) -> list[dict]:
    """Finished runs grouped by config minus seed; every other run a row of its own."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        finished = run["status"] == "finished"
        key = (row_key(run["cfg"]) if finished else str(run["cell"])) + run["source"]
        groups.setdefault(key, []).append(run)
    for group in groups.values():  # the same seed twice (two sweeps) would shrink the std
        if len({str(r["seed"]) for r in group}) < len(group):
            cells = ", ".join(str(r["cell"]) for r in group)
            print(f"summarize: warning: a seed repeats in {cells}", file=sys.stderr)
    return [make_row(g) for g in groups.values()]


def sort_rows(rows: list[dict], by: str) -> list[dict]:
    def order(row):
        task = TASKS.index(row["task"]) if row["task"] in TASKS else len(TASKS)
        method = METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS)
        return (task, row["task"], method, row["method"], row["source"] != "run",
                row["overrides"], row["status"])  # fmt: skip

    rows = sorted(rows, key=order)
    if by in ("acc", "delta"):  # best first; rows without the number last
        key = "acc_mean" if by == "acc" else by
        rows.sort(key=lambda r: (r[key] is None, -(r[key] or 0)))
    return rows


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def _ci(x: float | None) -> str:
    return "" if x is None else "± " + _fmt(x)


def markdown(rows: list[dict]) -> str:
    """The table; overrides shared by every row go once above it, so each row shows
    only what sets it apart."""
    common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else ()
    shared = [o for o in rows[0]["overrides"].split() if o in common]
    lines = [f"Overrides of every row: `{' '.join(shared)}`\n"] if shared else []
    lines += ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for r in rows:
        own = " ".join(o for o in r["overrides"].split() if o not in common)
        seeds = f"{r['seeds']} ({', '.join(map(str, r['seed_list']))})"
        k = f" (k={r['ensemble_k']})" if r["ensemble_acc_mean"] is not None else ""
        std = [_fmt(r["single_acc_std"]), _fmt(r["ensemble_acc_std"])]
        cells = [r["method"], r["task"], BN_SHOWN.get(r["bn_eval"], r["bn_eval"]), own, seeds,
                 _fmt(r["single_acc_mean"]), _ci(r["single_ci95_mean"]),
                 _fmt(r["ensemble_acc_mean"]) + k, _ci(r["ensemble_ci95_mean"]),
                 " / ".join(std) if any(std) else "", r["paper"] or "",
                 _fmt(r["delta"], "+.2f"), r["val_reached_paper_at"] or "",
                 _fmt(r["iterations"], "d"),
                 _fmt(r["wall_time_s"], ".1f"), _fmt(r["s_per_iter"], ".3f"),
                 r["status"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            # Four decimals: far below any CI, and the file stays readable.
            cells = {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in CSV_COLUMNS}
            writer.writerow({k: "" if v is None else v for k, v in cells.items()})


def fail(message: str) -> int:
    print(f"summarize: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "sweep_dir", type=Path, metavar="SWEEP_DIR", help="a sweep folder, or any folder of them"
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="write summary.md/.csv here (default SWEEP_DIR)"
    )
    parser.add_argument("--sort", choices=["task", "acc", "delta"], default="task",
                        help="row order: by task then method (default), or best acc/delta first")  # fmt: skip
    parser.add_argument("--evals", action="store_true",
                        help="add a row per metatrain-eval protocol (RUN_DIR/eval/*.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        return fail(f"{args.sweep_dir} is not a directory")
    cells = sorted({p.parent.parent for p in args.sweep_dir.rglob(".hydra/config.yaml")})
    if not cells:
        return fail(f"no sweep cells (folders with .hydra/config.yaml) under {args.sweep_dir}")
    runs = [read_cell(c) for c in cells]
    if args.evals:
        runs += [e for r in runs for e in read_evals(r)]
    rows = sort_rows(build_rows(runs), args.sort)
    table = markdown(rows)
    print(table, end="")
    out = args.out or args.sweep_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(table)
        write_csv(rows, out / "summary.csv")
    except OSError as e:
        return fail(f"cannot write to {out} ({e.strerror}); choose another folder with --out DIR")
    print(f"wrote {out / 'summary.md'} and {out / 'summary.csv'}", file=sys.stderr)
    print(f"figures: metatrain-plot {args.sweep_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
