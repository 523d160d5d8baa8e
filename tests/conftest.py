import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from metatrain.algorithms.maml import MamlConfig
from metatrain.algorithms.reptile import ReptileConfig
from metatrain.cli import CONF_DIR
from metatrain.config import TrainConfig
from metatrain.task_batch import TaskBatch

REPO = Path(__file__).resolve().parent.parent

# Small enough for seconds-long CLI runs on two cores, large enough to learn.
TINY = [
    "logger=none",
    "model.filters=8",
    "algorithm.meta_batch=4",
    "dataset.queries=2",
    "train.iterations=30",
    "train.log_interval=10",
    "train.val_interval=10",
    "train.checkpoint_interval=10",
    "eval.val_tasks=20",
    "eval.test_tasks=40",
]


def data_dir() -> Path | None:
    root = os.environ.get("METATRAIN_DATA")
    if root and (Path(root) / "omniglot" / "omniglot-py").is_dir():
        return Path(root)
    return None


@pytest.fixture(scope="session")
def omniglot_data() -> Path:
    """The folder holding omniglot/ (METATRAIN_DATA). Missing: skip, or fail under
    METATRAIN_REQUIRE_DATA=1 as in CI."""
    root = data_dir()
    if root is None:
        msg = "real Omniglot not found: set METATRAIN_DATA to a folder with omniglot/omniglot-py/"
        if os.environ.get("METATRAIN_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return root


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def maml_cfg(**kw):
    return OmegaConf.structured(MamlConfig(**kw))


def reptile_cfg(**kw):
    return OmegaConf.structured(ReptileConfig(**kw))


def train_cfg(**kw):
    return OmegaConf.structured(TrainConfig(**kw))


def random_tasks(tasks=3, ways=3, shots=2, queries=3, size=16, channels=1, seed=0):
    """A float64 task batch of noise images whose classes differ in mean."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(tasks, ways, 1, channels, 1, 1, generator=g, dtype=torch.float64)

    def draw(k):
        x = torch.randn(tasks, ways, k, channels, size, size, generator=g, dtype=torch.float64)
        y = torch.arange(ways).repeat_interleave(k).expand(tasks, -1)
        return (x + shift).reshape(tasks, ways * k, channels, size, size), y.contiguous()

    xs, ys = draw(shots)
    xq, yq = draw(queries)
    return TaskBatch(xs, ys, xq, yq)


def metatrain_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "metatrain"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "metatrain.cli"]


def signal_cli_when(ready, sig: int, *args: str, stderr=subprocess.DEVNULL, timeout=900):
    """Start metatrain with args and send it sig once ready() holds (polled; a loaded
    machine can be slow, hence the generous timeout). Returns the process, unreaped."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [*metatrain_cmd(), *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env
    )
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    return proc


def run_cli(*args: str, timeout: float = 900, **popen) -> subprocess.CompletedProcess:
    env = {**popen.pop("env", os.environ), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [*metatrain_cmd(), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=popen.pop("cwd", None),
        **popen,
    )


@pytest.fixture
def clean_dir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)
