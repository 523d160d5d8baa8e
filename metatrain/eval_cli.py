"""`metatrain-eval RUN_DIR [key=value ...]`: meta-test a trained run under another
protocol (more tasks, more inner steps, fewer ways, other shots, the other
batch-norm mode, the validation split) into RUN_DIR/eval/<overrides>.json.

The run's config comes from its checkpoint and .hydra/config.yaml; overrides
use Hydra's syntax. Errors a user can fix: one line, exit code 2.
"""

import sys
from pathlib import Path

from metatrain.errors import MetatrainError

USAGE = """usage: metatrain-eval RUN_DIR [key=value ...]

Meta-test the run in RUN_DIR (finished or not; a sweep cell is a run) and write
RUN_DIR/eval/<overrides>.json: the single best-validation model and the top-k
ensemble, each with its 95% CI and task count. results.json, checkpoints and
W&B files are left as they are.

Keys it accepts:
  {protocol}
the keys of the run's algorithm:
{learners}
and, as in training, keys that do not change the maths:
  {other}
"""


def _fail(message: str) -> None:
    print(f"metatrain-eval: error: {message}", file=sys.stderr)
    sys.exit(2)


def usage() -> str:
    from metatrain.keys import EVAL_PROTOCOL_KEYS, NON_MATH_KEYS
    from metatrain.registry import LEARNERS  # each learner declares its own (eval_keys)

    learners = "\n".join(
        f"  {e.name}: " + (" ".join(f"algorithm.{k}" for k in e.target.eval_keys) or "(none)")
        for e in LEARNERS.entries()
    )
    return USAGE.format(
        protocol=" ".join(EVAL_PROTOCOL_KEYS), learners=learners, other=" ".join(NON_MATH_KEYS)
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(usage(), end="")
        return
    if not args:
        _fail("give a run directory: metatrain-eval RUN_DIR [key=value ...] (see --help)")
    from metatrain.eval_run import evaluate_run
    from metatrain.logging import console
    from metatrain.meta_test import describe

    try:
        path, record = evaluate_run(Path(args[0]), args[1:], log=console.print)
    except MetatrainError as e:
        _fail(str(e))
    console.print(f"[bold green]{describe(record)}\n-> {path}")


if __name__ == "__main__":
    main()
