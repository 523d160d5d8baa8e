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
    batch = "batch"  # transductive: normalise the query batch with its own statistics
    running = "running"  # use running statistics (per inner step under bnrs)


class Downsample(Enum):
    pool = "pool"  # 2x2 max-pool after each block (MAML++, Reptile, MiniImageNet)
    stride = "stride"  # stride-2 convolutions (MAML's Omniglot network)


class InnerOptimizer(Enum):
    adam = "adam"
    sgd = "sgd"


class TestFrom(Enum):
    best = "best"  # the best validation checkpoint(s)
    last = "last"  # the final parameters


@dataclass
class AlgorithmConfig:
    name: str = MISSING
    meta_batch: int = 32  # tasks per meta-iteration
    meta_lr: float = 1e-3
    grad_clip: float = 0.0  # max meta-gradient norm; 0 turns clipping off


@dataclass
class MamlConfig(AlgorithmConfig):
    """MAML, FOMAML and MAML++ are presets of this one schema."""

    name: str = "maml"
    first_order: bool = False
    inner_lr: float = 0.4
    train_steps: int = 1
    eval_steps: int = 3
    # MAML++ switches (Antoniou et al. 2019), each independent.
    msl: bool = False  # multi-step loss
    msl_epochs: int = 10
    da: bool = False  # derivative-order annealing
    da_epochs: int = 50
    bnrs: bool = False  # per-step batch-norm running statistics
    bnwb: bool = False  # per-step batch-norm weights and biases
    lslr: bool = False  # learned per-layer per-step inner learning rates
    ca: bool = False  # cosine annealing of the meta learning rate
    min_lr: float = 1e-5


@dataclass
class ReptileConfig(AlgorithmConfig):
    name: str = "reptile"
    meta_batch: int = 5
    meta_lr: float = 0.0  # unused: Reptile steps with meta_step below
    inner_optimizer: InnerOptimizer = InnerOptimizer.adam
    inner_lr: float = 1e-3
    inner_batch: int = 10
    inner_iters: int = 5
    train_shots: int = 10  # examples per class drawn for each meta-training task
    meta_step: float = 1.0  # eps at the first iteration
    meta_step_final: float = 0.0  # eps at the last iteration (linear in between)
    eval_iters: int = 50
    eval_batch: int = 5
    serial: bool = False  # update phi after each task (Algorithm 1) instead of averaging


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


@dataclass
class OmniglotConfig(DatasetConfig):
    name: str = "omniglot"
    image_size: int = 28
    channels: int = 1
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    download: bool = True
    rotations: bool = True  # 90/180/270 degree rotations as new meta-training classes
    # MAML++: each class of a meta-training task turned by a random multiple of 90
    # degrees, drawn per task (not new classes; validation and test never rotated)
    augment_rotation: bool = False
    split_seed: int = 0
    train_classes: int = 1100
    val_classes: int = 100  # the remaining 423 characters are the test classes


@dataclass
class MiniImageNetConfig(DatasetConfig):
    name: str = "miniimagenet"
    image_size: int = 84
    channels: int = 3
    queries: int = 15
    mean: list[float] = field(default_factory=lambda: [0.4721, 0.4533, 0.4100])
    std: list[float] = field(default_factory=lambda: [0.2772, 0.2677, 0.2845])
    layout: str = "auto"  # auto | csv | folders | pickle


@dataclass
class ModelConfig:
    name: str = "conv4"
    filters: int = 64
    downsample: Downsample = Downsample.pool
    bn_eval: BNEval = BNEval.batch
    bn_momentum: float = 0.1


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
    # Speed switches (metatrain/algorithms/inner.py); none changes the maths beyond
    # rounding except amp_bf16.
    channels_last: str = "auto"  # auto | true | false: NHWC activations in the loop backend
    tf32: bool = True  # CUDA: TF32 matmuls and convolutions
    amp_bf16: bool = False  # bf16 autocast of the task computation
    compile: bool = False  # torch.compile the model for passes differentiated once
    cuda_graphs: bool = False  # CUDA: compile in reduce-overhead mode (CUDA graphs)


@dataclass
class EvalConfig:
    seed: int = 1234  # fixes the validation and test task sets for every run
    val_tasks: int = 200
    test_tasks: int = 600
    batch: int = 50  # tasks adapted at once during evaluation
    ensemble_top_k: int = 1  # average the logits of the k best validation checkpoints
    test_from: TestFrom = TestFrom.best


@dataclass
class Config:
    algorithm: Any = MISSING
    dataset: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: Device = Device.auto
    sweep_name: str = "default"  # names the multirun folder and the W&B group


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="algorithm", name="maml_schema", node=MamlConfig)
    cs.store(group="algorithm", name="reptile_schema", node=ReptileConfig)
    cs.store(group="dataset", name="omniglot_schema", node=OmniglotConfig)
    cs.store(group="dataset", name="miniimagenet_schema", node=MiniImageNetConfig)
    cs.store(group="model", name="conv4_schema", node=ModelConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
