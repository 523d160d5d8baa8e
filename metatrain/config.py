"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each YAML file in conf/<group>/ starts from one of these schemas (its defaults
list names `<kind>_schema`), so a misspelled key or a value of the wrong type
fails when Hydra composes the config, before any work starts.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Backend(Enum):
    auto = "auto"  # the faster of the two for the device and derivative order
    loop = "loop"  # one task at a time
    vmap = "vmap"  # the task batch at once with torch.func.vmap
    groups = "groups"  # the task batch as channel groups of one network


class BNEval(Enum):
    # How batch norm normalises at meta-test (adaptation steps always use batch statistics).
    transductive = "transductive"  # the query batch with its own statistics (MAML, MAML++)
    # each query with the support set alone: statistics of the N*K support images plus
    # that one query, one pass per query (Reptile's non-transductive test, Nichol et al.)
    support_plus_query = "support_plus_query"
    running = "running"  # running statistics (per inner step under bnrs)
    batch = "batch"  # the former name of transductive, accepted with a notice


class NonFinite(Enum):
    stop = "stop"  # end the run at the first non-finite meta-loss or meta-gradient
    skip = "skip"  # undo that step and go on (train.nonfinite_patience in a row: stop)


class TestFrom(Enum):
    best = "best"  # the best validation checkpoint(s)
    last = "last"  # the final parameters


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    meta_batch: int = 32  # tasks per meta-iteration
    meta_lr: float = 1e-3
    # Clamp each element of the network's meta-gradient to [-grad_clip, grad_clip]
    # (not a norm; learned inner rates are not clamped); 0 turns clipping off.
    grad_clip: float = 0.0


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str | None = None  # else $METATRAIN_DATA/<name>, else ~/.cache/metatrain/<name>
    ways: int = 5
    shots: int = 1
    queries: int = 5  # query examples per class
    image_size: int = MISSING
    channels: int = MISSING
    mean: list[float] = MISSING  # per-channel input normalisation, on the [0, 1] scale
    std: list[float] = MISSING
    # auto: each split in memory while it fits half the available memory, else memory-mapped
    # from its cache file (data/store.py); true: all in memory; false: all memory-mapped
    in_memory: str = "auto"


@dataclass
class ModelConfig:
    """What every backbone's schema has (models/<name>.py extends it)."""

    name: str = MISSING
    # The test protocol's normalisation: batch statistics of the query set, each query
    # with the support set alone, or running statistics. Learners and result records
    # read it for every backbone; where a backbone keeps no batch statistics the
    # modes agree.
    bn_eval: BNEval = BNEval.transductive


@dataclass
class BatchNormConfig(ModelConfig):
    """What a batch-norm backbone's schema adds (models/backbone.BatchNormBackbone)."""

    bn_momentum: float = 0.1
    bn_eps: float = 1e-5  # added to the variance before dividing (TF's batch norm: 1e-3)


@dataclass
class LoggerConfig:
    name: str = "none"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "metatrain"
    entity: str | None = None
    group: str | None = None  # default: the sweep name
    run_name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    iterations: int = 60000
    iters_per_epoch: int = 500  # one "epoch", used by msl, da and the validation schedule
    log_interval: int = 100
    val_interval: int = 500
    checkpoint_interval: int = 500
    keep_best: int = 5  # best validation checkpoints kept on disk
    backend: Backend = Backend.auto
    vmap_chunk: int = 0  # tasks per vmap call; 0 = the whole meta-batch
    # Second-order MAML: recompute each inner step in the backward sweep, so memory
    # does not grow with the inner steps (algorithms/recompute.py). Same meta-gradient.
    inner_checkpoint: bool = False
    # Speed switches (metatrain/algorithms/inner.py); none changes the maths beyond
    # rounding except amp_bf16.
    channels_last: str = "auto"  # auto | true | false: NHWC activations in the loop backend
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions
    amp_bf16: bool = False  # bf16 autocast of the task computation
    compile: bool = False  # torch.compile the model for passes differentiated once
    cuda_graphs: bool = False  # CUDA: compile in reduce-overhead mode (CUDA graphs)
    nonfinite: NonFinite = NonFinite.stop  # what a NaN/inf meta-loss or meta-gradient does
    nonfinite_patience: int = 10  # skips in a row after which `skip` stops too
    # torch's CPU threads: auto = the CPUs others leave idle (metatrain/threads.py), or a count
    threads: str = "auto"
    # A distributed run (metatrain/distributed.py): seconds a collective waits for the
    # other ranks before the run stops with a line naming the one that is gone
    dist_timeout_s: float = 300.0


@dataclass
class EvalConfig:
    seed: int = 1234  # fixes the validation and test task sets for every run
    val_tasks: int = 200
    test_tasks: int = 600
    # Query examples per class of validation and test tasks; 0: dataset.queries. MAML's
    # code meta-trains MiniImageNet with 15 and tests with as many as shots.
    queries: int = 0
    batch: int = 50  # tasks adapted at once during evaluation
    ensemble_top_k: int = 1  # average the logits of the k best validation checkpoints
    test_from: TestFrom = TestFrom.best


@dataclass
class Config:
    algorithm: Any = MISSING
    dataset: Any = MISSING
    model: Any = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: Device = Device.auto
    sweep_name: str = "default"  # names the multirun folder and the W&B group


def register_schemas() -> None:
    """The root and logger schemas, and `<name>_schema` for each registered learner,
    backbone and dataset reader (metatrain/registry.py)."""
    from metatrain.registry import ALL

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    for registry in ALL:
        for entry in registry.entries():
            if entry.schema is not None:
                cs.store(group=registry.group, name=f"{entry.name}_schema", node=entry.schema)
