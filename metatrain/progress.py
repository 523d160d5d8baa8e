"""Progress lines on a terminal: meta-training, and each slow step beside it
(caching a data set, validation, testing) as a line of its own.

Each line is composed here to fit the terminal's width, rather than left to a
table of columns: rich ellipsises every column when a row is too wide, which made
the old bar unreadable below ~160 columns. The parts are dropped in order of
importance (metrics, then the bar, then the ETA) until the line fits. Rates and
the ETA come from the iterations done since this session's first one finished
(start-up and the first, slower iteration left out), over the last
RATE_WINDOW_S seconds; before two updates they show as "-".

Off a terminal (a file, Slurm, nohup, CI) nothing is redrawn: `activity` prints
one line when a slow step starts, and the run logger prints one per log interval.
"""

import contextlib
import datetime
import time
from collections import deque

from rich.console import Console
from rich.progress import Progress
from rich.text import Text

RATE_WINDOW_S = 60.0


class Meter:
    """Rate and remaining time of one counted activity."""

    def __init__(self, total: int | None, done: int = 0):
        self.total, self.done = total, done
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, done: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self.done = done
        if len(self.samples) > 1 and now - self.samples[-1][0] < 0.2:
            self.samples[-1] = (now, done)  # a fast counter keeps few samples
            return
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Units per second since the first update (the first unit's time left out)."""
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        return None if rate is None or self.total is None else (self.total - self.done) / rate


def _rate_text(rate: float | None, unit: str) -> str:
    if rate is None:
        return f"- {unit}/s"
    return f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}"


def _eta_text(eta: float | None) -> str:
    return "ETA -" if eta is None else f"ETA {datetime.timedelta(seconds=round(eta))}"


def render(
    label: str, meter: Meter, unit: str, width: int, extra: str = "", label_width: int = 10
) -> str:
    """One progress line of at most `width` characters."""
    count = f"{meter.done}/{meter.total}" if meter.total is not None else f"{meter.done}"
    head = f"{label:<{label_width}}"
    rate, eta = _rate_text(meter.rate(), unit), _eta_text(meter.eta())

    def bar(n: int) -> str:
        if meter.total is None or not meter.total:
            return ""
        full = round(n * min(meter.done / meter.total, 1.0))
        return "━" * full + "╺" * (n > full) + "─" * max(0, n - full - 1)

    # Richest first; the first that fits is shown.
    for parts, bar_width in (
        ([head, None, count, rate, eta, extra], 30),
        ([head, None, count, rate, eta, extra], 12),
        ([head, None, count, rate, eta], 30),
        ([head, None, count, rate, eta], 10),
        ([head, count, rate, eta], 0),
        ([head, count, rate], 0),
        ([label, count], 0),
    ):
        parts = [bar(bar_width) if p is None else p for p in parts if p != ""]
        parts = [p for p in parts if p]
        line = "  ".join(parts) if bar_width == 0 else " ".join(parts)
        if len(line) <= width:
            return line
    return f"{label} {count}"[:width]


class LineProgress(Progress):
    """A rich Progress whose tasks render with `render`: fields `meter`, `unit`,
    `extra` on each task."""

    def __init__(self, console: Console, **kwargs):
        self._out = console  # rich asks for the lines before its own console is set
        super().__init__(console=console, **kwargs)

    def get_renderables(self):
        width = max(self._out.width - 1, 10)  # the last column makes terminals wrap
        widest = max((len(t.description) for t in self.tasks if t.visible), default=0)
        for task in self.tasks:
            if task.visible:
                f = task.fields
                line = render(task.description, f["meter"], f["unit"], width, f["extra"], widest)
                yield Text(line, no_wrap=True, overflow="crop")


class Display:
    """The one live display of a process (on a terminal), shared by the run logger
    and `activity`; started with its first line, stopped with its last."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: LineProgress | None = None

    def add(self, label: str, total: int | None, unit: str, done: int = 0):
        if self.progress is None:
            self.progress = LineProgress(console=self.console, transient=False)
            self.progress.start()
        meter = Meter(total, done)
        task = self.progress.add_task(label, total=total, meter=meter, unit=unit, extra="")
        return task, meter

    def refresh(self, task, **fields) -> None:
        if self.progress is not None:
            self.progress.update(task, **fields)

    def remove(self, task) -> None:
        """Take a line away; the last one stays on screen as it was drawn."""
        if self.progress is None:
            return
        if len(self.progress.tasks) > 1:
            self.progress.remove_task(task)
            return
        self.progress.refresh()
        self.progress.stop()
        self.progress = None

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@contextlib.contextmanager
def activity(
    console: Console, display: Display, label: str, total: int | None, unit: str, announce=True
):
    """A slow step with its own progress line; yields `step(n=1)` to count units.
    Off a terminal: one line saying what starts (unless not `announce`)."""
    if not console.is_terminal:
        if announce:
            console.print(f"{label}: {total if total is not None else ''} {unit}...", markup=False)
        yield lambda n=1: None
        return
    task, meter = display.add(label, total, unit)
    count = [0]

    def step(n: int = 1) -> None:
        count[0] += n
        meter.update(count[0])
        display.refresh(task)

    try:
        meter.update(0)
        yield step
    finally:
        display.remove(task)
