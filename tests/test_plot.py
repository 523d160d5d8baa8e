"""scripts/plot.py on a sweep written by hand: 2 configurations x 2 seeds (no training)."""

import importlib.util
import json

import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("matplotlib")
spec = importlib.util.spec_from_file_location("plot", REPO / "scripts" / "plot.py")
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)


def fake_run(root, algo: dict, overrides: list[str], seed: int, test: dict | None, gain=0.0):
    """A finished run folder as metatrain leaves it: config, overrides, metrics, results."""
    cell = root / ",".join(overrides + [f"seed={seed}"])
    (cell / ".hydra").mkdir(parents=True)
    cfg = {
        "algorithm": {"name": "maml", "first_order": False, **algo},
        "dataset": {"name": "omniglot", "ways": 5, "shots": 1},
        "train": {"iterations": 40},
        "seed": seed,
    }
    (cell / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (cell / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + [f"seed={seed}"]))
    with open(cell / "metrics.jsonl", "w") as f:
        for it in range(10, 50, 10):
            loss = 1.5 - it / 50 + seed / 10 - gain / 20
            row = {"iteration": it, "train/loss": loss, "train/acc": 30 + it + seed}
            f.write(json.dumps(row) + "\n")
            if it % 20 == 0:
                f.write(json.dumps({"iteration": it, "val/acc": 40 + it + seed + gain}) + "\n")
        f.write('{"iteration": 50, "train/lo')  # a killed writer's partial line
    (cell / "results.json").write_text(json.dumps({"test": test}))


def score(acc, ci=1.0):
    return {"acc": acc, "ci95": ci, "tasks": 600}


def test_curves_and_bars_of_two_configs_by_two_seeds(tmp_path):
    for seed in (0, 1):
        # plain MAML: one test number per run
        fake_run(tmp_path, {}, ["experiment=maml_omniglot_5w1s"], seed, score(90.0 + seed))
        # MAML + lslr tested as single model and top-3 ensemble
        both = {
            **score(95.0 + seed),
            "single": score(94.0 + seed),
            "ensemble": {**score(95.0 + seed), "k": 3},
        }
        fake_run(tmp_path, {"lslr": True}, ["experiment=maml_omniglot_5w1s", "algorithm.lslr=true"], seed, both, 5)  # fmt: skip

    figures = plot.make_figures([tmp_path], tmp_path)
    for name in (plot.CURVES, plot.BARS):
        assert (tmp_path / name).stat().st_size > 10_000, name

    val_ax, acc_ax, loss_ax = figures[plot.CURVES].axes
    for ax in (val_ax, acc_ax, loss_ax):
        labels = sorted(line.get_label() for line in ax.get_lines())
        # each configuration named by what its overrides add to the shared ones
        assert labels == ["algorithm.lslr=true (2 seeds)", "maml (2 seeds)"]
        assert len(ax.collections) == 2  # one seed-spread band per configuration
        assert ax.get_xlabel() == "meta-iteration" and ax.get_ylabel()
    assert "experiment=maml_omniglot_5w1s" in figures[plot.CURVES]._suptitle.get_text()
    maml_val = next(line for line in val_ax.get_lines() if line.get_label().startswith("maml"))
    assert list(maml_val.get_xdata()) == [20, 40]
    assert list(maml_val.get_ydata()) == [60.5, 80.5]  # mean of seeds 0 and 1
    maml_loss = next(line for line in loss_ax.get_lines() if line.get_label().startswith("maml"))
    assert list(maml_loss.get_xdata()) == [10, 20, 30, 40]  # the partial line is skipped
    maml_acc = next(line for line in acc_ax.get_lines() if line.get_label().startswith("maml"))
    assert list(maml_acc.get_ydata()) == [40.5, 50.5, 60.5, 70.5]  # train/acc, seeds' mean

    (ax,) = figures[plot.BARS].axes
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([94.5, 95.5, 90.5])  # lslr single, ensemble; MAML
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["algorithm.lslr=true\nsingle", "algorithm.lslr=true\nensemble of 3", "maml"]
    # published MAML 5w1s number (98.7) marked on the plain-MAML bar only
    marks = [c for c in ax.collections if c.get_label() == "published (full budget)"]
    assert len(marks) == 1 and marks[0].get_segments()[0][0][1] == pytest.approx(98.7)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"published (full budget)", "one seed", "single", "ensemble of 3"} <= set(legend)
    assert ax.get_ylim() == (0, 100)  # bars from zero, not from near the lowest one
    chance = [c for c in ax.collections if c.get_label() == "chance (1 / ways)"]
    assert chance and chance[0].get_segments()[0][0][1] == pytest.approx(20.0)


def test_evaluations_are_bars_of_their_own_with_their_rows_published_number(tmp_path):
    """--evals: Reptile's final weights re-tested transductively (metatrain-eval
    model.bn_eval=transductive) beside the run's own non-transductive test, each bar
    with its own published row (95.39, 97.68); no curve of its own."""
    cell = tmp_path / "reptile"
    (cell / ".hydra").mkdir(parents=True)
    cfg = {
        "algorithm": {"name": "reptile"},
        "dataset": {"name": "omniglot", "ways": 5, "shots": 1},
        "model": {"bn_eval": "support_plus_query"},
        "train": {"iterations": 40},
        "eval": {"test_from": "last"},
        "seed": 0,
    }
    (cell / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (cell / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["experiment=reptile_omniglot_5w1s"])
    )
    (cell / "metrics.jsonl").write_text(json.dumps({"iteration": 10, "train/acc": 50.0}) + "\n")
    (cell / "results.json").write_text(json.dumps({"test": score(95.0)}))
    (cell / "eval").mkdir()
    record = {**score(97.5), "bn_eval": "transductive", "overrides": ["model.bn_eval=transductive"],
              "protocol": {"ways": 5, "shots": 1, "bn_eval": "transductive"},
              "run": {"status": "finished", "iteration": 40}}  # fmt: skip
    (cell / "eval" / "model.bn_eval=transductive.json").write_text(json.dumps(record))

    (ax,) = plot.make_figures([tmp_path], tmp_path / "runs")[plot.BARS].axes
    assert [p.get_height() for p in ax.patches] == pytest.approx([95.0])  # runs only
    figures = plot.make_figures([tmp_path], tmp_path / "evals", evals=True)
    (ax,) = figures[plot.BARS].axes
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["reptile", "reptile\neval:model.bn_eval=transductive"]
    assert [p.get_height() for p in ax.patches] == pytest.approx([95.0, 97.5])
    marks = [c for c in ax.collections if c.get_label() == "published (full budget)"]
    assert [m.get_segments()[0][0][1] for m in marks] == pytest.approx([95.39, 97.68])
    (train_ax,) = [a for a in figures[plot.CURVES].axes if "Training accuracy" in a.get_title()]
    assert len(train_ax.get_lines()) == 1  # the evaluation adds no curve


def test_a_long_title_is_wrapped_to_the_figure_not_clipped():
    shared = " ".join(f"train.key_number_{i}=value_{i}" for i in range(12))
    title = plot._title("Test accuracy per configuration", shared, 8.0)
    lines = title.split("\n")
    assert lines[0] == "Test accuracy per configuration" and len(lines) > 3
    assert all(len(ln) <= 88 for ln in lines)
    assert " ".join(lines[1:]) == shared


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing")]) == 2
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("plot: error: ") for line in err)
