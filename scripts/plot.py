"""Figures of metatrain runs from the files on disk (no W&B needed).

    metatrain-plot SWEEP_OR_RUN_DIR [...] [--out DIR]     (or python scripts/plot.py ...)

A run is any folder holding .hydra/config.yaml (as in summarize.py). Runs whose
configs differ only in `seed` (and keys that do not change the maths) are one
configuration, named in the legends by its command-line overrides.

- curves.png: validation accuracy, training accuracy and training loss against
  meta-iteration from each run's metrics.jsonl, one line per configuration: the mean over its seeds,
  with a band from the lowest to the highest seed.
- test_accuracy.png (when some run has finished): test accuracy per configuration,
  the mean over seeds with the mean per-run 95% confidence interval (over test
  tasks) as the error bar, each seed as a dot, the published number as a red
  mark where the configuration is a published table row, and the single model
  beside the top-k ensemble where the run tested both. With --evals, each
  metatrain-eval protocol of the runs (RUN_DIR/eval/*.json) is a bar of its own,
  as in summarize.py --evals (e.g. Reptile's final weights tested transductively).

Both go into the first directory given, or --out DIR.
"""

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path

from metatrain.scripts import summarize  # config grouping, names, published numbers

try:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover - depends on the environment
    plt = None

CURVES, BARS = "curves.png", "test_accuracy.png"


def read_rows(path: Path) -> list[dict]:
    """metatrain.metrics.read_metrics without importing the package (and torch):
    whole JSON lines only, a killed writer's partial last line skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "iteration" in row:
                rows.append(row)
    return rows


def load_runs(dirs: list[Path], evals: bool = False) -> list[dict]:
    """The runs under `dirs`; with `evals`, also one pseudo-run per metatrain-eval record,
    which has a test block and no curve."""
    cells = sorted({p.parent.parent for d in dirs for p in d.rglob(".hydra/config.yaml")})
    runs = [summarize.read_cell(c) for c in cells]
    for run in runs:
        run["metrics"] = read_rows(run["cell"] / "metrics.jsonl")
        try:
            run["test"] = json.loads((run["cell"] / "results.json").read_text())["test"]
        except (OSError, ValueError, KeyError):
            run["test"] = None
    if evals:
        runs += [{**e, "metrics": []} for r in runs for e in summarize.read_evals(r)]
    return runs


def group(runs: list[dict]) -> tuple[list[dict], str]:
    """Configurations: runs sharing a config (seed aside), each with a legend label of
    its own overrides (those shared by every configuration go into the title)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(summarize.row_key(run["cfg"]) + run["source"], []).append(run)
    configs = [{"runs": g, "overrides": g[0]["overrides"].split()} for g in groups.values()]
    common = (
        set.intersection(*(set(c["overrides"]) for c in configs)) if len(configs) > 1 else set()
    )
    for c in configs:
        # An evaluation is named as its run, then its protocol ("eval:..."), and sorts
        # just after it.
        own = " ".join(o for o in c["overrides"] if o not in common and not o.startswith("eval:"))
        protocol = " ".join(o for o in c["overrides"] if o.startswith("eval:"))
        # task and batch norm from the run, or from an evaluation's own protocol
        c["method"], c["task"], c["bn"] = (c["runs"][0][k] for k in ("method", "task", "bn"))
        c["preset"] = c["runs"][0].get("preset")  # a published row's config, or None
        c["base"] = own or c["method"]
        c["label"] = f"{c['base']} {protocol}".strip()
        c["seeds"] = len(c["runs"])
    shared = [o for o in configs[0]["overrides"] if o in common] if configs else []
    return sorted(configs, key=lambda c: (c["base"], c["label"])), " ".join(shared)


def _series(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per iteration over the seeds that logged `key` there: mean, lowest, highest."""
    by_it: dict[int, list[float]] = {}
    for run in runs:
        for row in run["metrics"]:
            if row.get(key) is not None:
                by_it.setdefault(row["iteration"], []).append(float(row[key]))
    its = sorted(by_it)
    vals = [by_it[i] for i in its]
    return its, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_curves(configs: list[dict], shared: str, path: Path):
    width = 15
    fig, axes = plt.subplots(1, 3, figsize=(width, 4.2), sharex=True)
    panels = [
        ("val/acc", "validation accuracy (%)"),
        # after adaptation: MAML's kin on the query set, Reptile on its last inner
        # minibatch; the one curve of a run without validation (Reptile's Omniglot)
        ("train/acc", "training accuracy (%)"),
        ("train/loss", "training loss (cross-entropy)"),
    ]
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for c in configs:
            its, mean, lo, hi = _series(c["runs"], key)
            if not its:
                continue
            seeds = f" ({c['seeds']} seeds)" if c["seeds"] > 1 else ""
            (line,) = ax.plot(
                its, mean, marker="." if len(its) < 30 else None, label=c["label"] + seeds
            )
            if c["seeds"] > 1:
                ax.fill_between(its, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("Validation accuracy (mean over seeds; band: min to max)", fontsize=10)
    axes[1].set_title("Training accuracy, adapted (mean over each log interval)", fontsize=10)
    axes[2].set_title("Training loss (mean over each log interval)", fontsize=10)
    entries = {}  # label -> handle, over both panels: a run may have no validation yet
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    labels, handles = sorted(entries), [entries[x] for x in sorted(entries)]
    # As many legend columns as the longest label allows across the figure's width.
    ncol = max(1, min(len(labels), 14 * width // max((len(x) for x in labels), default=1)))
    rows = -(-len(labels) // ncol)
    fig.set_figheight(4.2 + 0.2 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.suptitle(_title("Learning curves", shared, width), fontsize=10)
    fig.tight_layout(rect=(0, (0.1 + 0.2 * rows) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    return fig


def _bars_of(c: dict) -> list[dict]:
    """One bar per test protocol the runs share: 'single'/'ensemble' when the runs
    tested both with a real ensemble (k > 1), else the headline number."""
    tests = [r["test"] for r in c["runs"] if r["test"]]
    if not tests:
        return []
    kinds = [("", None)]
    if all("ensemble" in t and t["ensemble"].get("k", 1) > 1 for t in tests):
        kinds = [("single", "single"), (f"ensemble of {tests[0]['ensemble']['k']}", "ensemble")]
    bars = []
    for name, field in kinds:
        blocks = [t[field] if field else t for t in tests]
        accs = [b["acc"] for b in blocks]
        ci = statistics.fmean(b["ci95"] for b in blocks)
        bars.append({"kind": name, "mean": statistics.fmean(accs), "accs": accs, "ci95": ci})
    return bars


def plot_bars(configs: list[dict], shared: str, path: Path):
    rows = [(c, b) for c in configs for b in _bars_of(c)]
    # Tick labels: one override a line, so long configurations stay readable.
    names = ["\n".join(c["label"].split() + [b["kind"]] * bool(b["kind"])) for c, b in rows]
    lines = max((n.count("\n") + 1 for n in names), default=1)
    width = max(
        8.0, 0.07 * max((len(x) for n in names for x in n.split("\n")), default=1) * len(rows) + 3
    )
    fig, ax = plt.subplots(figsize=(width, 4.2 + 0.15 * lines))
    xs = range(len(rows))
    colours = {"": "tab:blue", "single": "tab:green"}
    for x, (c, b) in zip(xs, rows, strict=True):
        colour = colours.get(b["kind"], "tab:orange")  # the ensemble
        ax.bar(x, b["mean"], color=colour, alpha=0.8, label=b["kind"] or "test accuracy")
        ax.errorbar(x, b["mean"], yerr=b["ci95"], capsize=4, color="black", linewidth=1,
                    label="95% CI over test tasks")  # fmt: skip
        ax.scatter([x] * len(b["accs"]), b["accs"], color="black", s=12, zorder=3,
                   label="one seed")  # fmt: skip
        published = summarize.published(c["method"], c["bn"], c["task"]) if c["preset"] else None
        paper = summarize.paper_numbers(published)[0]
        if paper is not None:
            ax.hlines(paper, x - 0.4, x + 0.4, color="red", linewidth=2, zorder=4,
                      label="published (full budget)")  # fmt: skip
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    # From zero: a bar's length is its accuracy (an axis starting near the data makes
    # small differences look large); chance level (100 / ways) drawn for reference.
    ax.set_ylim(0, 100)
    for x, (c, _) in zip(xs, rows, strict=True):
        run = c["runs"][0]
        protocol = (run["test"] or {}).get("protocol") or {}  # an evaluation's, if any
        ways = protocol.get("ways") or (run["cfg"].get("dataset") or {}).get("ways")
        if ways:
            ax.hlines(100 / ways, x - 0.4, x + 0.4, color="black", linestyle=":", linewidth=1,
                      zorder=4, label="chance (1 / ways)")  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one legend entry per kind
    ax.legend(
        unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1)
    )
    ax.set_title(_title("Test accuracy per configuration", shared, width), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def _title(what: str, shared: str, width_in: float) -> str:
    """The title, the overrides every configuration shares wrapped below it to the
    figure's width (about 13 characters of 10-point text an inch), so none is clipped."""
    if not shared:
        return what
    return what + "\n" + textwrap.fill(shared, width=max(20, int(11 * width_in)))


def make_figures(dirs: list[Path], out: Path, evals: bool = False) -> dict:
    """Write the figures; returns {file name: matplotlib Figure} for what was drawn."""
    configs, shared = group(load_runs(dirs, evals))
    if not configs:
        raise ValueError(
            f"no runs (folders with .hydra/config.yaml) under {' '.join(map(str, dirs))}"
        )
    out.mkdir(parents=True, exist_ok=True)
    figures = {}
    if any(r["metrics"] for c in configs for r in c["runs"]):
        figures[CURVES] = plot_curves(configs, shared, out / CURVES)
    if any(r["test"] for c in configs for r in c["runs"]):
        figures[BARS] = plot_bars(configs, shared, out / BARS)
    return figures


def fail(message: str) -> int:
    print(f"plot: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", type=Path, nargs="+", metavar="SWEEP_OR_RUN_DIR")
    parser.add_argument("--out", type=Path, metavar="DIR", help="default: the first directory")
    parser.add_argument("--evals", action="store_true",
                        help="a test bar per metatrain-eval protocol (RUN_DIR/eval/*.json)")  # fmt: skip
    args = parser.parse_args(argv)
    if plt is None:
        return fail("matplotlib is missing: pip install 'metatrain[plot]' (make install does)")
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        return fail(f"not a directory: {', '.join(missing)}")
    try:
        figures = make_figures(args.dirs, args.out or args.dirs[0], args.evals)
    except ValueError as e:
        return fail(str(e))
    if not figures:
        return fail("no metrics.jsonl rows and no results.json yet: nothing to plot")
    for name in figures:
        print(f"wrote {(args.out or args.dirs[0]) / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
