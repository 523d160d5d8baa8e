"""The learning curve on disk: RUN_DIR/metrics.jsonl, one JSON object a line.

A row is written at every log interval (train loss and accuracy, seconds per
iteration), every validation (accuracy and 95% CI) and at the test; each row
carries `iteration` and `wall_time_s` (training wall time since the run began,
across resumes). JSON lines rather than CSV because the metric names grow
with the code: a new key is a new field, old files stay readable.

Each row is flushed as it is written, so a killed run leaves every finished
row and at most one partial last line, which `read_metrics` skips. A resumed
run first drops the rows past its checkpoint's iteration (they will be
produced again), so every iteration appears once.
"""

import json
import time
from pathlib import Path

from metatrain.errors import NO_SPACE, DiskFull

FILE_NAME = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics file (or of RUN_DIR/metrics.jsonl), skipping lines a
    killed writer left unfinished."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the partial line of a run killed mid-write
        if isinstance(row, dict) and "iteration" in row:
            rows.append(row)
    return rows


class MetricsFile:
    """Appends rows to RUN_DIR/metrics.jsonl for a run (re)starting at `start`
    after `wall_time_s` seconds of earlier training."""

    def __init__(self, run_dir: Path, start: int = 0, wall_time_s: float = 0.0):
        self.path = Path(run_dir) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start)
        self.wall0 = wall_time_s
        self.t0 = time.perf_counter()
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _truncate_after(self, start: int) -> None:
        """Keep only whole rows at or before `start`: later ones belong to work the
        checkpoint does not hold and will be redone."""
        if not self.path.exists():
            return
        from metatrain.files import save_text  # torch-heavy; readers of this file need none

        kept = [r for r in read_metrics(self.path) if r["iteration"] <= start]
        # atomic: on a full disk the old file stays whole (DiskFull) and no temp file is left
        save_text("".join(json.dumps(r) + "\n" for r in kept), self.path)

    def write(self, metrics: dict, step: int) -> None:
        wall = self.wall0 + time.perf_counter() - self.t0
        row = {"iteration": step, "wall_time_s": round(wall, 3), **metrics}
        try:
            self.file.write(json.dumps(row, default=float) + "\n")  # numpy/torch scalars too
            self.file.flush()  # in the OS's hands now: survives SIGKILL of this process
        except OSError as e:
            if e.errno in NO_SPACE:
                raise DiskFull(self.path) from None
            raise

    def close(self) -> None:
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:  # a full disk: the rows that reached it stay readable
                pass
