"""scripts/summarize.py: sweep cells written by hand in tmp folders (milliseconds), plus one
real tiny sweep through the CLI (slow)."""

import csv
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from metatrain.naming import algorithm_label
from tests.conftest import REPO, run_cli

SCRIPT = REPO / "scripts" / "summarize.py"
spec = importlib.util.spec_from_file_location("summarize", SCRIPT)
summarize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize)

SWITCHES = ("msl", "da", "bnrs", "bnwb", "lslr", "ca")


PP = dict.fromkeys(("msl", "bnwb", "lslr", "ca"), True)  # MAML++ as its authors ran it


def config(algorithm="maml", dataset="omniglot", ways=5, shots=1, seed=0, bn_eval="batch", **algo):
    """A composed config as Hydra writes it to .hydra/config.yaml, reduced to what matters."""
    switches = {s: False for s in SWITCHES} if algorithm == "maml" else {}
    a = {"name": algorithm, "first_order": False, **switches, **algo}
    return {
        "algorithm": a,
        "dataset": {"name": dataset, "ways": ways, "shots": shots, "root": None},
        "model": {"name": "conv4", "filters": 64, "bn_eval": bn_eval},
        "train": {"iterations": 1000, "log_interval": 100},
        "eval": {"seed": 1234, "batch": 50},
        "logger": {"name": "none"},
        "seed": seed,
        "device": "auto",
        "sweep_name": "s",
    }


def cell(root, overrides, cfg, acc=None, ci95=0.5, wall=10.0, error=None, iteration=None):
    """A sweep cell folder: finished when acc is given, failed with error, else unfinished
    (with a last.pt at `iteration` when given)."""
    path = root / ",".join(sorted(overrides))
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if acc is not None:
        test = {"acc": acc, "ci95": ci95, "tasks": 600, "members": [1000]}
        results = {"status": "finished", "test": test, "iterations": 1000, "wall_time_s": wall}
        (path / "results.json").write_text(json.dumps({**results, "config": cfg}))
    if error is not None:
        (path / "error.txt").write_text(error)
    if iteration is not None:
        (path / "checkpoints").mkdir()
        torch.save({"iteration": iteration, "wall_time_s": 3.0}, path / "checkpoints" / "last.pt")
    return path


def summary(root, *args):
    """Run main() in-process and return its rows read back from summary.csv."""
    assert summarize.main([str(root), *args]) == 0
    out = root if "--out" not in args else args[args.index("--out") + 1]
    with open(f"{out}/summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_seeds_of_one_config_form_one_row_with_mean_and_sample_std(tmp_path):
    for seed, acc, ci in [(0, 90.0, 0.4), (1, 92.0, 0.5), (2, 97.0, 0.6)]:
        ovr = ["experiment=x", f"seed={seed}", "logger=none", "device=cpu"]
        cell(tmp_path, ovr, config(seed=seed), acc=acc, ci95=ci, wall=10.0 * (seed + 1))
    cell(tmp_path, ["algorithm.lslr=true", "seed=0"], config(lslr=True), acc=50.0)
    rows = summary(tmp_path)
    assert len(rows) == 2
    three = next(r for r in rows if r["seeds"] == "3")
    # mean 93; deviations -3, -1, 4: sample variance 26 / 2 = 13
    assert float(three["acc_mean"]) == pytest.approx(93.0)
    assert float(three["acc_std"]) == pytest.approx(math.sqrt(13), abs=1e-4)
    assert float(three["ci95_mean"]) == pytest.approx(0.5)
    assert float(three["wall_time_s"]) == pytest.approx(20.0)
    assert three["overrides"] == "experiment=x"  # seed and non-maths keys aside
    one = next(r for r in rows if r["seeds"] == "1")
    assert one["acc_std"] == "" and one["method"] == "maml+lslr"


@pytest.mark.parametrize(
    "cfg, name, paper",
    [
        (config("reptile", bn_eval="support_plus_query"), "reptile", "Reptile"),
        # the authors' non-transductive test is support plus one query, not running statistics
        (config("reptile", bn_eval="running"), "reptile", None),
        (config("reptile", bn_eval="batch"), "reptile", "Reptile + transduction"),
        (config(), "maml", "MAML"),
        (config(bn_eval="running"), "maml", None),  # MAML was published transductive only
        (config(first_order=True), "fomaml", "FOMAML"),
        # MAML++ as its authors ran it: msl, bnwb, lslr, ca; no da (second order from
        # epoch 0); on MiniImageNet a constant meta rate (no ca)
        (config(**PP), "mamlpp", "MAML++"),
        (config("maml", "miniimagenet", **{**PP, "ca": False}), "mamlpp", "MAML++"),
        (config("maml", "miniimagenet", **PP), "mamlpp+ca", None),
        (config(lslr=True, msl=True), "maml+msl+lslr", None),
        (config(first_order=True, lslr=True), "fomaml+lslr", None),
        (config(**dict.fromkeys(SWITCHES, True)), "mamlpp+da", None),  # the paper's DA
        (config(**{**PP, "ca": False}), "mamlpp-ca", None),
        (config(**{**PP, "ca": False, "da": True}), "mamlpp-ca+da", None),
        (config(**PP, first_order=True), "mamlpp+first_order", None),
        (config(msl=True, da=True, bnrs=True, bn_eval="running"), "maml+msl+da+bnrs", None),  # tie
        # bnrs counts only where evaluation reads running statistics
        (config(**{**PP, "bnrs": True}), "mamlpp", "MAML++"),
        (config(**{**PP, "bnrs": True}, bn_eval="running"), "mamlpp+bnrs", None),
        (config(**PP, bn_eval="running"), "mamlpp", None),  # published transductive only
        (config(msl=True, bnrs=True, bn_eval="running"), "maml+msl+bnrs", None),
        (config(msl=True, bnrs=True), "maml+msl", None),
    ],
)
def test_method_label_and_published_row(cfg, name, paper):
    assert algorithm_label(cfg) == name
    assert summarize.paper_method(name, cfg["model"]["bn_eval"]) == paper


def test_task_name():
    assert summarize.task_name(config(ways=20, shots=5)) == "Omniglot 20w5s"
    assert summarize.task_name(config(dataset="miniimagenet", shots=5)) == "MiniImageNet 5w5s"
    assert summarize.task_name(config(dataset="cifarfs", shots=5)) == "CIFAR-FS 5w5s"
    assert summarize.published("maml", "batch", "CIFAR-FS 5w1s") == "58.9 ± 1.9"
    assert summarize.published("anil", "batch", "MiniImageNet 5w1s") is None  # no source
    assert summarize.TASKS.index("CUB 5w5s") > summarize.TASKS.index("MiniImageNet 5w5s")


def test_reproduced_row_shows_the_published_number_and_the_difference(tmp_path):
    cell(tmp_path, ["experiment=maml_omniglot_5w1s", "seed=0"], config(), acc=97.5)
    cell(tmp_path, ["experiment=maml_omniglot_5w1s", "seed=1", "logger=none"], config(seed=1),
         acc=98.1)  # fmt: skip
    pp = config(ways=20, **PP)
    cell(tmp_path, ["experiment=mamlpp_omniglot_20w1s"], pp, acc=97.0)
    cell(tmp_path, ["algorithm.msl=true"], config(msl=True), acc=97.0)
    rows = {r["method"]: r for r in summary(tmp_path)}
    maml = rows["maml"]
    assert (maml["task"], maml["paper_acc"], maml["paper_ci95"]) == ("Omniglot 5w1s", "98.7", "0.4")
    assert float(maml["delta"]) == pytest.approx(97.8 - 98.7)
    mamlpp = rows["mamlpp"]
    assert (mamlpp["paper_acc"], mamlpp["paper_ci95"]) == ("97.65", "")  # published without CI
    assert float(mamlpp["delta"]) == pytest.approx(-0.65)
    assert rows["maml+msl"]["paper_acc"] == rows["maml+msl"]["delta"] == ""
    table = (tmp_path / "summary.md").read_text()
    assert "| 98.7 ± 0.4 | -0.90 |" in table and "| 97.65 | -0.65 |" in table


def test_first_iteration_whose_validation_reached_the_published_number(tmp_path):
    def curve(path, accs):  # a partial last line, as a killed writer leaves, is skipped
        rows = [{"iteration": 100 * (i + 1), "val/acc": a} for i, a in enumerate(accs)]
        rows.insert(1, {"iteration": 150, "train/acc": 99.9})  # a train row: not validation
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (path / "metrics.jsonl").write_text(text + '{"iteration": 9')

    row = "experiment=maml_omniglot_5w1s"
    curve(cell(tmp_path, [row, "seed=0"], config(), acc=98.0), [97.0, 98.6, 98.7, 98.2])
    curve(cell(tmp_path, [row, "seed=1"], config(seed=1), acc=98.0), [97.0, 98.69])
    curve(cell(tmp_path, ["experiment=quickstart"], config(msl=True), acc=90.0), [99.0])
    reptile = config("reptile", bn_eval="support_plus_query")
    curve(cell(tmp_path, ["experiment=reptile_omniglot_5w1s"], reptile, acc=95.0), [])
    rows = {r["method"]: r for r in summary(tmp_path)}
    assert rows["maml"]["val_reached_paper_at"] == "300 —"  # 98.7 first met at 300; never
    assert rows["reptile"]["val_reached_paper_at"] == "no val"  # it logged no validation
    assert rows["maml+msl"]["val_reached_paper_at"] == ""  # no published number to reach
    assert "| 98.7 ± 0.4 | -0.70 | 300 — |" in (tmp_path / "summary.md").read_text()


def test_published_numbers_only_beside_a_published_rows_config(tmp_path):
    row = "experiment=maml_omniglot_5w1s"
    cases = {
        "a": ([row, "seed=0", "device=cpu", "train.backend=loop"], "98.7"),  # maths unchanged
        "b": (["experiment=quickstart"], ""),  # not a table row
        "c": ([row, "train.iterations=20"], ""),  # a partial budget
        "d": ([row, "model.filters=32"], ""),  # another network
        "e": (["algorithm=maml"], ""),  # no preset at all
    }
    for name, (overrides, paper) in cases.items():
        cell(tmp_path / name, overrides, config(), acc=90.0)
        (only,) = summary(tmp_path / name)
        assert only["paper_acc"] == paper, name
    assert summarize.published_preset([row, "seed=3", "logger=wandb", "logger.mode=online"])
    assert summarize.published_preset([row, "+algorithm.lslr=true"]) is None


def test_unfinished_and_failed_cells_are_rows_of_their_own(tmp_path):
    cell(tmp_path, ["seed=0"], config(), acc=97.0)
    cell(tmp_path, ["experiment=maml_omniglot_5w1s", "seed=1"], config(seed=1), iteration=250)
    cell(tmp_path, ["seed=2"], config(seed=2))
    cell(tmp_path, ["seed=3"], config(seed=3), error="dataset.queries=0: no queries\nmore\n")
    rows = summary(tmp_path)
    assert sorted(r["status"] for r in rows) == [
        "failed: dataset.queries=0: no queries",
        "finished",
        "unfinished (iteration 250 of 1000)",
        "unfinished (not started)",
    ]
    assert all(r["seeds"] == "1" for r in rows)
    # results.json lost: the final checkpoint, which keeps the results too, still counts
    done = cell(tmp_path, ["seed=4"], config(seed=4), iteration=1000)
    test = {"acc": 99.0, "ci95": 0.2}
    torch.save({"iteration": 1000, "results": {"test": test}}, done / "checkpoints" / "last.pt")
    rows = summary(tmp_path)
    assert next(r for r in rows if r["status"] == "finished")["seeds"] == "2"
    unfinished = next(r for r in rows if r["status"].startswith("unfinished (it"))
    assert unfinished["acc_mean"] == "" and unfinished["paper_acc"] == "98.7"
    # training seconds per iteration reached: 3.0 s over 250; 10 s over 1,000 (the
    # checkpoint-only seed kept no wall time and is left out of the mean)
    assert float(unfinished["s_per_iter"]) == pytest.approx(3.0 / 250)
    finished = next(r for r in rows if r["status"] == "finished")
    assert float(finished["s_per_iter"]) == pytest.approx(10.0 / 1000)


def test_writes_markdown_and_csv_and_prints_the_table(tmp_path, capsys):
    sweep, out = tmp_path / "sweep", tmp_path / "elsewhere"
    cell(sweep / "a", ["seed=0", "algorithm.lslr=true"], config(lslr=True), acc=62.0)
    cell(sweep / "b", ["seed=0", "algorithm.lslr=false"], config(), acc=61.0)
    rows = summary(sweep, "--out", str(out))
    assert not (sweep / "summary.md").exists()  # --out: the sweep itself is left alone
    assert list(rows[0]) == summarize.CSV_COLUMNS and [r["method"] for r in rows] == [
        "maml",
        "maml+lslr",
    ]
    table = (out / "summary.md").read_text()
    assert table in capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "std over seeds" in header and "single 95% CI" in header and "BN at test" in header
    row = "| maml+lslr | Omniglot 5w1s | transductive | algorithm.lslr=true | 1 (0) | 62.00 |"
    assert row + " ± 0.50 | 62.00 (k=1) | ± 0.50 |" in table
    by_acc = summary(sweep, "--sort", "acc", "--out", str(out))
    assert [r["method"] for r in by_acc] == ["maml+lslr", "maml"]


def test_missing_or_empty_sweep_dir_is_a_one_line_error(tmp_path, capsys):
    assert summarize.main([str(tmp_path)]) == 2  # empty
    assert summarize.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("summarize: error: ") for line in err)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stdout == ""


@pytest.mark.slow
def test_real_tiny_sweep(omniglot_data, tmp_path):
    tiny = ["logger=none", "model.filters=8", "algorithm.meta_batch=2", "dataset.queries=2"]
    tiny += ["train.iterations=4", "train.val_interval=2", "eval.val_tasks=4"]
    tiny += ["eval.test_tasks=8", "seed=0,1", "algorithm.lslr=true,false"]
    sweep = tmp_path / "sweep"
    out = run_cli("-m", *tiny, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = summary(sweep)
    assert [(r["method"], r["seeds"], r["status"]) for r in rows] == [
        ("maml", "2", "finished"),
        ("maml+lslr", "2", "finished"),
    ]
    assert rows[0]["paper_acc"] == "" and rows[0]["delta"] == ""  # 4 iterations: no paper row
    assert all(0 <= float(r["acc_mean"]) <= 100 and r["iterations"] == "4" for r in rows)
    assert "algorithm.lslr=False" in (sweep / "summary.md").read_text()


def both_numbers(path, single, ensemble, k=3, ci=(0.5, 0.4)):
    """Give a cell's results.json (or an eval record) single and ensemble numbers."""
    data = json.loads(path.read_text())
    block = data.get("test", data)
    block["single"] = {"acc": single, "ci95": ci[0], "tasks": 600, "checkpoint": 900}
    block["ensemble"] = {"acc": ensemble, "ci95": ci[1], "tasks": 600, "k": k, "members": [900]}
    block["acc"], block["ci95"] = ensemble, ci[1]
    path.write_text(json.dumps(data))


def test_single_and_ensemble_columns_and_evaluation_rows(tmp_path):
    pp = config(**PP)
    for seed, (single, ens) in enumerate([(96.0, 97.0), (98.0, 99.0)]):
        row = "experiment=mamlpp_omniglot_5w1s"
        c = cell(tmp_path, [f"seed={seed}", row], {**pp, "seed": seed}, acc=ens)
        both_numbers(c / "results.json", single, ens)
        # Two metatrain-eval protocols per seed; the second with fewer ways.
        (c / "eval").mkdir()
        for name, ways, bn, shift in [
            ("default", 5, "batch", 0.0),
            ("dataset.ways=3", 3, "running", 1.0),
        ]:
            record = {"acc": 0, "ci95": 0, "tasks": 600, "members": [900], "bn_eval": bn,
                      "overrides": [] if name == "default" else [name, "device=cpu"],
                      "protocol": {"ways": ways, "shots": 1, "bn_eval": bn},
                      "run": {"status": "finished", "iteration": 1000}}  # fmt: skip
            (c / "eval" / f"{name}.json").write_text(json.dumps(record))
            both_numbers(c / "eval" / f"{name}.json", single + shift, ens + shift)
    rows = summary(tmp_path)
    assert len(rows) == 1  # evaluations only with --evals
    row = rows[0]
    # "batch", the former spelling in these records, reads as transductive
    assert (row["method"], row["bn_eval"], row["seeds"], row["ensemble_k"]) == (
        "mamlpp",
        "transductive",
        "2",
        "3",
    )
    assert float(row["single_acc_mean"]) == pytest.approx(97.0)
    assert float(row["ensemble_acc_mean"]) == pytest.approx(98.0)
    assert float(row["single_acc_std"]) == pytest.approx(math.sqrt(2), abs=1e-4)
    assert float(row["single_ci95_mean"]) == pytest.approx(0.5)
    assert float(row["delta"]) == pytest.approx(98.0 - 99.47)  # the ensemble, as MAML++ reports
    rows = {r["source"]: r for r in summary(tmp_path, "--evals")}
    assert set(rows) == {"run", "eval: default", "eval: dataset.ways=3"}
    three = rows["eval: dataset.ways=3"]
    assert (three["task"], three["bn_eval"], three["seeds"]) == ("Omniglot 3w1s", "running", "2")
    assert float(three["single_acc_mean"]) == pytest.approx(98.0)
    assert three["overrides"] == "experiment=mamlpp_omniglot_5w1s eval:dataset.ways=3"
    assert three["paper_acc"] == ""  # 3 ways: no published row
    assert rows["eval: default"]["ensemble_acc_mean"] == rows["run"]["ensemble_acc_mean"]
    assert rows["eval: default"]["paper_acc"] == "99.47"  # the run's own protocol
    assert "running stats" in (tmp_path / "summary.md").read_text()


def test_an_evaluation_changing_only_bn_eval_is_the_twin_presets_published_row(tmp_path):
    """Reptile's final weights re-tested transductively are the reptile_transductive row:
    training never reads model.bn_eval and no checkpoint was chosen under it."""

    def evaluation(c, name, overrides, bn, acc):
        record = {"acc": acc, "ci95": 0.3, "tasks": 10000, "members": [100000], "bn_eval": bn,
                  "overrides": overrides, "protocol": {"ways": 5, "shots": 1, "bn_eval": bn},
                  "run": {"status": "finished", "iteration": 100000}}  # fmt: skip
        (c / "eval").mkdir(exist_ok=True)
        (c / "eval" / f"{name}.json").write_text(json.dumps(record))

    last = {**config("reptile", bn_eval="support_plus_query"), "eval": {"test_from": "last"}}
    c = cell(tmp_path / "last", ["experiment=reptile_omniglot_5w1s"], last, acc=95.0)
    evaluation(c, "bn", ["model.bn_eval=transductive", "device=cpu"], "transductive", 97.5)
    evaluation(c, "bn+tasks", ["model.bn_eval=transductive", "eval.test_tasks=1000"],
               "transductive", 97.4)  # fmt: skip
    rows = {r["source"]: r for r in summary(tmp_path / "last", "--evals")}
    assert rows["run"]["paper_acc"] == "95.39"  # Reptile, non-transductive
    assert (rows["eval: bn"]["bn_eval"], rows["eval: bn"]["paper_acc"]) == ("transductive", "97.68")
    assert float(rows["eval: bn"]["delta"]) == pytest.approx(97.5 - 97.68)
    assert rows["eval: bn+tasks"]["paper_acc"] == ""  # 1,000 tasks: not the preset's test
    # Under test_from=best the checkpoint was chosen by validation under the run's own
    # batch-norm mode: the other mode's preset could have chosen another one.
    best = {**last, "eval": {"test_from": "best"}}
    c = cell(tmp_path / "best", ["experiment=reptile_omniglot_5w1s"], best, acc=95.0)
    evaluation(c, "bn", ["model.bn_eval=transductive"], "transductive", 97.5)
    rows = {r["source"]: r for r in summary(tmp_path / "best", "--evals")}
    assert rows["eval: bn"]["paper_acc"] == ""
