"""One place to log: the console, RUN_DIR/metrics.jsonl, and Weights & Biases.

On a terminal the console shows a rich progress bar; otherwise (a file, Slurm,
nohup, CI) one plain line per log interval, since a bar redrawn into a file is
unreadable. Validation and test lines are printed in both cases.

W&B runs offline by default (its files go into the run directory; `wandb
sync` uploads them later) and never blocks training: if it cannot start, the
run goes on with the console alone and says so.
"""

import datetime
import uuid
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from metatrain.metrics import MetricsFile

console = Console(stderr=True, soft_wrap=True)  # long paths stay whole in logs


class RunLogger:
    def __init__(self, cfg, run_dir: Path, start: int, total: int, wall_time_s: float = 0.0):
        self.run = None
        if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled":
            self.run = _start_wandb(cfg, run_dir)
        self.metrics = MetricsFile(run_dir, start, wall_time_s)
        self.total = total
        self.progress = None
        if console.is_terminal:
            self._start_progress(start, total)

    def _start_progress(self, start: int, total: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "meta-train", total=total, completed=start, speed="", metrics=""
        )
        self.progress.start()

    def advance(self, iteration: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=iteration)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        self.metrics.write(metrics, step)
        shown = "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if not k.startswith("time/"))
        if self.progress is not None:
            fields = {"metrics": shown}
            if "time/iter_s" in metrics:
                fields["speed"] = f"{1.0 / max(metrics['time/iter_s'], 1e-9):.2f} it/s"
            self.progress.update(self.task, **fields)
        elif "time/iter_s" in metrics:
            console.print(_plain_line(metrics, step, self.total, shown), markup=False)
        if any(k.startswith(("val/", "test/")) for k in metrics):
            console.print(f"iteration {step}: {shown}", markup=False)

    def finish(self, summary: dict | None = None) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.metrics.close()
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()


def _plain_line(metrics: dict, step: int, total: int, shown: str) -> str:
    """`iteration 200/1000  train/loss=...  train/acc=...  2.41 it/s  ETA 0:05:32`."""
    sec = max(metrics["time/iter_s"], 1e-9)
    eta = datetime.timedelta(seconds=round(sec * (total - step)))
    return f"iteration {step}/{total}  {shown}  {1.0 / sec:.2f} it/s  ETA {eta}"


def _start_wandb(cfg, run_dir: Path):
    try:
        import wandb

        id_file = run_dir / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        return wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group or cfg.sweep_name,
            name=cfg.logger.run_name or run_dir.name,
            tags=list(cfg.logger.tags),
            dir=str(run_dir),
            mode=cfg.logger.mode,
            id=id_file.read_text().strip(),
            resume="allow",
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        )
    except Exception as e:  # noqa: BLE001 - a logger must not cost a run
        console.print(f"[yellow]W&B did not start ({type(e).__name__}: {e}); logging to console")
        return None
