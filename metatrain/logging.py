"""One place to log: a rich progress bar and console lines, and Weights & Biases.

W&B runs offline by default (its files go into the run directory; `wandb
sync` uploads them later) and never blocks training: if it cannot start, the
run goes on with the console alone and says so.
"""

import time
import uuid
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)  # long paths stay whole in logs


class RunLogger:
    def __init__(self, cfg, run_dir: Path, start: int, total: int):
        self.run = None
        if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled":
            self.run = _start_wandb(cfg, run_dir)
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
        self.last = (time.perf_counter(), start)

    def advance(self, iteration: int) -> None:
        self.progress.update(self.task, completed=iteration)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        shown = "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if not k.startswith("time/"))
        fields = {"metrics": shown}
        if "time/iter_s" in metrics:
            fields["speed"] = f"{1.0 / max(metrics['time/iter_s'], 1e-9):.2f} it/s"
        self.progress.update(self.task, **fields)
        if any(k.startswith(("val/", "test/")) for k in metrics):
            self.progress.console.print(f"iteration {step}: {shown}")

    def finish(self, summary: dict | None = None) -> None:
        self.progress.stop()
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()


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
