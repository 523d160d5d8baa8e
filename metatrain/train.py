"""train(cfg): build everything, meta-train with validation and checkpoints,
meta-test, write results.json. What the CLI and the tests call."""

import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from metatrain import checkpoint, distributed, header, interrupt, rng, run_lock, threads
from metatrain.algorithms import build_learner, learner_class
from metatrain.algorithms.inner import setup_device
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


def _train(cfg, run_dir: Path) -> dict:
    ckpt_dir = run_dir / "checkpoints"
    last_path = ckpt_dir / "last.pt"
    results_path = run_dir / "results.json"
    fingerprint = checkpoint.config_fingerprint(cfg)
    _check_settings(cfg)
    device = distributed.place(resolve_device(cfg.device.value))
    ranks = distributed.setup(device, cfg.train.dist_timeout_s)
    main = distributed.is_main()  # only rank 0 writes files and logs
    n_threads, why = threads.apply(cfg.train.threads)
    for line in header.lines(cfg, run_dir, str(device), n_threads, why):
        console.print(line, markup=False, highlight=False)
    for line in inert_settings(cfg):
        console.print(f"[yellow]warning: {line}", highlight=False)

    # A finished run is known by its results.json alone, so a damaged last.pt cannot
    # make it look unfinished.
    if results_path.exists():
        results = checkpoint.finished_results(results_path, fingerprint)
        console.print(f"[green]{run_dir} is finished; its results.json stands")
        test = results.get("test") or {}
        # results.json files written before the single/ensemble block show their headline
        shown = describe(test) if "single" in test else f"test accuracy: {test.get('acc')}"
        console.print(f"[bold green]{shown}\nresults: {results_path}")
        return results
    resume = checkpoint.load(last_path) if last_path.exists() else None
    distributed.barrier("start-up")  # every rank has read last.pt before rank 0 writes it
    if resume is not None:
        checkpoint.check_same_config(resume["config"], fingerprint, last_path)
        if resume.get("results") is not None:  # results.json was removed: write it back
            if main:
                save_json(resume["results"], results_path)
            console.print(f"[green]{run_dir} is finished; results.json rewritten from {last_path}")
            return resume["results"]

    setup_device(device, cfg.train)
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

    start, wall, best = 0, 0.0, []  # best: [(val acc, iteration, file name)], best first
    # The log interval in progress: sums of (loss, acc) over n_sum steps since
    # iteration `ticked`, `elapsed` seconds of them. Kept in last.pt, so the first row
    # logged after a resume is the mean over the whole interval, as without the stop.
    interval = {"sums": None, "n": 0, "elapsed": 0.0, "from": 0}
    if resume is not None:
        learner.load_state_dict(resume["learner"])
        rng.restore(resume["rng"], generator)
        start, wall, best = resume["iteration"], resume["wall_time_s"], resume["best"]
        interval = resume.get("interval") or {**interval, "from": start}
        console.print(f"[cyan]resuming {run_dir} at iteration {start}")
    intact = start if resume is not None else None  # last.pt's iteration on disk
    t = cfg.train
    guard = NonFiniteGuard(learner, t.nonfinite, t.nonfinite_patience)
    guard.skipped = resume.get("nonfinite_skips", 0) if resume is not None else 0

    def save_last(iteration: int, results: dict | None = None, elapsed: float = 0.0) -> None:
        nonlocal intact
        if not main:  # rank 0's file is every rank's (their states are identical)
            intact = iteration
            return
        checkpoint.save(
            {
                "iteration": iteration,
                "learner": learner.state_dict(),
                "rng": rng.capture(generator),
                "config": fingerprint,
                "best": best,
                "wall_time_s": wall,
                "nonfinite_skips": guard.skipped,
                "results": results,
                "interval": {
                    "sums": None if sums is None else sums.tolist(),
                    "n": n_sum,
                    "elapsed": elapsed,
                    "from": ticked,
                },
            },
            last_path,
        )
        intact = iteration

    wall_before = wall  # this session's share of the wall time gives sec_per_iter
    interrupt.reached(start)
    with interrupt.deferred(start):  # from here a signal stops the loop between iterations
        logger = RunLogger(cfg, run_dir, start, t.iterations, wall) if main else _Silent()
    sums, n_sum, t0 = interval["sums"], interval["n"], time.perf_counter()
    sums = None if sums is None else torch.tensor(sums, device=device)
    tick, ticked = t0 - interval["elapsed"], interval["from"]
    try:
        with interrupt.deferred(start):
            for it in range(start, t.iterations):
                batch = train_sampler.sample(cfg.algorithm.meta_batch, generator)
                batch = distributed.shard(batch)  # this rank's tasks (all of them in one)
                metrics = guard.step(batch, it)  # None: a non-finite step, undone
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
                    sums = step if sums is None else sums + step
                    n_sum += 1
                done = it + 1
                logger.advance(done)
                if done % t.log_interval == 0 or done == t.iterations:
                    now = time.perf_counter()
                    logged = {"time/iter_s": (now - tick) / (done - ticked)} | guard.metrics()
                    if sums is not None:
                        loss, acc = (sums / n_sum).tolist()
                        # Accuracy in percent, as val/acc and test/acc.
                        logged |= {"train/loss": loss, "train/acc": 100 * acc}
                    logger.log(logged, step=done)
                    sums, n_sum, tick, ticked = None, 0, now, done
                    distributed.check_identical(learner.net, done)
                paused = time.perf_counter()  # validation and saving stay out of time/iter_s
                validating = val_tasks is not None
                if validating and (done % t.val_interval == 0 or done == t.iterations):
                    with activity("validation", len(val_tasks), "tasks", announce=False) as step:
                        val = evaluate(_Counting(learner, step), val_tasks, cfg.eval.batch)
                    logger.log({"val/acc": val["acc"], "val/acc_ci95": val["ci95"]}, step=done)
                    best = _keep_best(
                        best, val["acc"], done, learner, ckpt_dir, t.keep_best, write=main
                    )
                saving = done % t.checkpoint_interval == 0 or done == t.iterations
                if saving or interrupt.requested():
                    wall += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    save_last(done, elapsed=paused - tick)
                tick += time.perf_counter() - paused
                if interrupt.requested():
                    distributed.barrier("the interrupt")  # last.pt is written: all stop
                    raise interrupt.Interrupted(interrupt.requested(), done)
            wall += time.perf_counter() - t0
        interrupt.reached(t.iterations)

        distributed.barrier("the end of meta-training")  # rank 0's best-k files exist
        members = load_members(best, cfg.eval.ensemble_top_k, ckpt_dir)
        # One pass over the tasks per member, and one more for the last parameters
        # unless the single model is the best member (meta_test.test_block).
        from_best = cfg.eval.test_from.value == "best" and bool(members)
        passes = len(members) + (not from_best)
        with activity("test", passes * len(test_tasks), "tasks") as step:
            test = test_block(
                _Counting(learner, step), test_tasks, cfg.eval.batch, best, members,
                cfg.eval.test_from.value, bn_eval_mode(cfg.model.bn_eval),
            )  # fmt: skip
        accs = {k: v for k, v in summary_metrics(test).items() if k.endswith(("acc", "_ci95"))}
        logger.log(accs, step=t.iterations)  # headline, single and ensemble
        results = {
            "status": "finished",
            "algorithm": algorithm_label(cfg),
            "learner": cfg.algorithm.name,
            "dataset": ds.name,
            "ways": ds.ways,
            "shots": ds.shots,
            "test": test,
            "best_val": {"acc": best[0][0], "iteration": best[0][1]} if best else None,
            "iterations": t.iterations,
            "wall_time_s": wall,
            "nonfinite_skips": guard.skipped,
            "sec_per_iter": (wall - wall_before) / (t.iterations - start)
            if start < t.iterations
            else None,
            "device": str(device),
            "world_size": ranks,
            "overrides": overrides_of(),
            "config": fingerprint,
        }
        if main:
            save_json(results, results_path)
        save_last(t.iterations, results)
        distributed.barrier("the end of the run")  # results.json is written
        logger.finish({**summary_metrics(test), "algorithm": results["algorithm"]})
    except DiskFull as e:
        logger.finish()
        kept = (
            f"the last intact checkpoint is {last_path} (iteration {intact})"
            if intact is not None
            else "no checkpoint was saved yet"
        )
        raise MetatrainError(
            f"{e}; {kept}: free some space, then run the same command again to resume"
        ) from None
    except BaseException:
        logger.finish()
        raise
    console.print(f"[bold green]{describe(test)}\nresults: {results_path}")
    return results


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


def _keep_best(best, acc, iteration, learner, ckpt_dir, keep, write=True):
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
