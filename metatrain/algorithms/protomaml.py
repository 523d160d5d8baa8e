"""Proto-MAML: MAML whose linear head starts, for each task, at the prototypes.

Triantafillou et al. "Meta-Dataset: A Dataset of Datasets for Learning to Learn
from Few Examples", ICLR 2020. The prototypical classifier of Snell et al. (2017),
-||f(x) - c_k||^2 = 2 c_k . f(x) - ||c_k||^2 - ||f(x)||^2, is a linear layer on the
features up to a per-query constant: W_k = 2 c_k, b_k = -||c_k||^2. Proto-MAML
initialises the head so from each task's support set (c_k the mean support
feature of class k, from the trunk at the meta-parameters) and then runs MAML's
inner steps and query loss unchanged (metatrain/algorithms/maml.py, every switch
with it). The meta-gradient flows through that initialisation into the trunk; under
first_order only the inner steps' Jacobian is dropped (the paper's fo-Proto-MAML).
The meta-learned head weights are never used: every task replaces them.
"""

from dataclasses import dataclass

from metatrain.algorithms.maml import Maml, MamlConfig
from metatrain.algorithms.protonet import prototypes
from metatrain.registry import LEARNERS


@dataclass
class ProtoMamlConfig(MamlConfig):
    name: str = "protomaml"


@LEARNERS.register("protomaml", ProtoMamlConfig)
class ProtoMaml(Maml):
    def task_start(self, params: dict, xs, ys, features) -> dict:
        w, b = self.model.head_names  # weight (..., ways, F), bias (..., ways)
        c = prototypes(features(params, xs), ys, params[w].shape[-2])  # (..., ways, F)
        # The inner loop's own aliases of the rest: its support gradient in the trunk's
        # weights must not run back through the head's initialisation (the head is a
        # variable of its own there, as under torch.func.grad), while the meta-gradient
        # still reaches the trunk through the prototypes.
        start = {n: p.view_as(p) for n, p in params.items()}
        return {**start, w: 2 * c, b: -(c * c).sum(-1)}
