"""How many CPU threads torch uses (`train.threads`), and why.

torch starts one intra-op thread per core. On a machine shared with other work that
is the worst choice: each operator waits at a barrier for its slowest thread, and a
thread that has to share its core with another process stalls every operator. On
this project's 2-core machine, MAML quickstart meta-iterations per second
(scripts/threads.py; the machine already carried a load of 7.6 to 10 from others):

    busy loops added    0            2       4
    1 thread            0.54, 0.30   0.15    0.11
    2 threads           0.04, 0.02   0.01    0.01

so `auto` uses only the CPUs that other processes leave idle, never fewer than one:
the CPUs this process may run on (os.sched_getaffinity: taskset, cgroups), at most
Slurm's SLURM_CPUS_PER_TASK, less the 1-minute load average of the machine. Under a
Slurm allocation the CPUs are the job's own, so the node's load (other jobs on other
CPUs) is not counted. OMP_NUM_THREADS, when set, is taken as the user's choice.
"""

import math
import os

from metatrain.errors import MetatrainError

# Idle CPUs are counted as load-free capacity rounded down after adding this margin:
# a load average of 0.3 on 2 CPUs still leaves 2 (a shell, an editor), 0.8 leaves 1.
ROUND_UP_FROM = 0.75


def cpus_allowed() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose(
    requested: str | int,
    env: dict | None = None,
    cpus: int | None = None,
    machine_cpus: int | None = None,
    load: float | None = -1.0,
) -> tuple[int, str]:
    """(threads, reason) for train.threads=`requested` (`auto` or a positive count).

    The other arguments default to this process's environment, CPU affinity, the
    machine's CPU count and its 1-minute load average (tests pass their own)."""
    env = os.environ if env is None else env
    text = str(requested).strip().lower()
    if text != "auto":
        if not text.isdigit() or int(text) < 1:
            raise MetatrainError(
                f"train.threads={requested}: give auto or a number of threads (1, 2, ...)"
            )
        n = int(text)
        return n, f"train.threads={n}"
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        n = int(env["OMP_NUM_THREADS"])
        return n, f"auto: OMP_NUM_THREADS={n} is set"
    cpus = cpus_allowed() if cpus is None else cpus
    machine_cpus = (os.cpu_count() or cpus) if machine_cpus is None else machine_cpus
    limit, where = cpus, f"{cpus} CPU{'s' * (cpus != 1)} allowed"
    slurm = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        limit = min(limit, int(slurm))
        where = f"SLURM_CPUS_PER_TASK={slurm}, {cpus} CPU{'s' * (cpus != 1)} allowed"
    local = env.get("LOCAL_WORLD_SIZE", "").strip()
    # a distributed run's processes on this machine share its CPUs (a Slurm task has its own)
    if local.isdigit() and int(local) > 1 and not slurm.isdigit():
        limit = max(1, limit // int(local))
        where += f", shared by {local} processes"
    if env.get("SLURM_JOB_ID"):
        return limit, f"auto: {where}, a Slurm job's own CPUs"
    load = _loadavg() if load == -1.0 else load
    if load is None:
        return limit, f"auto: {where}, load unknown"
    # Others' work may run on any of the machine's CPUs; what it leaves idle is ours.
    idle = max(0, math.floor(machine_cpus - load + (1 - ROUND_UP_FROM)))
    n = max(1, min(limit, idle))
    why = f"auto: {where}, load {load:.1f} on {machine_cpus} leaves {idle} idle"
    if n < limit:
        why += "; more threads than idle CPUs stall each other"
    return n, why


def apply(requested: str | int) -> tuple[int, str]:
    """Choose and set torch's intra-op thread count; returns (threads, reason)."""
    import torch

    n, why = choose(requested)
    torch.set_num_threads(n)
    return n, why
