"""The meta-test block of results.json, shared by training and metatrain-eval.

Both numbers the papers quote come from one pass: the single model (the best
validation checkpoint, or the last parameters under eval.test_from=last) and
the ensemble of the eval.ensemble_top_k best validation checkpoints, whose
query logits are averaged per task (MAML++, Antoniou et al. 2019). Each gets
its accuracy, 95% interval and task count; the block also says which
batch-norm statistics were used at test. `acc`/`ci95` at the top of the block
keep their meaning from before: the ensemble under test_from=best, else the
last parameters.
"""

from pathlib import Path

from metatrain import checkpoint
from metatrain.algorithms import MetaLearner
from metatrain.data.tasks import FixedTasks
from metatrain.errors import MetatrainError
from metatrain.evaluate import evaluate_pair
from metatrain.naming import BN_MODES


def load_members(best: list, k: int, ckpt_dir: Path, adapt=None) -> list[dict]:
    """Network states of the k best validation checkpoints (`best`: [(acc, iteration,
    file)], best first); `adapt` maps each state (e.g. to fewer output units)."""
    states = []
    for _, iteration, name in best[: max(k, 1)]:
        path = ckpt_dir / name
        if not path.exists():
            raise MetatrainError(
                f"{path} (validation checkpoint of iteration {iteration}) is missing; "
                "resume the run to rewrite it, or use eval.test_from=last"
            )
        state = checkpoint.load(path)
        states.append(adapt(state) if adapt else state)
    return states


def test_block(
    learner: MetaLearner,
    tasks: FixedTasks,
    batch: int,
    best: list,
    members: list[dict],
    test_from: str,
    bn_eval: str,
) -> dict:
    """Evaluate and describe: `members` are the loaded states of best[:len(members)]."""
    from_best = test_from == "best" and bool(members)
    r = evaluate_pair(learner, tasks, batch, members, single_first=from_best)
    iterations = [b[1] for b in best[: len(members)]]
    single = {**r["single"], "checkpoint": iterations[0] if from_best else "last"}
    ensemble = {**r["ensemble"], "k": len(members) or 1, "members": iterations or ["last"]}
    headline = ensemble if from_best else single
    return {
        "acc": headline["acc"],
        "ci95": headline["ci95"],
        "tasks": headline["tasks"],
        "members": iterations if from_best else ["last"],
        "single": single,
        "ensemble": ensemble,
        "bn_eval": bn_eval,
    }


def summary_metrics(block: dict) -> dict:
    """The block as flat W&B summary keys."""
    s, e = block["single"], block["ensemble"]
    return {
        "test/acc": block["acc"],
        "test/acc_ci95": block["ci95"],
        "test/single_acc": s["acc"],
        "test/single_acc_ci95": s["ci95"],
        "test/ensemble_acc": e["acc"],
        "test/ensemble_acc_ci95": e["ci95"],
        "test/ensemble_k": e["k"],
        "test/tasks": block["tasks"],
        "test/bn_eval": block["bn_eval"],
    }


def describe(block: dict) -> str:
    """Console lines: both numbers, their task counts and the batch-norm mode."""
    s, e = block["single"], block["ensemble"]
    where = "last parameters" if s["checkpoint"] == "last" else f"iteration {s['checkpoint']}"
    return (
        f"test, single model ({where}): {s['acc']:.2f} ± {s['ci95']:.2f}% over {s['tasks']} tasks\n"
        f"test, ensemble of top {e['k']} {e['members']}: {e['acc']:.2f} ± {e['ci95']:.2f}% "
        f"over {e['tasks']} tasks\n"
        f"batch norm at test: {BN_MODES.get(block['bn_eval'], block['bn_eval'])}"
    )
