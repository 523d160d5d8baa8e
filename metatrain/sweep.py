"""What became of each cell of a sweep, and the one line a sweep ends with.

Every cell writes `.hydra/outcome.json` (started, finished, failed: ...,
interrupted at iteration N) tagged with the sweep's invocation id, which the
launching process puts in the environment: worker processes and Slurm jobs
inherit it. After the last cell the launching process reads the outcomes of
its own invocation, so cells left in the folder by earlier sweeps do not count.
"""

import json
import os
import uuid
from pathlib import Path

INVOCATION = "METATRAIN_SWEEP_INVOCATION"
OUTCOME = Path(".hydra") / "outcome.json"
REFUSED = ".refused"


def begin() -> None:
    os.environ[INVOCATION] = uuid.uuid4().hex


def record(cell: Path, status: str, user_error: bool = False) -> None:
    path = Path(cell) / OUTCOME
    if path.parent.is_dir():  # a cell removed because it kept nothing records nothing
        data = {"invocation": os.environ.get(INVOCATION), "status": status}
        path.write_text(json.dumps(data | {"user_error": user_error}) + "\n")


def record_refused(cell: Path, status: str) -> None:
    """A cell refused because another process trains its directory: the outcome goes
    beside the cell (SWEEP_DIR/.refused/), since the cell's own files are the holder's."""
    mine = os.environ.get(INVOCATION)
    path = Path(cell).parent / REFUSED / f"{Path(cell).name}.{mine}.json"
    path.parent.mkdir(exist_ok=True)
    data = {"invocation": mine, "status": f"failed: {status}", "user_error": True}
    path.write_text(json.dumps(data | {"cell": Path(cell).name}) + "\n")


def outcomes(sweep_dir: Path) -> dict[str, dict]:
    """{cell name: outcome} for the cells this invocation ran."""
    mine = os.environ.get(INVOCATION)
    found = {}
    for path in sorted(Path(sweep_dir).rglob(str(OUTCOME))):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("invocation") == mine:
            found[str(path.parent.parent.relative_to(sweep_dir))] = data
    for path in sorted((Path(sweep_dir) / REFUSED).glob(f"*.{mine}.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[data["cell"]] = data  # over the holder's outcome, if it is of this invocation
    return found


def report(sweep_dir: Path) -> tuple[str, int] | None:
    """(one line, exit code) when some cell of this invocation did not finish."""
    cells = outcomes(sweep_dir)
    bad = {name: o for name, o in cells.items() if o["status"] != "finished"}
    if not bad:
        return None
    for o in bad.values():
        if o["status"] == "started":  # the process ended without a word (killed)
            o["status"] = "ended without finishing"
    listed = "; ".join(f"{name}: {o['status']}" for name, o in bad.items())
    code = 2 if all(o.get("user_error") for o in bad.values()) else 1
    return (
        f"{len(bad)} of {len(cells)} cells did not finish ({listed}); see error.txt in each",
        code,
    )
