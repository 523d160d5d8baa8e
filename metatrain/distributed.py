"""One run over several processes: torch.distributed, launched by torchrun or submitit.

Task parallelism. Every rank draws the same full meta-batch from the run's
generator and keeps a contiguous shard of its tasks (`shard`), so the tasks a run
sees do not depend on the process count. A learner averages what its update is
made of (meta-gradients, Reptile's displacements, batch-norm statistics) through
`mean_`, weighted by each shard's share of the tasks: the average of shard means
weighted by n_r / B is the full batch's mean, so unequal shards agree with one
process too. Every rank then applies the same update to the same parameters;
`check_identical` compares a checksum of them every log interval and stops the
run if any rank drifted.

Evaluation hands each rank whole evaluation batches in turn (`gather_batches`)
and gathers the logits: a batch is computed exactly as one process computes it,
so the numbers are identical.

Faults. Collectives time out after `train.dist_timeout_s`; a rank that cannot reach
the others raises RankLost naming the rank that is gone (its pid no longer runs on
this host, or it reported its own error through the rendezvous store).

The process group is set up from the variables torchrun exports (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, in a Slurm job started by
submitit with several tasks, from submitit's TorchDistributedEnvironment. Without
them (plain `metatrain`) the run is one process and every helper is a no-op.
"""

import contextlib
import datetime
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from metatrain.errors import MetatrainError
from metatrain.task_batch import TaskBatch

_ctx = {"rank": 0, "world": 1, "local_rank": 0, "device": torch.device("cpu"), "up": False}
_KEY = "metatrain"


class RankLost(MetatrainError):
    """A collective failed or timed out: another rank died, hung or failed."""


def _submitit_env() -> None:
    """Export torchrun's variables from a submitit Slurm job with several tasks."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # GPUs stay visible: LOCAL_RANK picks one (see place)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_rank() -> int:
    """This process's rank as its launcher set it (before any process group exists)."""
    _submitit_env()
    return int(os.environ.get("RANK", "0"))


def env_world() -> int:
    _submitit_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_world() -> int:
    """The run's processes on this machine (LOCAL_WORLD_SIZE); 1 outside a distributed run."""
    _submitit_env()
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return max(int(local), 1) if local.isdigit() else 1


def rank() -> int:
    return _ctx["rank"]


def world() -> int:
    return _ctx["world"]


def is_main() -> bool:
    return _ctx["rank"] == 0


def place(device: torch.device) -> torch.device:
    """The device of this rank: with CUDA, the GPU of its local rank."""
    if device.type != "cuda" or env_world() == 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
    torch.cuda.set_device(device)
    return device


def setup(device: torch.device, timeout_s: float) -> int:
    """Join the process group the launcher describes (once); returns the world size."""
    n = env_world()
    if n == 1 or _ctx["up"]:
        return _ctx["world"]
    r = env_rank()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=r, world_size=n, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise MetatrainError(
            f"rank {r} of {n} could not join the others at {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} within {timeout_s:g} s ({_first_line(e)}); "
            "start every rank with the same torchrun command"
        ) from None
    _ctx.update(rank=r, world=n, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    _ctx.update(device=device if backend == "nccl" else torch.device("cpu"), up=True)
    _store_set(f"pid/{r}", f"{socket.gethostname()}:{os.getpid()}")
    barrier("start-up")
    # read now: if the store's host dies later, asking it would only add a C++ trace
    _ctx["pids"] = {q: _store_get(f"pid/{q}") for q in range(n)}
    if r != 0:  # rank 0 speaks for the run: the others print nothing but their own faults
        from metatrain.logging import console

        console.quiet = True
    return n


def teardown() -> None:
    if _ctx["up"]:
        _ctx.update(rank=0, world=1, up=False)
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _store_set(key: str, value: str) -> None:
    store = _store()
    if store is not None:
        # the store may have gone with a dead rank: then there is no one to tell
        with contextlib.suppress(Exception):
            store.set(f"{_KEY}/{key}", value)


def _store_get(key: str) -> str | None:
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([f"{_KEY}/{key}"]):
            return None
        return store.get(f"{_KEY}/{key}").decode()
    except Exception:  # noqa: BLE001
        return None


def report_failure(message: str) -> None:
    """Leave this rank's own error where the other ranks look when it is gone."""
    if _ctx["up"]:
        _store_set(f"failed/{_ctx['rank']}", message[:500])


def _culprits() -> str:
    """Which other rank ended: one on this host whose pid is gone, else one that
    reported its own error through the store."""
    others = [r for r in range(_ctx["world"]) if r != _ctx["rank"]]
    local = {}
    for r in others:
        where = _ctx.get("pids", {}).get(r)
        host, _, pid = (where or "").rpartition(":")
        if host == socket.gethostname():
            local[r] = int(pid)
    found = []
    # A dying process drops its connections a moment before the kernel marks it dead.
    for _ in range(30):
        found = [f"rank {r} (pid {p}) has died" for r, p in local.items() if not _running(p)]
        if found or not local:
            break
        time.sleep(0.1)
    if not found:
        for r in others:
            failed = _store_get(f"failed/{r}")
            if failed is not None:
                found.append(f"rank {r} failed: {failed}")
    return "; ".join(found) if found else "another rank died, hung or failed"


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its launcher, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True


def _collective(what: str, fn):
    try:
        return fn()
    except (RuntimeError, dist.DistError) as e:
        raise RankLost(
            f"rank {_ctx['rank']} lost the other ranks during {what}: {_culprits()} "
            f"({_first_line(e)}); last.pt keeps the last saved iteration: run the same "
            "command again to resume"
        ) from None


# -- the meta-batch ------------------------------------------------------------


def shard_range(tasks: int, r: int, n: int) -> tuple[int, int]:
    """[first, end) of rank r's contiguous share of `tasks`: sizes differ by at most one."""
    base, extra = divmod(tasks, n)
    first = r * base + min(r, extra)
    return first, first + base + (r < extra)


def shard(batch: TaskBatch) -> TaskBatch:
    """This rank's tasks of the full batch, knowing where they sit in it."""
    if _ctx["world"] == 1:
        return batch
    a, b = shard_range(len(batch), _ctx["rank"], _ctx["world"])
    return TaskBatch(
        batch.xs[a:b], batch.ys[a:b], batch.xq[a:b], batch.yq[a:b], shard=(a, len(batch))
    )


def share(batch: TaskBatch) -> float:
    """The fraction of the full meta-batch that `batch` (a shard) holds."""
    return 1.0 if batch.shard is None else len(batch) / batch.shard[1]


def mean_(tensors: list[torch.Tensor], weight: float, what: str = "the meta-update") -> None:
    """In place, sum over ranks of weight * tensor: with weight = the shard's share of
    the tasks, the mean over the whole meta-batch. One collective per dtype."""
    if _ctx["world"] == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group]) * weight  # (elements,)
        flat = flat.to(_ctx["device"])
        _collective(what, lambda flat=flat: dist.all_reduce(flat))
        flat = flat.to(group[0].device)
        i = 0
        for t in group:
            t.copy_(flat[i : i + t.numel()].view_as(t))
            i += t.numel()


def tally(step: torch.Tensor | None, signum: int | None) -> tuple[torch.Tensor | None, int | None]:
    """One collective per iteration: the sum over ranks of `step` (each rank's metrics
    weighted by its share) and the signal any rank received (the largest number),
    so that every rank stops after the same iteration."""
    if _ctx["world"] == 1:
        return step, signum
    local = torch.zeros(3, dtype=torch.float64)
    if step is not None:
        local[:2] = step.detach().double().cpu()
    local[2] = signum or 0
    local = local.to(_ctx["device"])
    parts = [torch.zeros_like(local) for _ in range(_ctx["world"])]
    _collective("the iteration's tally", lambda: dist.all_gather(parts, local))
    every = torch.stack(parts).cpu()  # (ranks, 3)
    total = every[:, :2].sum(0)
    got = int(every[:, 2].max())
    out = None if step is None else total.to(step.device, step.dtype)
    return out, (got or None)


def check_identical(net: torch.nn.Module, iteration: int) -> None:
    """Fail loudly when a rank's parameters or buffers differ from rank 0's: the sum and
    the sum of squares of every floating tensor, compared exactly."""
    if _ctx["world"] == 1:
        return
    sums = torch.zeros(2, dtype=torch.float64)
    for t in net.state_dict().values():
        if t.is_floating_point():
            d = t.detach().double()
            sums += torch.stack([d.sum(), (d * d).sum()]).cpu()
    sums = sums.to(_ctx["device"])
    parts = [torch.zeros_like(sums) for _ in range(_ctx["world"])]
    _collective("the parameter check", lambda: dist.all_gather(parts, sums))
    drifted = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
    if drifted:
        raise MetatrainError(
            f"after iteration {iteration} the parameters of rank(s) "
            f"{', '.join(map(str, drifted))} differ from rank 0's; the ranks no longer run "
            "one model (a non-deterministic kernel or a per-rank random draw): "
            "report this with the command that ran"
        )


def barrier(what: str) -> None:
    if _ctx["world"] > 1:
        _collective(what, dist.barrier)


# -- evaluation -----------------------------------------------------------------


def gather_batches(predict, batches) -> list[torch.Tensor]:
    """predict(batch) for every batch: each rank computes the batches i with
    i % world == rank, and every rank gets all of them back, in order."""
    if _ctx["world"] == 1:
        return [predict(b) for b in batches]
    r, n = _ctx["rank"], _ctx["world"]
    mine, device = {}, None
    for i, b in enumerate(batches):
        if i % n == r:
            out = predict(b)
            device = out.device
            mine[i] = out.cpu()
    every = [None] * n
    _collective("evaluation", lambda: dist.all_gather_object(every, mine))
    merged = {k: v for part in every for k, v in part.items()}
    device = device or _ctx["device"]
    return [merged[i].to(device) for i in sorted(merged)]
