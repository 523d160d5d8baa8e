"""SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 stop a run without losing an iteration.

While meta-training (`deferred()`), a signal only sets a flag: the loop finishes
the iteration it is in, saves last.pt and raises `Interrupted`. Outside it
(start-up, meta-testing, when everything is saved) the handler raises at once.
`Interrupted` derives from BaseException, like KeyboardInterrupt, so it passes
through Hydra's job runner (which catches Exception) up to the CLI.

Handlers found before ours are kept: under Slurm, submitit's SIGUSR2 handler
requeues the job, so `exit_after` calls it once last.pt holds the iteration
reached, and the requeued cell resumes from there.
"""

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from metatrain.distributed import env_rank

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(BaseException):
    def __init__(self, signum: int, iteration: int | None):
        super().__init__(signum, iteration)
        self.signum, self.iteration = signum, iteration

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for death by a signal

    def __str__(self) -> str:
        where = f"at iteration {self.iteration}" if self.iteration else "before the first iteration"
        return f"interrupted {where}; run the same command again to resume"


_state = {"signum": None, "deferred": False, "iteration": None, "forward": False, "immediate": True}
_previous: dict[int, object] = {}


def _handler(signum, frame) -> None:
    first = _state["signum"] is None
    if first:
        _state["signum"] = signum
    if _state["forward"]:
        forward_to_children(signum)
    elif first and _state["immediate"] and not _state["deferred"]:
        raise Interrupted(signum, _state["iteration"])


def install(immediate: bool = True, forward: bool = False) -> bool:
    """Take over SIGNALS in this process (the main thread only: Python allows no
    other); True if they were not ours yet. `immediate`: outside `deferred`, raise
    at once (False in a worker process, which must not die between cells).
    `forward`: pass each signal on to the child processes that handle it (the
    local parallel launcher's workers) and keep waiting for them."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _state["immediate"], _state["forward"] = immediate, forward
    fresh = False
    for s in SIGNALS:
        current = signal.getsignal(s)
        if current is not _handler:
            _previous[s] = current
            signal.signal(s, _handler)
            fresh = True
    return fresh


def uninstall() -> None:
    """Give the signals back to the handlers found by `install`."""
    if threading.current_thread() is threading.main_thread():
        for s, previous in _previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        _previous.clear()


def clear() -> None:
    """Forget a signal already acted on (a process that goes on, such as a test)."""
    _state["signum"], _state["iteration"] = None, None


def requested() -> int | None:
    return _state["signum"]


def request(signum: int) -> None:
    """Act as if `signum` had arrived here (another rank of a distributed run got it)."""
    if _state["signum"] is None:
        _state["signum"] = signum


@contextlib.contextmanager
def deferred(iteration: int):
    """Signals only set a flag in here; call `check(iteration)` at safe points."""
    _state["iteration"] = iteration
    if _state["signum"] is not None:
        raise Interrupted(_state["signum"], iteration)
    _state["deferred"] = True
    try:
        yield
    finally:
        _state["deferred"] = False


def reached(iteration: int) -> None:
    """Record the iteration that an interrupt outside `deferred` would report."""
    _state["iteration"] = iteration


def exit_after(e: Interrupted) -> None:
    """Print the one line, let a handler that was there before ours act (submitit
    requeues), then exit with 128 + the signal number."""
    if env_rank() == 0:  # a distributed run's ranks stop as one: one line
        print(f"metatrain: {e}", file=sys.stderr, flush=True)
    previous = _previous.get(e.signum)
    if callable(previous) and previous is not signal.default_int_handler:
        previous(e.signum, None)
    sys.exit(e.exit_code)


def forward_to_children(signum: int) -> None:
    """Send `signum` to this process's children that catch it (Linux /proc): the
    launcher's worker processes, not helpers that would die of it."""
    bit = 1 << (signum - 1)
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
            if int(fields["PPid"]) == os.getpid() and int(fields["SigCgt"], 16) & bit:
                os.kill(int(status.parent.name), signum)
        except (OSError, KeyError, ValueError):
            continue  # the process ended meanwhile, or is not ours to read
