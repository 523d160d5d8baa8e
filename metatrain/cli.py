"""`metatrain`: compose the config with Hydra, train, report.

A run opens with a short header (metatrain/header.py); the composed config is in
RUN_DIR/.hydra/config.yaml and `metatrain --cfg job` prints it. What the console
shows also goes to RUN_DIR/cli.log. A single run ends with its test accuracy and
where its results and figures are (drawn there when matplotlib is installed).

Errors a user can fix are printed as one line and exit with code 2. In a
multirun a failed cell writes error.txt in its directory and the sweep goes on.
"""

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from metatrain import distributed, interrupt, run_lock, sweep
from metatrain.config import register_schemas
from metatrain.errors import MetatrainError
from metatrain.files import is_writable_dir, remove_if_nothing_kept
from metatrain.keys import exclude_keys


def _conf_dir() -> str:
    """conf/: inside the package when installed from a wheel (metatrain/conf), beside
    it in a checkout or editable install. Absolute, so Hydra never reads it as a
    Python module path."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise SystemExit(f"metatrain: error: config folder conf/ not found beside {here}")


CONF_DIR = _conf_dir()

register_schemas()
# A run directory named after the run's overrides; "default" when there are none.
OmegaConf.register_new_resolver(
    "mt_dirname", lambda s: str(s).replace("/", "_") or "default", replace=True
)
# Hydra's override_dirname.exclude_keys, generated from metatrain/keys.py.
OmegaConf.register_new_resolver(
    "mt_non_math_keys", lambda *, _root_: exclude_keys(_root_), replace=True
)


def _fail(message: str) -> None:
    print(f"metatrain: error: {message}", file=sys.stderr)
    _to_log(f"metatrain: error: {message}")
    sys.exit(2)


def _to_log(line: str) -> None:
    """Append a line to the run's log (cli.log) when one is open."""
    from metatrain.logging import console

    console.log_only(line, markup=False, highlight=False)


# The first folder of a single run's output path that did not exist before it: what
# to remove if the run fails before its first iteration.
_created: dict[str, Path | None] = {"root": None}


class OutputDirCheck(Callback):
    """Refuse an unwritable output directory before Hydra tries to create it; at the
    end of a sweep, one line for the cells that did not finish (non-zero exit)."""

    def _check(self, config, key: str) -> None:
        HydraConfig.instance().set_config(config)
        path = Path(str(OmegaConf.select(config, key)))
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not (is_writable_dir(probe) if probe.is_dir() else False):
            _fail(f"cannot write to the output directory {path}; choose another with {key}=...")
        if probe != path:
            missing = path.absolute()
            while not missing.parent.exists():
                missing = missing.parent
            _created["root"] = missing

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.run.dir")
        # Before Hydra writes the run's .hydra/ files: a second process on a run
        # directory in use must leave every byte of it as it was.
        # A distributed run's other ranks run under rank 0's lock.
        try:
            run_lock.take(Path(str(OmegaConf.select(config, "hydra.run.dir"))), _rank())
        except run_lock.RunLocked as e:
            _fail(str(e))

    def on_run_end(self, config, **kwargs) -> None:
        run_lock.release(Path(str(OmegaConf.select(config, "hydra.run.dir"))), _rank())

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")
        sweep.begin()
        if _is_parallel(config.hydra):  # workers stop their own cells; this process waits
            interrupt.install(immediate=False, forward=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        signum = interrupt.requested()
        if signum is not None:
            stopped = [
                f"{name} {o['status'].split(';')[0]}"
                for name, o in sweep.outcomes(sweep_dir).items()
                if o["status"].startswith("interrupted")
            ]
            where = f" ({', '.join(stopped)})" if stopped else ""
            print(
                f"metatrain: interrupted{where}; run the same command again to resume",
                file=sys.stderr,
            )
            sys.exit(128 + signum)
        failed = sweep.report(sweep_dir)
        if failed is not None:
            print(f"metatrain: error: {failed[0]}", file=sys.stderr)
            sys.exit(failed[1])


def _rank() -> int:
    """This process's rank in a distributed run (0 in a plain one)."""
    return distributed.env_rank()


def _is_parallel(hydra_cfg) -> bool:
    """Whether cells run in worker processes of this machine (the joblib launcher)."""
    return "joblib" in str(OmegaConf.select(hydra_cfg, "launcher._target_", default=""))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def run(cfg) -> float | None:
    # Imported here, not at module level: torch loads only after Hydra's --help, and
    # the submitit launcher pickles this function by value, which a module-level
    # console (it holds a lock) would break.
    from metatrain.logging import console
    from metatrain.train import run_dir_of, train

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    worker = multirun and _is_parallel(hydra_cfg)
    # Here too, not only in main(): Slurm jobs and worker processes start elsewhere.
    fresh = interrupt.install(immediate=not worker)
    run_dir = run_dir_of(cfg)
    try:  # a sweep cell's lock; a single run holds its own since OutputDirCheck
        run_lock.take(run_dir, _rank())
    except run_lock.RunLocked as e:
        if not multirun:
            _fail(str(e))
        # The cell's files are the holder's: nothing is written there.
        sweep.record_refused(run_dir, str(e))
        console.print(f"metatrain: error: {e}", style="red", markup=False, highlight=False)
        return None
    try:
        return _run_locked(cfg, run_dir, multirun, worker, fresh, console, train)
    finally:
        run_lock.release(run_dir, _rank())
        distributed.teardown()


def _run_locked(cfg, run_dir, multirun, worker, fresh, console, train) -> float | None:
    hydra_cfg = HydraConfig.get()
    # A distributed run's other ranks leave the run directory's files to rank 0.
    main = _rank() == 0
    if multirun and main:
        sweep.record(run_dir, "started")
    if not worker and main:  # a worker process's console is its own; the log is the cell's
        console.attach_log(run_dir / f"{hydra_cfg.job.name}.log")
    try:
        results = train(cfg)
    except interrupt.Interrupted as e:
        # never a folder the user had
        if main and (multirun or _created["root"] is not None):
            remove_if_nothing_kept(run_dir, None if multirun else _created["root"])
        if multirun and main:
            sweep.record(run_dir, str(e))
        if worker:  # the launching process reports and exits once every cell stopped
            console.print(f"[yellow]metatrain: {e}")
            return None
        interrupt.exit_after(e)  # under Slurm: submitit requeues the cell from here
    except MetatrainError as e:
        if not main and not isinstance(e, distributed.RankLost):
            sys.exit(2)  # rank 0 says it; a fault only this rank saw reaches it (RankLost)
        if not multirun:
            if _created["root"] is not None and main:
                remove_if_nothing_kept(run_dir, _created["root"])
            _fail(str(e))
        (run_dir / "error.txt").write_text(f"{e}\n")
        sweep.record(run_dir, f"failed: {e}", user_error=True)
        console.print(f"[red]metatrain: error: {e}")
        return None
    except Exception as e:
        if not multirun:
            raise
        # The sweep goes on; the cell keeps the whole traceback.
        (run_dir / "error.txt").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
        sweep.record(run_dir, f"failed: {type(e).__name__}: {e}")
        console.print_exception()
        return None
    finally:
        if fresh and not worker:
            interrupt.uninstall()
    if multirun and main:
        sweep.record(run_dir, "finished")
    elif main:
        _figures(run_dir, console)
    console.detach_log()
    return results["test"]["acc"]


def _figures(run_dir: Path, console) -> None:
    """Draw a finished single run's figures into its directory and say where they are."""
    from metatrain.scripts import plot

    if plot.plt is None:
        console.print(
            f"figures: pip install 'metatrain[plot]', then metatrain-plot {run_dir}",
            markup=False,
        )
        return
    try:
        drawn = plot.make_figures([run_dir], run_dir)
    except Exception as e:  # noqa: BLE001 - a figure must not cost a finished run
        console.print(f"[yellow]figures not drawn ({type(e).__name__}: {e})")
        return
    names = " and ".join(str(run_dir / name) for name in drawn)
    console.print(f"figures: {names}", markup=False, highlight=False)


def main() -> None:
    interrupt.install()
    from hydra._internal.utils import get_args_parser

    from metatrain import usage

    args, _ = get_args_parser().parse_known_args()
    modes = [f for f, on in (("--run", args.run), ("-m", args.multirun), ("--cfg", args.cfg),
             ("--info", args.info), ("--shell-completion", args.shell_completion)) if on]  # fmt: skip
    if len(modes) > 1:  # Hydra would raise a traceback
        _fail(f"{' and '.join(modes)} cannot go together: give one (--cfg job prints one "
              "run's config: leave out -m and give one value per key)")  # fmt: skip
    try:
        combined = usage.combine_repeats(CONF_DIR, args.overrides)
        if combined != args.overrides:  # Hydra reads sys.argv: give it the combined list
            rest = list(sys.argv[1:])
            for o in args.overrides:
                rest.remove(o)
            sys.argv[1:] = rest + combined
            args.overrides = combined
        if args.help:
            print(usage.help_text(CONF_DIR, args.overrides))
            return
        if not (args.hydra_help or args.info or args.shell_completion):
            usage.check(CONF_DIR, args.overrides)
    except MetatrainError as e:
        _fail(str(e))
    try:
        run()
    except interrupt.Interrupted as e:  # before or after a run's own handling
        interrupt.exit_after(e)


if __name__ == "__main__":
    main()
