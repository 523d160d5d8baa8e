"""train.threads: what `auto` picks from the CPUs allowed, Slurm and the load."""

import pytest
import torch

from metatrain import threads
from metatrain.errors import MetatrainError


def choose(requested="auto", env=None, cpus=2, machine_cpus=2, load=0.0):
    return threads.choose(requested, env or {}, cpus, machine_cpus, load)


def test_an_idle_machine_gets_a_thread_per_allowed_cpu():
    assert choose(load=0.0)[0] == 2
    assert choose(load=0.2)[0] == 2  # a shell and an editor
    n, why = choose(cpus=8, machine_cpus=8, load=0.0)
    assert n == 8 and "8 CPUs allowed" in why and "load 0.0 on 8 leaves 8 idle" in why


@pytest.mark.parametrize("load, expected", [(0.8, 1), (1.0, 1), (2.0, 1), (4.0, 1), (8.0, 1)])
def test_load_leaves_only_the_idle_cpus_never_fewer_than_one(load, expected):
    n, why = choose(load=load)
    assert n == expected
    assert f"load {load:.1f} on 2" in why and "stall each other" in why


def test_the_load_of_a_larger_machine_counts_against_its_own_cpus():
    # 16 CPUs, 4 of them busy with others' work, 8 allowed by taskset: 8 threads
    assert choose(cpus=8, machine_cpus=16, load=4.0)[0] == 8
    assert choose(cpus=8, machine_cpus=16, load=12.0)[0] == 4


def test_slurm_cpus_per_task_caps_and_a_slurm_job_ignores_the_node_load():
    n, why = choose(env={"SLURM_CPUS_PER_TASK": "2"}, cpus=16, machine_cpus=16, load=0.0)
    assert n == 2 and "SLURM_CPUS_PER_TASK=2" in why
    # inside an allocation the CPUs are the job's own: other jobs' load is elsewhere
    env = {"SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_ID": "7"}
    n, why = choose(env=env, cpus=4, machine_cpus=64, load=60.0)
    assert n == 4 and "Slurm job" in why


def test_omp_num_threads_and_an_explicit_count_are_the_users_choice():
    assert choose(env={"OMP_NUM_THREADS": "1"}, load=0.0) == (1, "auto: OMP_NUM_THREADS=1 is set")
    assert choose("3", load=9.0) == (3, "train.threads=3")


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_a_bad_value_is_one_clear_error(bad):
    with pytest.raises(MetatrainError, match="give auto or a number of threads"):
        choose(bad)


def test_apply_sets_torchs_thread_count():
    before = torch.get_num_threads()
    try:
        n, why = threads.apply("1")
        assert n == 1 and torch.get_num_threads() == 1 and why == "train.threads=1"
    finally:
        torch.set_num_threads(before)


def test_this_process_defaults_come_from_its_affinity_and_load():
    n, why = threads.choose("auto", env={})
    assert 1 <= n <= threads.cpus_allowed() and why.startswith("auto: ")
