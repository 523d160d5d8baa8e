"""One place to log: the console, RUN_DIR/metrics.jsonl, and Weights & Biases.

On a terminal the console shows progress lines (metatrain/progress.py): one for
meta-training, one for each validation, test or data caching while it runs;
otherwise (a file, Slurm, nohup, CI) one plain line per log interval, since a bar
redrawn into a file is unreadable. Validation and test results are printed as
lines of their own in both cases, never inside the bar. Everything the console
prints also goes, as plain text, to the run's log file (RUN_DIR/cli.log) once
`console.attach_log` names it.

W&B runs offline by default (its files go into the run directory; `wandb
sync` uploads them later) and never blocks training: if it cannot start, the
run goes on with the console alone and says so.
"""

import contextlib
import datetime
import uuid
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.control import Control

from metatrain import progress
from metatrain.metrics import MetricsFile


class TeeConsole(Console):
    """A console that also appends what it prints, as plain text, to a log file."""

    log_console: Console | None = None

    def attach_log(self, path: Path) -> None:
        self.detach_log()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in detach_log
        self.log_console = Console(file=handle, width=200, soft_wrap=True, no_color=True)

    def detach_log(self) -> None:
        if self.log_console is not None:
            self.log_console.file.close()
            self.log_console = None

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        if not all(isinstance(o, Control) for o in objects):  # a live display's redraw
            self.log_only(*objects, **kwargs)

    def log_only(self, *objects, **kwargs) -> None:
        """Write to the log file alone (a line already printed some other way)."""
        log = self.log_console
        if log is None:
            return
        try:
            log.print(*objects, **kwargs)
            log.file.flush()
        except (OSError, ValueError):  # a full disk must not stop the run's console
            pass

    def print_exception(self, **kwargs) -> None:
        super().print_exception(**kwargs)
        if self.log_console is not None:
            with contextlib.suppress(OSError, ValueError):
                self.log_console.print_exception(**kwargs)


console = TeeConsole(stderr=True, soft_wrap=True)  # long paths stay whole in logs
display = progress.Display(console)


def activity(label: str, total: int | None, unit: str, announce: bool = True):
    """A progress line for a slow step (caching, validation, test): `with activity(...)
    as step: ... step(n)`; off a terminal one line when it starts, if `announce`."""
    return progress.activity(console, display, label, total, unit, announce)


class RunLogger:
    def __init__(self, cfg, run_dir: Path, start: int, total: int, wall_time_s: float = 0.0):
        self.run = None
        if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled":
            self.run = _start_wandb(cfg, run_dir)
        self.metrics = MetricsFile(run_dir, start, wall_time_s)
        self.total = total
        self.task = None
        if console.is_terminal:
            self.task, self.meter = display.add("meta-train", total, "it", done=start)

    def advance(self, iteration: int) -> None:
        if self.task is not None:
            self.meter.update(iteration)
            display.refresh(self.task)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        self.metrics.write(metrics, step)
        shown = "  ".join(f"{k}={v:.3f}" for k, v in metrics.items() if not k.startswith("time/"))
        if "time/iter_s" in metrics:
            if self.task is not None:  # the bar keeps the training numbers only, short
                brief = [f"{k[6:]} {metrics[k]:.3f}" for k in ("train/loss", "train/acc")
                         if k in metrics]  # fmt: skip
                display.refresh(self.task, extra="  ".join(brief))
            else:
                console.print(_plain_line(metrics, step, self.total, shown), markup=False)
        if any(k.startswith("val/") for k in metrics):  # the test: describe()'s lines
            console.print(f"iteration {step}: {_result_line(metrics)}", markup=False)

    def finish(self, summary: dict | None = None) -> None:
        if self.task is not None:
            display.remove(self.task)
            self.task = None
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


def _result_line(metrics: dict) -> str:
    """`val/acc 87.50 ± 1.23` for each accuracy with its CI, other keys as `k=v`."""
    out = []
    for k, v in metrics.items():
        if k.endswith("_ci95") and k[: -len("_ci95")] in metrics:
            continue
        ci = metrics.get(f"{k}_ci95")
        out.append(f"{k} {v:.2f} ± {ci:.2f}" if ci is not None else f"{k}={v:.3f}")
    return "  ".join(out)


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
