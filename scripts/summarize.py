"""Summarise a metatrain sweep: one row per configuration (seeds aggregated) beside the
published numbers.

    python scripts/summarize.py outputs/multirun/<sweep_name> [--out DIR] [--sort KEY]

A cell is any folder under SWEEP_DIR holding .hydra/config.yaml (one sweep, several, or any
tree of runs). Finished cells (results.json) whose configs differ only in `seed` form one row:
mean test accuracy, sample std across seeds, and the mean of the per-run 95% CIs. Unfinished
and failed cells get a row each. The table goes to stdout and to summary.md, the same rows to
summary.csv, both in SWEEP_DIR or in --out DIR.
"""

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

from metatrain.keys import drop_non_math, is_non_math

SWITCHES = ("bnrs", "bnwb", "ca", "da", "lslr", "msl")  # MAML++'s six fixes, in name order
DATASETS = {"omniglot": "Omniglot", "miniimagenet": "MiniImageNet"}
DATASET_WAYS = (("Omniglot", 5), ("Omniglot", 20), ("MiniImageNet", 5))
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
METHODS = list(PUBLISHED_TABLE)

CSV_COLUMNS = [
    "method", "task", "overrides", "seeds", "acc_mean", "acc_std", "ci95_mean", "paper_acc",
    "paper_ci95", "delta", "iterations", "wall_time_s", "status",
]  # fmt: skip
MD_COLUMNS = [
    "method", "task", "overrides (seed aside)", "seeds", "test acc % (mean)", "std over seeds",
    "mean per-run 95% CI", "paper", "Δ (ours − paper)", "iterations", "wall s (mean/seed)",
    "status",
]  # fmt: skip


def method_name(cfg: dict) -> str:
    algo = cfg.get("algorithm") or {}
    if algo.get("name") == "reptile":
        running = (cfg.get("model") or {}).get("bn_eval") == "running"
        return "Reptile" if running else "Reptile + transduction"
    if algo.get("name") != "maml":
        return str(algo.get("name"))
    on = [s for s in SWITCHES if algo.get(s)]
    off = [s for s in SWITCHES if not algo.get(s)]
    first_order = bool(algo.get("first_order"))
    base = "FOMAML" if first_order else "MAML"
    # MAML++ is MAML with all six switches on: name a partial set from the closer base.
    if len(off) + first_order < len(on):
        return " ".join(
            ["MAML++"] + (["− " + ", ".join(off)] if off else []) + ["+ first-order"] * first_order
        )
    return f"{base} + {', '.join(on)}" if on else base


def task_name(cfg: dict) -> str:
    ds = cfg.get("dataset") or {}
    return f"{DATASETS.get(ds.get('name'), ds.get('name'))} {ds.get('ways')}w{ds.get('shots')}s"


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


def _finished(results: dict) -> dict:
    test = results["test"]
    return {"status": "finished", "acc": test["acc"], "ci95": test["ci95"],
            "wall": results.get("wall_time_s"), "iterations": results.get("iterations")}  # fmt: skip


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
            "wall": state.get("wall_time_s")}  # fmt: skip


def read_cell(cell: Path) -> dict:
    try:
        cfg = yaml.safe_load((cell / ".hydra" / "config.yaml").read_text()) or {}
        overrides = yaml.safe_load((cell / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        cfg, overrides = {}, []
    total = (cfg.get("train") or {}).get("iterations")
    run = {"cell": cell, "cfg": cfg, "seed": cfg.get("seed"), "iterations": total,
           "overrides": shown_overrides(overrides), "acc": None, "ci95": None, "wall": None}  # fmt: skip
    run.update({k: v for k, v in outcome(cell, total).items() if v is not None})
    if not cfg:
        run["status"] = "failed: .hydra/config.yaml or overrides.yaml unreadable"
    return run


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def make_row(runs: list[dict]) -> dict:
    first, accs = runs[0], [r["acc"] for r in runs]
    method, task = method_name(first["cfg"]), task_name(first["cfg"])
    finished = first["status"] == "finished"
    paper = PUBLISHED.get((method, task))
    paper_acc, paper_ci = paper_numbers(paper)
    mean = _mean(accs) if finished else None
    return {
        "method": method, "task": task,
        "overrides": "; ".join(dict.fromkeys(r["overrides"] for r in runs)),
        "seeds": len(runs), "seed_list": [r["seed"] for r in runs],
        "acc_mean": mean, "acc_std": statistics.stdev(accs) if finished and len(runs) > 1 else None,
        "ci95_mean": _mean([r["ci95"] for r in runs]), "paper": paper,
        "paper_acc": paper_acc, "paper_ci95": paper_ci,
        "delta": mean - paper_acc if mean is not None and paper_acc is not None else None,
        "iterations": first["iterations"], "wall_time_s": _mean([r["wall"] for r in runs]),
        "status": first["status"],
    }  # fmt: skip


def build_rows(runs: list[dict]) -> list[dict]:
    """Finished runs grouped by config minus seed; every other run a row of its own."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        key = row_key(run["cfg"]) if run["status"] == "finished" else str(run["cell"])
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
        return (task, row["task"], method, row["method"], row["overrides"], row["status"])

    rows = sorted(rows, key=order)
    if by in ("acc", "delta"):  # best first; rows without the number last
        key = "acc_mean" if by == "acc" else by
        rows.sort(key=lambda r: (r[key] is None, -(r[key] or 0)))
    return rows


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


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
        cells = [r["method"], r["task"], own, seeds, _fmt(r["acc_mean"]), _fmt(r["acc_std"]),
                 ("± " + _fmt(r["ci95_mean"])) * (r["ci95_mean"] is not None), r["paper"] or "",
                 _fmt(r["delta"], "+.2f"), _fmt(r["iterations"], "d"),
                 _fmt(r["wall_time_s"], ".1f"), r["status"]]  # fmt: skip
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
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        return fail(f"{args.sweep_dir} is not a directory")
    cells = sorted({p.parent.parent for p in args.sweep_dir.rglob(".hydra/config.yaml")})
    if not cells:
        return fail(f"no sweep cells (folders with .hydra/config.yaml) under {args.sweep_dir}")
    rows = sort_rows(build_rows([read_cell(c) for c in cells]), args.sort)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
