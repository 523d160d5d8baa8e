"""Run every experiment preset for two iterations: `make smoke`.

Catches presets that no longer compose or crash on their real shapes (20-way
heads, 84x84 inputs, 48 filters) in minutes, before a long run finds out.
Omniglot comes from METATRAIN_DATA (or ~/.cache/metatrain). Without a
MiniImageNet copy there, the MiniImageNet presets run on a small generated
stand-in (random pixels, the real class names), since only shapes matter here.
"""

import argparse
import fnmatch
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "logger=none",
    "train.iterations=2",
    "train.val_interval=1",
    "train.checkpoint_interval=1",
    "eval.val_tasks=2",
    "eval.test_tasks=2",
    "eval.batch=2",
]


def data_dir(scratch: Path) -> Path:
    """A METATRAIN_DATA folder with Omniglot and some MiniImageNet."""
    root = Path(os.environ.get("METATRAIN_DATA", Path.home() / ".cache" / "metatrain"))
    mini = root / "miniimagenet"
    if mini.is_dir() and any(p.name != "splits" for p in mini.iterdir()):  # split files alone
        return root
    sys.path.insert(0, str(REPO))
    from tests.miniimagenet_fixtures import write_pickle_layout

    (scratch / "omniglot").symlink_to((root / "omniglot").resolve())
    # 20 images per class: 5 shots + 15 queries, the largest presets need.
    write_pickle_layout(scratch / "miniimagenet", per_class=20, size=84)
    print(f"smoke: MiniImageNet not found in {root}; using a generated stand-in", flush=True)
    return scratch


def run(args: list[str], env: dict) -> None:
    cmd = [str(Path(sys.executable).parent / "metatrain"), *args]
    print("smoke:", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/multirun/smoke", help="sweep directory")
    parser.add_argument(
        "--only",
        action="append",
        help="glob over experiment names (repeatable; default: every preset)",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="2 tasks per meta-batch and 1 query per class: same networks, a fraction of the time",
    )
    opts = parser.parse_args()
    tiny = TINY + (["algorithm.meta_batch=2", "dataset.queries=1"] if opts.fast else [])
    out = Path(opts.out).resolve()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "METATRAIN_DATA": str(data_dir(Path(scratch)))}
        only = opts.only or ["*"]
        names = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in only)]
        presets = [n for n in chosen if not n.startswith("ablation_")]
        if presets:
            sweep = f"experiment={','.join(presets)}"
            run(["-m", sweep, *tiny, f"hydra.sweep.dir={out}/presets"], env)
        for ablation in (n for n in chosen if n.startswith("ablation_")):
            run([f"experiment={ablation}", *tiny, f"hydra.sweep.dir={out}/{ablation}"], env)
    cells = list(out.glob("*/*/results.json"))
    print(f"smoke: {len(cells)} cells finished in {time.perf_counter() - start:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
