"""train(cfg): build everything, meta-train with validation and checkpoints,
meta-test, write results.json. What the CLI and the tests call."""

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from metatrain import checkpoint, distributed, header, interrupt, rng, run_lock, threads
from metatrain.algorithms import MetaLearner, build_learner, learner_class
from metatrain.algorithms.inner import setup_device
from metatrain.data.tasks import EpisodeSampler, FixedTasks
from metatrain.datasets import load_placed
from metatrain.errors import DiskFull, MetatrainError, at_least_one
from metatrain.evaluate import evaluate
from metatrain.files import is_writable_dir, save_json
from metatrain.inert import inert_settings
from metatrain.logging import RunLogger, activity, console
from metatrain.meta_test import describe, load_members, summary_metrics, test_block
from metatrain.models import build_model
from metatrain.naming import algorithm_label, bn_eval_mode
from metatrain.nonfinite import NonFiniteGuard
from metatrain.task_sets import task_sets


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MetatrainError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    return torch.device(name)


def run_dir_of(cfg) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside Hydra (tests, notebooks)
        return Path(os.getcwd())


def overrides_of() -> list[str]:
    """The command-line overrides that made this run (a sweep cell's own values)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _check_settings(cfg) -> None:
    t, a = cfg.train, cfg.algorithm
    positive = {
        "train.iterations": t.iterations,
        "algorithm.meta_batch": a.meta_batch,
        "train.iters_per_epoch": t.iters_per_epoch,
        "eval.test_tasks": cfg.eval.test_tasks,
        "eval.val_tasks": cfg.eval.val_tasks,
        "eval.batch": cfg.eval.batch,
    }
    positive.update({f"algorithm.{k}": a[k] for k in learner_class(a.name).positive_keys})
    at_least_one(positive)
    if cfg.eval.queries < 0:
        raise MetatrainError(f"eval.queries={cfg.eval.queries} must not be negative")
    if (cfg.eval.queries or cfg.dataset.queries) < 1:
        raise MetatrainError(f"dataset.queries={cfg.dataset.queries}: evaluation needs queries")


def train(cfg, run_dir: Path | None = None, rank: int | None = None) -> dict:
    """Train the run in `run_dir` (Hydra's output directory by default), resuming it
    if it has a last.pt, and return its results. The run directory is locked first
    (metatrain/run_lock.py) and stays locked until this returns or raises; `rank`:
    a distributed run's process index (default: as its launcher set it), of which
    only rank 0 takes the lock."""
    run_dir = Path(run_dir) if run_dir else run_dir_of(cfg)
    rank = distributed.env_rank() if rank is None else rank
    if not is_writable_dir(run_dir):
        raise MetatrainError(
            f"cannot write to the output directory {run_dir}; choose another with hydra.run.dir=..."
        )
    with run_lock.hold(run_dir, rank):  # before anything in run_dir is read or written
        try:
            return _train(cfg, run_dir)
        except MetatrainError as e:
            if not isinstance(e, distributed.RankLost):
                distributed.report_failure(str(e))  # for the ranks this one leaves behind
            raise


@dataclass(frozen=True)
class Run:
    """What every phase of a run reads and none changes, fixed at start-up."""

    cfg: DictConfig
    run_dir: Path
    fingerprint: dict  # the config as last.pt and results.json record it
    device: torch.device
    ranks: int  # processes of a distributed run (1: a plain run)
    main: bool  # rank 0: the only process that writes files and logs

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def results_path(self) -> Path:
        return self.run_dir / "results.json"


@dataclass(frozen=True)
class Parts:
    """What meta-trains and what it is trained, validated and tested on."""

    learner: MetaLearner
    generator: torch.Generator  # draws the training episodes; its state is in last.pt
    guard: NonFiniteGuard  # the learner's meta-step, undone when non-finite
    train_sampler: EpisodeSampler
    val_tasks: FixedTasks | None  # None: no validation split
    test_tasks: FixedTasks


@dataclass
class Progress:
    """Where meta-training stands. last.pt keeps what a resume needs of it, so a
    resumed run carries on as if it had never stopped."""

    start: int = 0  # the iteration this session starts at
    wall: float = 0.0  # seconds of meta-training, all sessions together
    wall_start: float = 0.0  # `wall` when this session started: its share gives sec_per_iter
    best: list = field(default_factory=list)  # [(val acc, iteration, file name)], best first
    # The log interval in progress: sums of (loss, acc) over n_sum steps since
    # iteration `ticked`, `elapsed` seconds of them before this session. Kept in
    # last.pt, so the first row logged after a resume is the mean over the whole
    # interval, as without the stop.
    sums: torch.Tensor | None = None
    n_sum: int = 0
    elapsed: float = 0.0
    ticked: int = 0
    intact: int | None = None  # last.pt's iteration on disk (None: no last.pt yet)


def _train(cfg, run_dir: Path) -> dict:
    """A run's phases in order. A finished run returns its results before anything
    is built, so looking at one costs no data loading."""
    run = _start_up(cfg, run_dir)
    results = _finished(run)
    if results is not None:
        return results
    resume = _read_last(run)
    if resume is not None and resume.get("results") is not None:
        return _rewrite_results(run, resume["results"])
    parts = _build(run)
    progress = _restore(run, parts, resume)
    return _meta_train_and_test(run, parts, progress)


def _start_up(cfg, run_dir: Path) -> Run:
    """Check the settings, take the device, join the other ranks, print the header."""
    fingerprint = checkpoint.config_fingerprint(cfg)
    _check_settings(cfg)
    device = distributed.place(resolve_device(cfg.device.value))
    ranks = distributed.setup(device, cfg.train.dist_timeout_s)
    n_threads, why = threads.apply(cfg.train.threads)
    for line in header.lines(cfg, run_dir, str(device), n_threads, why):
        console.print(line, markup=False, highlight=False)
    for line in inert_settings(cfg):
        console.print(f"[yellow]warning: {line}", highlight=False)
    return Run(cfg, run_dir, fingerprint, device, ranks, distributed.is_main())


def _finished(run: Run) -> dict | None:
    """The results of a run finished before, else None. A finished run is known by its
    results.json alone, so a damaged last.pt cannot make it look unfinished."""
    if not run.results_path.exists():
        return None
    results = checkpoint.finished_results(run.results_path, run.fingerprint)
    console.print(f"[green]{run.run_dir} is finished; its results.json stands")
    test = results.get("test") or {}
    # results.json files written before the single/ensemble block show their headline
    shown = describe(test) if "single" in test else f"test accuracy: {test.get('acc')}"
    console.print(f"[bold green]{shown}\nresults: {run.results_path}")
    return results


def _read_last(run: Run) -> dict | None:
    """last.pt's contents (None: a new run), checked to be of this run's config."""
    resume = checkpoint.load(run.last_path) if run.last_path.exists() else None
    distributed.barrier("start-up")  # every rank has read last.pt before rank 0 writes it
    if resume is not None:
        checkpoint.check_same_config(resume["config"], run.fingerprint, run.last_path)
    return resume


def _rewrite_results(run: Run, results: dict) -> dict:
    """A finished run whose results.json was removed: write it back from last.pt."""
    if run.main:
        save_json(results, run.results_path)
    console.print(f"[green]{run.run_dir} is finished; results.json rewritten from {run.last_path}")
    return results


def _build(run: Run) -> Parts:
    """The data, model, learner and task sets, all from the seed; refuses a learner
    or meta-batch that cannot be split over the run's processes."""
    cfg, device, ranks = run.cfg, run.device, run.ranks
    setup_device(device, cfg.train)
    # Seeded before anything draws, so the initial weights are the seed's alone.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    ds = cfg.dataset
    splits = load_placed(ds, device)  # in memory on `device`, or memory-mapped
    model = build_model(cfg, device)
    learner = build_learner(cfg, model, device)
    if ranks > 1 and learner.sequential():
        raise MetatrainError(
            f"{learner.sequential()}, so its tasks cannot be split across {ranks} "
            "processes: run it in one process, or switch that option off"
        )
    if ranks > cfg.algorithm.meta_batch:
        raise MetatrainError(
            f"algorithm.meta_batch={cfg.algorithm.meta_batch} tasks cannot be shared by "
            f"{ranks} processes: start at most {cfg.algorithm.meta_batch}"
        )
    train_shots, train_queries = learner.train_shape(ds.shots, ds.queries)
    train_sampler, val_tasks, test_tasks = task_sets(
        cfg, splits, device, train_shots, train_queries
    )
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    t = cfg.train
    guard = NonFiniteGuard(learner, t.nonfinite, t.nonfinite_patience)
    return Parts(learner, generator, guard, train_sampler, val_tasks, test_tasks)


def _restore(run: Run, parts: Parts, resume: dict | None) -> Progress:
    """A new run's progress, or last.pt's: the learner, the episode generator, the
    best-k list, the wall time and the log interval in progress as they were saved."""
    if resume is None:
        return Progress()
    parts.learner.load_state_dict(resume["learner"])
    rng.restore(resume["rng"], parts.generator)
    start, wall = resume["iteration"], resume["wall_time_s"]
    # last.pt files saved before the interval was kept start a fresh one
    interval = resume.get("interval") or {"sums": None, "n": 0, "elapsed": 0.0, "from": start}
    parts.guard.skipped = resume.get("nonfinite_skips", 0)
    console.print(f"[cyan]resuming {run.run_dir} at iteration {start}")
    sums = interval["sums"]
    return Progress(
        start=start,
        wall=wall,
        wall_start=wall,
        best=resume["best"],
        sums=None if sums is None else torch.tensor(sums, device=run.device),
        n_sum=interval["n"],
        elapsed=interval["elapsed"],
        ticked=interval["from"],
        intact=start,
    )


def _save_last(
    run: Run, parts: Parts, progress: Progress, iteration: int, *, results=None, elapsed=0.0
) -> None:
    """Write last.pt at `iteration`: `results` once the run is finished, `elapsed`: the
    seconds of the log interval in progress."""
    if not run.main:  # rank 0's file is every rank's (their states are identical)
        progress.intact = iteration
        return
    checkpoint.save(
        {
            "iteration": iteration,
            "learner": parts.learner.state_dict(),
            "rng": rng.capture(parts.generator),
            "config": run.fingerprint,
            "best": progress.best,
            "wall_time_s": progress.wall,
            "nonfinite_skips": parts.guard.skipped,
            "results": results,
            "interval": {
                "sums": None if progress.sums is None else progress.sums.tolist(),
                "n": progress.n_sum,
                "elapsed": elapsed,
                "from": progress.ticked,
            },
        },
        run.last_path,
    )
    progress.intact = iteration


def _meta_train_and_test(run: Run, parts: Parts, progress: Progress) -> dict:
    """Meta-train from `progress`, meta-test, write results.json; the logger is closed
    whatever happens, and a full disk is told with the checkpoint that survives it."""
    t = run.cfg.train
    interrupt.reached(progress.start)
    # From here a signal stops the loop between iterations.
    try:
        with interrupt.deferred(progress.start):
            logger = (
                RunLogger(run.cfg, run.run_dir, progress.start, t.iterations, progress.wall)
                if run.main
                else _Silent()
            )
    except DiskFull as e:  # trimming a resumed run's metrics.jsonl
        raise _disk_full(e, run, progress) from None
    try:
        _meta_train(run, parts, progress, logger)
        results = _meta_test(run, parts, progress, logger)
    except DiskFull as e:
        logger.finish()
        raise _disk_full(e, run, progress) from None
    except BaseException:
        logger.finish()
        raise
    console.print(f"[bold green]{describe(results['test'])}\nresults: {run.results_path}")
    return results


def _disk_full(e: DiskFull, run: Run, progress: Progress) -> MetatrainError:
    """The one line for a full disk: the file, the checkpoint that survives it, what to do."""
    kept = (
        f"the last intact checkpoint is {run.last_path} (iteration {progress.intact})"
        if progress.intact is not None
        else "no checkpoint was saved yet"
    )
    return MetatrainError(
        f"{e}; {kept}: free some space, then run the same command again to resume"
    )


def _meta_train(run: Run, parts: Parts, progress: Progress, logger) -> None:
    """The meta-training loop: log, validate and save at their intervals; on a signal,
    save last.pt after the iteration in progress and raise `Interrupted`."""
    t = run.cfg.train
    # t0: since when the wall time is not yet in progress.wall; tick: when the log
    # interval began, moved on by the pauses for validation and saving.
    t0 = time.perf_counter()
    tick = t0 - progress.elapsed
    with interrupt.deferred(progress.start):
        for it in range(progress.start, t.iterations):
            _train_step(run, parts, progress, it)
            done = it + 1
            logger.advance(done)
            if done % t.log_interval == 0 or done == t.iterations:
                now = time.perf_counter()
                logged = {"time/iter_s": (now - tick) / (done - progress.ticked)}
                logged |= parts.guard.metrics()
                if progress.sums is not None:
                    loss, acc = (progress.sums / progress.n_sum).tolist()
                    # Accuracy in percent, as val/acc and test/acc.
                    logged |= {"train/loss": loss, "train/acc": 100 * acc}
                logger.log(logged, step=done)
                progress.sums, progress.n_sum, tick, progress.ticked = None, 0, now, done
                distributed.check_identical(parts.learner.net, done)
            paused = time.perf_counter()  # validation and saving stay out of time/iter_s
            _validate(run, parts, progress, logger, done)
            saving = done % t.checkpoint_interval == 0 or done == t.iterations
            if saving or interrupt.requested():
                progress.wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                _save_last(run, parts, progress, done, elapsed=paused - tick)
            tick += time.perf_counter() - paused
            if interrupt.requested():
                distributed.barrier("the interrupt")  # last.pt is written: all stop
                raise interrupt.Interrupted(interrupt.requested(), done)
        progress.wall += time.perf_counter() - t0
    interrupt.reached(t.iterations)


def _train_step(run: Run, parts: Parts, progress: Progress, it: int) -> None:
    """One meta-step on this rank's share of a task batch; adds the full batch's
    (loss, acc) to the interval's sums and takes on a signal any rank received."""
    batch = parts.train_sampler.sample(run.cfg.algorithm.meta_batch, parts.generator)
    batch = distributed.shard(batch)  # this rank's tasks (all of them in one)
    metrics = parts.guard.step(batch, it)  # None: a non-finite step, undone
    step = None
    if metrics is not None:
        # Sum on device; .item() only at log time: no sync per iteration.
        step = torch.stack([metrics["loss"].detach(), metrics["acc"].detach()])
        step = step * distributed.share(batch)
    # Over ranks: the full batch's metrics, and a signal any rank received
    step, signum = distributed.tally(step, interrupt.requested())
    if signum is not None:
        interrupt.request(signum)
    if step is not None:
        progress.sums = step if progress.sums is None else progress.sums + step
        progress.n_sum += 1


def _validate(run: Run, parts: Parts, progress: Progress, logger, done: int) -> None:
    """At the validation interval (and the last iteration): log val/acc and keep the
    network among the best-k (rank 0 writes the files)."""
    t = run.cfg.train
    if parts.val_tasks is None or not (done % t.val_interval == 0 or done == t.iterations):
        return
    with activity("validation", len(parts.val_tasks), "tasks", announce=False) as step:
        val = evaluate(_Counting(parts.learner, step), parts.val_tasks, run.cfg.eval.batch)
    logger.log({"val/acc": val["acc"], "val/acc_ci95": val["ci95"]}, step=done)
    progress.best = _keep_best(
        progress.best, val["acc"], done, parts.learner,
        ckpt_dir=run.ckpt_dir, keep=t.keep_best, write=run.main,
    )  # fmt: skip


def _meta_test(run: Run, parts: Parts, progress: Progress, logger) -> dict:
    """Test the last and best-k networks, write results.json and the finished
    last.pt, and return the results."""
    cfg = run.cfg
    distributed.barrier("the end of meta-training")  # rank 0's best-k files exist
    members = load_members(progress.best, cfg.eval.ensemble_top_k, run.ckpt_dir)
    # One pass over the tasks per member, and one more for the last parameters
    # unless the single model is the best member (meta_test.test_block).
    from_best = cfg.eval.test_from.value == "best" and bool(members)
    passes = len(members) + (not from_best)
    with activity("test", passes * len(parts.test_tasks), "tasks") as step:
        test = test_block(
            _Counting(parts.learner, step), parts.test_tasks, cfg.eval.batch, progress.best,
            members, cfg.eval.test_from.value, bn_eval_mode(cfg.model.bn_eval),
        )  # fmt: skip
    accs = {k: v for k, v in summary_metrics(test).items() if k.endswith(("acc", "_ci95"))}
    logger.log(accs, step=cfg.train.iterations)  # headline, single and ensemble
    results = _results(run, parts, progress, test)
    if run.main:
        save_json(results, run.results_path)
    _save_last(run, parts, progress, cfg.train.iterations, results=results)
    distributed.barrier("the end of the run")  # results.json is written
    logger.finish({**summary_metrics(test), "algorithm": results["algorithm"]})
    return results


def _results(run: Run, parts: Parts, progress: Progress, test: dict) -> dict:
    """results.json's contents."""
    cfg, best, iterations = run.cfg, progress.best, run.cfg.train.iterations
    ran = iterations - progress.start  # iterations this session
    return {
        "status": "finished",
        "algorithm": algorithm_label(cfg),
        "learner": cfg.algorithm.name,
        "dataset": cfg.dataset.name,
        "ways": cfg.dataset.ways,
        "shots": cfg.dataset.shots,
        "test": test,
        "best_val": {"acc": best[0][0], "iteration": best[0][1]} if best else None,
        "iterations": iterations,
        "wall_time_s": progress.wall,
        "nonfinite_skips": parts.guard.skipped,
        "sec_per_iter": (progress.wall - progress.wall_start) / ran if ran > 0 else None,
        "device": str(run.device),
        "world_size": run.ranks,
        "overrides": overrides_of(),
        "config": run.fingerprint,
    }


class _Counting:
    """The learner, counting the tasks it predicts for a progress line."""

    def __init__(self, learner, step):
        self._learner, self._step = learner, step

    def __getattr__(self, name):
        return getattr(self._learner, name)

    def predict(self, batch, *args, **kwargs):
        out = self._learner.predict(batch, *args, **kwargs)
        # (tasks, ways*queries, ways); every rank computes a like share of the set
        self._step(len(out) * distributed.world())
        return out


class _Silent:
    """The logger of a distributed run's other ranks: rank 0 writes and shows."""

    def advance(self, iteration: int) -> None:
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, summary: dict | None = None) -> None:
        pass


def _keep_best(best, acc, iteration, learner, *, ckpt_dir, keep, write=True):
    """Save the network if it ranks among the `keep` best validation scores (the
    files: only where `write`, rank 0 of a distributed run)."""
    ranked = sorted(
        best + [(acc, iteration, f"best-{iteration:07d}.pt")], key=lambda b: (-b[0], b[1])
    )
    kept, dropped = ranked[:keep], ranked[keep:]
    if not write:
        return kept
    if any(b[1] == iteration for b in kept):
        checkpoint.save(learner.net.state_dict(), ckpt_dir / f"best-{iteration:07d}.pt")
    for b in dropped:
        (ckpt_dir / b[2]).unlink(missing_ok=True)
    return kept
