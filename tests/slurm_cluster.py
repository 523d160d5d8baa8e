"""Helpers for tests that need a real (one-node, local) Slurm cluster.

This is a helper module, not a test file.  It wraps ``scripts/local_slurm.sh``,
which starts munged + slurmctld + slurmd on this machine with all config,
state, logs and pids under one *state dir* (nothing is written to /etc).

Typical use in an integration test::

    import subprocess, sys
    import pytest
    from tests.slurm_cluster import (
        local_slurm, short_state_dir, skip_reason, full_env, running_job_ids, requeue,
        wait_until, job_info,
    )

    pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

    def test_sweep_on_slurm(tmp_path):
        with local_slurm(short_state_dir()) as slurm_env:      # ~2 s to start
            env = full_env(slurm_env)                           # os.environ + SLURM_CONF, PATH
            proc = subprocess.Popen(
                [sys.executable, "-m", "metatrain.cli", "-m", "hydra/launcher=slurm",
                 f"hydra.sweep.dir={tmp_path}/sweep", "seed=0,1"],
                env=env,
            )
            ids = wait_until(lambda: running_job_ids(slurm_env), timeout=60,
                             what="a running cell")
            requeue(ids[0], slurm_env)  # cell is killed, PENDING ~11 s, then re-runs
            assert proc.wait(timeout=300) == 0
            assert job_info(ids[0], slurm_env)["Restarts"] == "1"
        # here every daemon recorded by `start` has been stopped
        # (the state dir with its logs is left; shutil.rmtree it if you like)

or with the ready-made pytest fixture (import it into the test module or a
conftest so pytest sees it)::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

    def test_x(slurm_cluster):
        env = full_env(slurm_cluster)

What a test must know about the cluster (verified with Slurm 22.05 / submitit
1.5 / hydra-submitit-launcher 1.2):

* Environment: client tools (sbatch, squeue, scontrol, ... and therefore the
  Hydra submitit launcher) find the cluster only through ``SLURM_CONF``.  The
  yielded dict also puts ``<state dir>/bin`` first on ``PATH`` for the sacct
  stand-in (there is no accounting DB; without it submitit cannot notice a cell
  that died without writing a result and waits forever).  Jobs inherit the
  submitting process's environment (sbatch --export=ALL), so pass the env to
  the *launcher* process and the cells get it too.
* Job ids: a sweep with >= 2 cells is ONE job array; cells are
  ``<array id>_<cell index>`` (``squeue -h -o %i``), the submitit folder is
  ``<sweep dir>/.submitit/<array id>_<cell>/`` and Hydra's ``hydra.job.id`` in
  ``<sweep dir>/<cell>/.hydra/hydra.yaml`` is the same string.  A sweep with a
  single cell is a plain job (id ``<n>``, folder ``.submitit/<n>/``).
  :func:`cell_job_id` reads it from the cell's output dir.
* Timings on a 2-core VM: start ~2 s, stop < 1 s, ``sbatch --wrap hostname``
  submit-to-finished 0.8-1.9 s (the scheduler runs every 2 s), ``srun
  hostname`` 0.03 s, a trivial 2-cell Hydra sweep 1.5-2.6 s end to end.
* Requeue (``scontrol requeue <id>`` on a RUNNING cell): submitit ignores
  SIGTERM, so the cell is SIGKILLed after KillWait=5 s (state COMPLETING), then
  stays PENDING with Reason=BeginTime for cred_expire+1 = 11 s, then runs again
  -- allow >= 30 s.  The rerun executes the pickled Hydra call again: the task
  function runs from the start with the same overrides, ``hydra.job.num``,
  ``hydra.job.id`` and output dir, with ``SLURM_RESTART_COUNT=1`` in its
  environment; ``scontrol show job`` reports ``Restarts=1``
  (:func:`job_info`).  The Hydra launcher keeps waiting and returns normally
  once the rerun writes its result.
* A cell that is cancelled (``scancel``) makes the launcher raise
  ``submitit.core.utils.UncompletedJobError ... (state: CANCELLED)`` after the
  next status poll (submitit polls sacct with a growing delay; ~30 s here).
* ``stop`` first scancels all jobs (waits up to 30 s), then stops the daemons.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "local_slurm.sh"

#: set (to anything but "", "0", "false", "no") to turn "Slurm missing" into a failure
REQUIRE_ENV = "METATRAIN_REQUIRE_SLURM"

#: binaries `scripts/local_slurm.sh start` needs
REQUIRED_BINARIES = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "squeue",
    "sinfo",
    "scontrol",
    "scancel",
)

#: daemons whose pids `start` records in <state dir>/pids/<name>.pid
DAEMONS = ("munged", "slurmctld", "slurmscriptd", "slurmd")

START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 120

T = TypeVar("T")


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed but the test run requires it (METATRAIN_REQUIRE_SLURM)."""


class SlurmClusterError(RuntimeError):
    """`scripts/local_slurm.sh start` or `stop` failed (message has its output)."""


# --------------------------------------------------------------------- availability
def slurm_required() -> bool:
    """True when ``METATRAIN_REQUIRE_SLURM`` is set to a true-ish value."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _search_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])


def missing_binaries() -> list[str]:
    """Slurm/munge binaries (and bash) not found on PATH (+ /usr/sbin, /sbin)."""
    path = _search_path()
    names = ("bash",) + REQUIRED_BINARIES
    return [b for b in names if shutil.which(b, path=path) is None]


def _unavailable_reason() -> str | None:
    if not SCRIPT.is_file():
        return f"{SCRIPT} not found"
    if not Path("/proc").is_dir():
        return "local Slurm cluster needs Linux (/proc)"
    missing = missing_binaries()
    if missing:
        return (
            f"Slurm not installed (missing: {', '.join(missing)}); "
            f"run `{SCRIPT.relative_to(REPO_ROOT)} install` (apt: slurm-wlm munge)"
        )
    return None


def skip_reason() -> str | None:
    """Why Slurm tests should be skipped, or None if they should run.

    Returns a reason string when the Slurm/munge binaries are missing and
    ``METATRAIN_REQUIRE_SLURM`` is unset.  When that variable is set, returns
    None even if Slurm is missing, so the test runs and :func:`local_slurm`
    raises :class:`SlurmUnavailable` -- i.e. missing Slurm FAILS instead of
    skipping (use this in CI jobs that installed Slurm).

    Usage: ``pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")``
    or call :func:`skip_or_fail` inside a test/fixture.
    """
    reason = _unavailable_reason()
    if reason is None or slurm_required():
        return None
    return reason


def skip_or_fail() -> None:
    """Inside a test: pytest.skip() if Slurm is missing, pytest.fail() if also required."""
    import pytest

    reason = _unavailable_reason()
    if reason is None:
        return
    if slurm_required():
        pytest.fail(f"{REQUIRE_ENV} is set but {reason}", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------- env helpers
def read_env_file(path: Path | str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse the ``export NAME=value`` lines of ``<state dir>/env``.

    ``${VAR}`` references (``PATH``) are expanded against ``base`` (default
    ``os.environ``).  Returns only the variables the file sets.
    """
    base = dict(os.environ if base is None else base)
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line.startswith("export "):
            continue
        name, _, raw = line[len("export ") :].partition("=")
        value = "".join(shlex.split(raw))  # strips the quoting, keeps ${PATH}
        for var, val in {**base, **out}.items():
            value = value.replace("${" + var + "}", val)
        out[name.strip()] = value
    return out


def full_env(slurm_env: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` (or ``base``) updated with the cluster variables, for subprocess(env=...)."""
    env = dict(os.environ if base is None else base)
    env.update(slurm_env)
    return env


def _run(cmd: list[str], env: Mapping[str, str], timeout: float = 60, check: bool = True) -> str:
    proc = subprocess.run(
        cmd,
        check=False,
        env=full_env(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout


# --------------------------------------------------------------------- the cluster
def _script(cmd: str, state_dir: Path, extra_env: Mapping[str, str] | None, timeout: float):
    env = dict(os.environ)
    env.update(extra_env or {})
    env["METATRAIN_SLURM_DIR"] = str(state_dir)
    # stdin/out/err are files or pipes that the daemons do NOT inherit (the script
    # redirects them), so capture_output cannot hang on the daemons.
    return subprocess.run(
        ["bash", str(SCRIPT), cmd],
        check=False,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _format(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@contextlib.contextmanager
def local_slurm(
    state_dir: Path | str,
    *,
    extra_env: Mapping[str, str] | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> Iterator[dict[str, str]]:
    """Start a one-node Slurm cluster with its state in ``state_dir``; always stop it.

    Yields the cluster's environment variables as a dict (``SLURM_CONF``,
    ``METATRAIN_SLURM_DIR`` and ``PATH`` with the sacct stand-in first), i.e.
    only what must be added to a process's environment; use
    :func:`full_env` for ``subprocess(env=...)`` or
    ``for k, v in env.items(): monkeypatch.setenv(k, v)``.

    ``state_dir`` must be short (unix socket paths live in it; the script
    refuses paths that would exceed 107 bytes) -- pytest's ``tmp_path`` is
    usually fine, :func:`short_state_dir` always is.  ``extra_env`` is passed
    to the script, e.g. ``{"METATRAIN_SLURM_CPUS": "4"}`` (see the script
    header for the knobs).

    On exit (normal or exception) runs ``local_slurm.sh stop``, which scancels
    all jobs and stops exactly the recorded daemon pids, then checks that none
    of them is alive.  A failing stop raises :class:`SlurmClusterError` unless
    the body already raised (then it is only warned about).

    Raises :class:`SlurmUnavailable` if Slurm is missing (call
    :func:`skip_reason` / :func:`skip_or_fail` first to skip instead), and
    :class:`SlurmClusterError` with the daemons' log tails if start fails.
    """
    reason = _unavailable_reason()
    if reason is not None:
        raise SlurmUnavailable(reason)
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)

    body_failed = False
    try:
        proc = _script("start", state_dir, extra_env, start_timeout)
        if proc.returncode != 0:
            raise SlurmClusterError(f"local_slurm.sh start failed: {_format(proc)}")
        yield read_env_file(state_dir / "env")
    except BaseException:
        body_failed = True
        raise
    finally:
        problem = None
        try:
            proc = _script("stop", state_dir, extra_env, STOP_TIMEOUT_S)
            if proc.returncode != 0:
                problem = f"local_slurm.sh stop failed: {_format(proc)}"
        except subprocess.TimeoutExpired as exc:
            problem = f"local_slurm.sh stop timed out: {exc}"
        if problem is None:
            left = wait_until(
                lambda: not alive_daemons(state_dir),
                timeout=15,
                what="recorded daemons to exit",
                raise_on_timeout=False,
            )
            if left is None:
                problem = f"daemons still alive after stop: {alive_daemons(state_dir)}"
        if problem is not None:
            if body_failed:
                warnings.warn(problem, stacklevel=2)
            else:
                raise SlurmClusterError(problem)


def short_state_dir(prefix: str = "mt-slurm-") -> Path:
    """A fresh, short directory under /tmp (socket-path safe); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None))


try:  # pytest fixture, usable when pytest is installed
    import pytest as _pytest

    @_pytest.fixture
    def slurm_cluster() -> Iterator[dict[str, str]]:
        """Function-scoped fixture: skip/fail per :func:`skip_or_fail`, start a
        cluster in a short temp state dir, yield its env dict, stop it and remove
        the state dir (kept on failure of the stop, for the logs)."""
        skip_or_fail()
        state_dir = short_state_dir()
        with local_slurm(state_dir) as env:
            yield env
        shutil.rmtree(state_dir, ignore_errors=True)

except ImportError:  # pragma: no cover
    pass


# --------------------------------------------------------------------- daemons
def recorded_pids(state_dir: Path | str) -> dict[str, int]:
    """``{daemon: pid}`` as recorded by ``start`` in ``<state dir>/pids/*.pid``."""
    out = {}
    for name in DAEMONS:
        f = Path(state_dir) / "pids" / f"{name}.pid"
        try:
            out[name] = int(f.read_text().strip())
        except (OSError, ValueError):
            pass
    return out


def _pid_alive(pid: int, name: str) -> bool:
    """Alive and still that daemon (zombies awaiting reaping count as gone)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return comm == name and state not in ("Z", "X")


def alive_daemons(state_dir: Path | str) -> dict[str, int]:
    """Recorded daemons that are still running.  ``stop`` removes the pid files
    of the daemons it stopped, so pass pids captured before stop to
    :func:`pids_alive` if you want to check them yourself."""
    return {n: p for n, p in recorded_pids(state_dir).items() if _pid_alive(p, n)}


def pids_alive(pids: Mapping[str, int]) -> dict[str, int]:
    """Subset of ``{daemon: pid}`` still alive (e.g. ``recorded_pids()`` taken before stop)."""
    return {n: p for n, p in pids.items() if _pid_alive(p, n)}


# --------------------------------------------------------------------- jobs
def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.5,
    what: str = "condition",
    raise_on_timeout: bool = True,
) -> T | None:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises TimeoutError after ``timeout`` s (or returns None if
    ``raise_on_timeout`` is False).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if raise_on_timeout:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            return None
        time.sleep(interval)


def job_ids(slurm_env: Mapping[str, str], states: str = "all") -> list[str]:
    """Job ids known to the controller (``squeue -h -r -o %i -t <states>``),
    array tasks expanded (``12_0``, ``12_1``).  ``states`` is a squeue state
    list, e.g. ``"RUNNING"``, ``"PENDING,RUNNING"`` or ``"all"`` (includes
    finished jobs, kept for MinJobAge=3600 s)."""
    out = _run(["squeue", "-h", "-r", "-o", "%i", "-t", states], slurm_env)
    return [line.strip() for line in out.splitlines() if line.strip()]


def running_job_ids(slurm_env: Mapping[str, str]) -> list[str]:
    """Ids of RUNNING jobs / array tasks, e.g. ``["12_0", "12_1"]``."""
    return job_ids(slurm_env, "RUNNING")


def job_state(job_id: str, slurm_env: Mapping[str, str]) -> str | None:
    """``RUNNING``, ``PENDING``, ``COMPLETING``, ``COMPLETED``, ``CANCELLED`` ... or None."""
    out = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], slurm_env, check=False)
    lines = [x.strip() for x in out.splitlines() if x.strip()]
    return lines[0] if lines else None


def job_info(job_id: str, slurm_env: Mapping[str, str]) -> dict[str, str]:
    """``scontrol show job -o <id>`` as a dict (JobState, Restarts, Reason, ...)."""
    out = _run(["scontrol", "show", "job", "-o", job_id], slurm_env)
    info: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def requeue(job_id: str, slurm_env: Mapping[str, str]) -> None:
    """``scontrol requeue <id>``: kill a RUNNING job/cell and queue it again.

    The job must be running (or pending).  It reruns ~cred_expire+1 = 11 s after
    the kill (KillWait 5 s) completes; ``job_info(id)["Restarts"]`` counts reruns.
    """
    _run(["scontrol", "requeue", job_id], slurm_env)


def cancel(job_id: str, slurm_env: Mapping[str, str]) -> None:
    """``scancel <id>``."""
    _run(["scancel", job_id], slurm_env)


def cell_job_id(cell_dir: Path | str) -> str | None:
    """Slurm job id of a Hydra cell, from ``<cell dir>/.hydra/hydra.yaml``
    (``hydra.job.id``, written when the cell starts; ``<array>_<i>`` for sweeps
    of >= 2 cells).  None while the cell has not started yet."""
    path = Path(cell_dir) / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(path)
        job_id = OmegaConf.select(cfg, "hydra.job.id", default=None)
    except (OSError, yaml.YAMLError, OmegaConfBaseException):  # file still being written
        return None
    return None if job_id is None else str(job_id)
