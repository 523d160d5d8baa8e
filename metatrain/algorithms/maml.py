"""MAML, first-order MAML and MAML++ as one implementation with switches.

Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of
Deep Networks", ICML 2017: inner SGD steps on the support set, meta-loss on
the query set, meta-gradient through the inner loop (or, first order, with
the inner loop's Jacobian taken as the identity).

Antoniou, Edwards, Storkey. "How to train your MAML", ICLR 2019: six fixes,
each one flag here: msl (multi-step loss), da (derivative-order annealing),
bnrs (per-step batch-norm running statistics), bnwb (per-step batch-norm
weights and biases), lslr (learned per-layer per-step inner rates), ca
(cosine-annealed meta learning rate).

Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML", ICLR 2020: ANIL, `anil`, adapts only
the head in the inner loop; the trunk is meta-learned through the query loss.
Its features do not change during adaptation, so they are computed once per
task (per step only where the trunk itself varies with the step: BNWB, or BNRS
at evaluation).

Li, Zhou, Chen, Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", 2017: `metasgd`, a learned inner rate per parameter element
(metatrain/algorithms/rates.py).

The task function is written once (maml_task.task_loss); the backends below wrap
it: the per-task loop computes inner gradients with torch.autograd.grad, the batched
backend with torch.func.grad under torch.func.vmap, channel groups run it over a
whole batch (maml_groups.py). Both give the same meta-gradient (tests/test_maml.py).
With train.inner_checkpoint, second-order meta-gradients are computed by
recomputing each inner step during the backward sweep (recompute.py).
"""

import math
from dataclasses import dataclass
from enum import Enum
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from metatrain.algorithms import MetaLearner, eval_mode
from metatrain.algorithms.anil import task_passes
from metatrain.algorithms.inner import (
    GRADS,
    SpeedOptions,
    grads_autograd,
    grads_func,
    pick_backend,
    requested_backend,
    task_pixels,
)
from metatrain.algorithms.maml_groups import grouped_tasks
from metatrain.algorithms.maml_task import InnerLoop, InnerRule, TaskOut, task_loss
from metatrain.algorithms.rates import InnerRates
from metatrain.algorithms.recompute import accumulate_grads, map_tree, recomputed_task
from metatrain.config import AlgorithmConfig
from metatrain.errors import MetatrainError
from metatrain.models.kernels import to_channels_last
from metatrain.models.task_groups import supports
from metatrain.naming import bn_eval_mode
from metatrain.registry import LEARNERS
from metatrain.task_batch import TaskBatch


class LossReduction(Enum):
    mean = "mean"  # the mean cross-entropy of a batch
    # MAML's TF code: the batch's summed cross-entropy divided by the shots, i.e. the
    # mean times ways on a support set and times ways*queries/shots on a query set
    sum_div_shots = "sum_div_shots"


class CAEvery(Enum):
    epoch = "epoch"  # one rate per epoch, T = the run's epochs (the MAML++ authors' code)
    iteration = "iteration"  # a new rate every iteration, T = the run's iterations


@dataclass
class MamlConfig(AlgorithmConfig):
    """MAML, FOMAML, MAML++, ANIL and Meta-SGD are presets of this one schema."""

    name: str = "maml"
    first_order: bool = False
    inner_lr: float = 0.4
    train_steps: int = 1
    eval_steps: int = 3
    loss_reduction: LossReduction = LossReduction.mean  # inner and outer losses alike
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
    ca_every: CAEvery = CAEvery.epoch
    anil: bool = False  # ANIL (Raghu et al. 2020): only the head adapts in the inner loop
    # Batch-norm affine parameters adapt in the inner loop, or are meta-learned only
    # (MAML's TF code keeps them outside its adapted weights; MAML++'s BNWB implies it)
    adapt_bn: bool = True
    metasgd: bool = False  # Meta-SGD (Li et al. 2017): learned per-element inner rates


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """Per-step query-loss weights of the multi-step loss at `epoch`.

    Uniform at epoch 0; the non-final weights decay linearly to a floor of
    0.03/steps while the final one grows, as in the MAML++ authors' code;
    from `msl_epochs` on only the final step counts.
    """
    if epoch >= msl_epochs or steps == 1:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    w = [max(1.0 / steps - epoch * decay, floor)] * (steps - 1)
    w.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return w


@LEARNERS.register("maml", MamlConfig)
class Maml(MetaLearner):
    positive_keys = ("train_steps", "eval_steps")

    @classmethod
    def from_config(cls, cfg, model, device):
        return cls(
            cfg.algorithm, model, cfg.train, bn_eval_mode(cfg.model.bn_eval), device,
            cfg.dataset.shots,
        )  # fmt: skip

    @classmethod
    def bn_steps(cls, algo_cfg) -> tuple[int, int]:
        steps = algo_cfg.train_steps
        return (steps if algo_cfg.bnwb else 0), (steps if algo_cfg.bnrs else 1)

    # -- what evaluation and the run's checks need of MAML --------------------

    eval_keys = ("eval_steps", "inner_lr")

    @classmethod
    def eval_protocol(cls, algo_cfg) -> dict:
        # Learned rates (LSLR, Meta-SGD) replace inner_lr at test: it defines nothing then.
        learned = algo_cfg.lslr or algo_cfg.metasgd
        return {
            "eval_steps": algo_cfg.eval_steps,
            "train_steps": algo_cfg.train_steps,
            "inner_lr": None if learned else algo_cfg.inner_lr,
        }

    @classmethod
    def check_eval(cls, trained_algo, keys: list[str]) -> None:
        if "algorithm.inner_lr" in keys and (trained_algo.lslr or trained_algo.metasgd):
            how = (
                "per layer and step (algorithm.lslr"
                if trained_algo.lslr
                else ("per parameter element (algorithm.metasgd")
            )
            raise MetatrainError(
                f"algorithm.inner_lr was learned {how}=true); "
                "the learned rates are used at test, so it cannot be set"
            )

    @classmethod
    def inert_settings(cls, cfg) -> list[str]:
        a, t = cfg.algorithm, cfg.train
        lines = []
        run_epochs = -(-t.iterations // t.iters_per_epoch)  # epochs the run starts, rounded up
        if a.da:
            if a.first_order:
                lines.append(
                    "algorithm.da=true changes nothing: algorithm.first_order=true is first "
                    "order throughout"
                )
            elif a.da_epochs <= 0:
                lines.append("algorithm.da=true changes nothing with algorithm.da_epochs=0")
            elif a.da_epochs >= run_epochs:
                lines.append(
                    f"algorithm.da=true with da_epochs={a.da_epochs} covers all {run_epochs} "
                    f"epochs of this run ({t.iterations} iterations of {t.iters_per_epoch}): "
                    "it is first order throughout"
                )
        if a.msl and (a.train_steps == 1 or a.msl_epochs <= 0):
            why = "one inner step" if a.train_steps == 1 else "algorithm.msl_epochs=0"
            lines.append(
                f"algorithm.msl=true changes nothing with {why}: only the last step counts"
            )
        per_epoch = a.ca_every.value == "epoch"
        single = t.iterations <= 1 or (per_epoch and run_epochs <= 1)
        if a.ca and (a.min_lr == a.meta_lr or single):
            if a.min_lr == a.meta_lr:
                why = "min_lr equal to meta_lr"
            elif t.iterations <= 1:
                why = "a single iteration"
            else:
                why = "a single epoch (the rate changes per epoch; algorithm.ca_every=iteration)"
            lines.append(f"algorithm.ca=true changes nothing with {why}")
        if a.bnrs and bn_eval_mode(cfg.model.bn_eval) != "running":
            lines.append(
                "algorithm.bnrs=true changes nothing unless evaluation reads running "
                "statistics (model.bn_eval=running): its per-step running statistics are "
                "never read"
            )
        elif a.bnrs and a.train_steps == 1:
            lines.append(
                "algorithm.bnrs=true changes nothing with one inner step: one row of running "
                "statistics either way"
            )
        return lines

    def __init__(
        self, cfg, model, train_cfg, bn_eval: str, device: torch.device, shots: int | None = None
    ):
        self.cfg, self.model, self.train_cfg = cfg, model, train_cfg
        self.shots = shots  # support examples per class: sum_div_shots divides by them
        if cfg.loss_reduction == LossReduction.sum_div_shots and shots is None:
            raise MetatrainError("algorithm.loss_reduction=sum_div_shots needs dataset.shots")
        # Evaluation normalises with running statistics only under model.bn_eval=running;
        # those are per inner step under BNRS (see README: running-statistic evaluation
        # of a network meta-trained with batch statistics, and why it is not the default).
        self.bn_running = bn_eval == "running"
        # Reptile's non-transductive test: each query with the support set alone.
        self.per_query = bn_eval == "support_plus_query"
        self.device = device
        self.speed = SpeedOptions.from_config(train_cfg, device)
        if cfg.lslr and cfg.metasgd:
            raise MetatrainError(
                "algorithm.lslr and algorithm.metasgd both learn the inner rates; switch one off"
            )
        self.recompute = bool(getattr(train_cfg, "inner_checkpoint", False))
        if self.recompute and getattr(model, "stochastic", False):
            raise MetatrainError(
                "train.inner_checkpoint recomputes inner steps and cannot replay random "
                "DropBlock masks; set model.dropblock=0 or train.inner_checkpoint=false"
            )
        if self.recompute and type(self).task_start is not Maml.task_start:
            # recompute.py replays the inner loop from the meta-parameters themselves
            raise MetatrainError(
                f"train.inner_checkpoint cannot run algorithm={cfg.name}, whose tasks start "
                "from weights derived from the support set; set train.inner_checkpoint=false"
            )
        params = model.params()
        # Per-step BN affine parameters are meta-learned only, never adapted (MAML++).
        frozen = set(model.norm_names) if cfg.bnwb or not cfg.adapt_bn else set()
        if cfg.anil:
            self.adapted = list(model.head_names)
        else:
            self.adapted = [n for n in params if n not in frozen]
        self.net = nn.ModuleDict({"model": model})
        if cfg.lslr or cfg.metasgd:
            shapes = {n: tuple(params[n].shape) for n in self.adapted}
            dtype = next(iter(params.values())).dtype
            self.net["rates"] = InnerRates(
                shapes, cfg.train_steps, cfg.inner_lr, cfg.metasgd, dtype
            )
        self.net.to(device)
        # One fused kernel for the whole update on a GPU; the for-each kernels elsewhere.
        fused = device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.meta_lr, fused=fused)
        # The model compiled for passes that are differentiated at most once (see _model).
        self._compiled = self.speed.compile_model(model)

    # -- schedules ----------------------------------------------------------

    def epoch(self, iteration: int) -> int:
        return iteration // self.train_cfg.iters_per_epoch

    def meta_lr(self, iteration: int) -> float:
        """The meta learning rate of meta-step `iteration`: algorithm.meta_lr, or under
        ca the cosine from meta_lr (t = 0) towards min_lr (t = T), in epochs or
        iterations (algorithm.ca_every). A function of the iteration alone, so a
        resumed run continues on the same curve."""
        c = self.cfg
        if not c.ca:
            return c.meta_lr
        if c.ca_every == CAEvery.epoch:
            t, total = (
                self.epoch(iteration),
                -(-self.train_cfg.iterations // self.train_cfg.iters_per_epoch),
            )
        else:
            t, total = iteration, self.train_cfg.iterations
        return c.min_lr + (c.meta_lr - c.min_lr) * (1 + math.cos(math.pi * t / max(total, 1))) / 2

    def second_order(self, iteration: int) -> bool:
        if self.cfg.first_order:
            return False
        return not (self.cfg.da and self.epoch(iteration) < self.cfg.da_epochs)

    def step_weights(self, iteration: int) -> list[float]:
        steps = self.cfg.train_steps
        if self.cfg.msl:
            return msl_weights(steps, self.epoch(iteration), self.cfg.msl_epochs)
        return [0.0] * (steps - 1) + [1.0]

    def backend(self, second_order: bool, batch: TaskBatch | None = None) -> str:
        """The meta-training backend for a task batch: train.backend, or with `auto`
        the faster one for this device and this size of task (support + query)."""
        pixels = None if batch is None else task_pixels(batch.xs, batch.xq)
        # see _groups_ok; recomputed steps run per task or vmapped
        usable = self._groups_ok() and not (second_order and self.recompute)
        requested = requested_backend(self.train_cfg, usable)
        return pick_backend(requested, self.device, second_order, pixels, groups_ok=False)

    def backend_for(self, batch: TaskBatch, iteration: int, evaluation: bool = False) -> str:
        if evaluation:
            return self._eval_backend(batch)
        return self.backend(self.second_order(iteration), batch)

    def _groups_ok(self) -> bool:
        """Channel groups (task_groups.py) run the backbones that support them, without
        bf16 autocast."""
        return supports(self.model) and not self.speed.amp_bf16

    def _eval_backend(self, batch: TaskBatch) -> str:
        """Evaluation's backend. Its steps are first order, so `auto` may pick channel
        groups (for small tasks; see pick_backend); compiled models keep the per-task
        paths they were written for."""
        groups_ok = self._groups_ok() and self._compiled is None
        requested = requested_backend(self.train_cfg, groups_ok)
        pixels = task_pixels(batch.xs, batch.xq)
        return pick_backend(requested, self.device, False, pixels, groups_ok)

    # -- one task -----------------------------------------------------------

    def task_start(self, params: dict, xs, ys, features) -> dict:
        """The weights a task's inner loop starts from, given its support set (xs, ys)
        and `features(params, xs)`, the trunk's support features at step 0: in MAML the
        meta-parameters themselves. A subclass may derive some from the support set;
        every backend calls it, with one task's tensors or, under channel groups,
        (T, ...)-stacked ones, and gradients flow through what it returns."""
        return params

    def loss_scale(self, examples: int) -> float:
        """The factor that turns the mean cross-entropy of a batch of `examples` into
        the configured reduction (a plain number: shapes are static under vmap)."""
        if self.cfg.loss_reduction == LossReduction.sum_div_shots:
            return examples / self.shots
        return 1.0

    def _ce(self, logits, labels):
        return F.cross_entropy(logits, labels) * self.loss_scale(labels.shape[-1])

    def _rates(self) -> dict | None:
        return self.net["rates"].tensors() if "rates" in self.net else None

    def _sgd(self, p, g, name: str, step: int, rates: dict | None):
        """p - lr * g in one op: a fixed rate, or a learned one (LSLR, Meta-SGD)."""
        if rates is not None:
            return torch.addcmul(p, self.net["rates"].pick(rates[name], step), g, value=-1)
        return torch.add(p, g, alpha=-self.cfg.inner_lr)

    def rule(self, rates: dict | None, grads=grads_autograd) -> InnerRule:
        """This learner's inner update with the inner rates `rates` (learned ones, or
        None for the fixed algorithm.inner_lr), its gradients taken by `grads`."""
        return InnerRule(
            adapted=tuple(self.adapted),
            sgd=lambda p, g, name, step: self._sgd(p, g, name, step, rates),
            support_loss=self._ce,
            query_loss=self._ce,
            grads=grads,
        )

    def passes(self, params, xs, xq, run: InnerLoop, *, support_model=None, query_model=None):
        """The network's passes over one task (anil.task_passes), eager unless given."""
        eager = self.model
        return task_passes(
            eager, params, xs, xq, running=run.running,
            support_model=eager if support_model is None else support_model,
            query_model=eager if query_model is None else query_model,
            anil=self.cfg.anil, per_query=run.per_query,
        )  # fmt: skip

    def _model(self, differentiated_twice: bool):
        """The eager model, or the compiled one for a pass whose graph is
        differentiated at most once (compiled graphs have no double backward)."""
        if self._compiled is None or differentiated_twice:
            return self.model
        return self._compiled

    # -- a batch of tasks -----------------------------------------------------

    def _task_fn(self, params, rates, run: InnerLoop, *, backend: str, recompute: bool):
        """task_loss (or its recomputed form) as a function of one task's tensors
        (xs, ys, xq, yq) -> TaskOut, with the models and gradients `backend` runs."""
        if recompute:  # eager passes, functional gradients; d loss / d meta by value
            return lambda xs, ys, xq, yq: recomputed_task(
                params, rates, ys, yq, run=run,
                passes=lambda p: self.passes(p, xs, xq, run),
                rule=lambda r: self.rule(r, grads_func),
            )  # fmt: skip
        # Compiled models only in the loop (torch.compile does not nest inside vmap),
        # and CUDA graphs only in first-order runs, not beside double-backward graphs.
        compiled = backend == "loop" and not (self.speed.cuda_graphs and run.create_graph)
        models = {
            "support_model": self._model(run.create_graph or not compiled),
            "query_model": self._model(not compiled),  # the outer backward runs through it once
        }
        rule = self.rule(rates, GRADS[backend])

        def one(xs, ys, xq, yq):
            passes = self.passes(params, xs, xq, run, **models)
            start = self.task_start(
                params, xs, ys, lambda p, x: self.model.trunk(p, x, 0, run.running)[0]
            )
            return task_loss(start, ys, yq, passes=passes, rule=rule, run=run)

        return one

    def _chunk_fn(self, params, rates, run: InnerLoop, *, backend: str, recompute: bool):
        """A function of a chunk of tasks (xs, ys, xq, yq), each (chunk, ...) -> TaskOut
        stacked over the chunk: task_loss run by `backend`."""
        if backend == "groups":
            return partial(grouped_tasks, learner=self, params=params, rates=rates, run=run)
        one = self._task_fn(params, rates, run, backend=backend, recompute=recompute)

        def autocast(*task):
            with self.speed.autocast():
                return one(*task)

        if backend == "loop":  # one task: (1, ...) in, (1, ...) out; its gradients as they are
            return lambda *task: autocast(*(t[0] for t in task)).map(lambda t: t.unsqueeze(0))
        randomness = "different" if self.model.stochastic else "error"
        batched = torch.func.vmap(autocast, randomness=randomness)
        if not recompute:
            return batched

        def summed(*task):  # (chunk, ...) per-task gradients -> their sum
            out = batched(*task)
            return out._replace(grads=map_tree(lambda t: t.sum(0), out.grads))

        return summed

    def _tasks(
        self, batch: TaskBatch, params, rates, run: InnerLoop, *, backend: str, backward: bool
    ) -> TaskOut:
        """Run every task of the batch, one at a time (loop), in vmapped chunks or as
        channel groups.

        With `backward`, the mean loss is backpropagated chunk by chunk so that
        only one chunk's unrolled graph is alive at a time (with inner_checkpoint,
        one inner step's). Returns the tasks' detached results, stacked over tasks.
        """
        n = len(batch)
        chunk = 1 if backend == "loop" else (self.train_cfg.vmap_chunk or n)
        recompute = backward and run.create_graph and self.recompute
        self.speed.step_begin()
        xs, xq = batch.xs, batch.xq
        if backend == "loop" and self.speed.channels_last:
            # Once per batch, so that each task's slice is NHWC (vmap has no layouts).
            xs, xq = to_channels_last(xs), to_channels_last(xq)
        if recompute:  # plain tensors in; the gradients come back as values
            params = {k: p.detach() for k, p in params.items()}
            rates = None if rates is None else {k: r.detach() for k, r in rates.items()}
        run_chunk = self._chunk_fn(params, rates, run, backend=backend, recompute=recompute)
        parts = []
        for i in range(0, n, chunk):
            rows = slice(i, i + chunk)
            out = run_chunk(xs[rows], batch.ys[rows], xq[rows], batch.yq[rows])
            if recompute:
                accumulate_grads(self.net, out.grads, n)
            elif backward:
                (out.loss.sum() / n).backward()
            parts.append(out.map(torch.Tensor.detach)._replace(grads={}))
        return parts[0] if len(parts) == 1 else TaskOut.cat(parts)

    def meta_gradient(self, batch: TaskBatch, iteration: int, backend: str | None = None):
        """Accumulate the meta-gradient of the mean task loss into .grad; returns
        (mean loss, mean accuracy, per-step statistics averaged over tasks)."""
        second = self.second_order(iteration)
        run = InnerLoop(
            steps=self.cfg.train_steps,
            weights=tuple(self.step_weights(iteration)),
            create_graph=second,
        )
        out = self._tasks(
            batch, self.model.params(), self._rates(), run,
            backend=backend or self.backend(second, batch), backward=True,
        )  # fmt: skip
        return out.loss.mean(), out.acc.mean(), out.stats.mean(0)

    def meta_step(self, batch: TaskBatch, iteration: int) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, acc, stats = self.meta_gradient(batch, iteration)
        self.apply_meta_gradient(stats, batch, iteration)
        return {"loss": loss, "acc": acc}

    @eval_mode
    def predict(self, batch: TaskBatch) -> torch.Tensor:
        backend = self.backend_for(batch, 0, evaluation=True)
        steps = self.cfg.eval_steps
        params = {n: p.detach() for n, p in self.model.params().items()}
        rates = self._rates()
        rates = None if rates is None else {n: r.detach() for n, r in rates.items()}
        run = InnerLoop(
            steps=steps, weights=(0.0,) * steps, running=self.bn_running, per_query=self.per_query
        )
        logits = self._tasks(batch, params, rates, run, backend=backend, backward=False).logits
        return logits.float() if logits.dtype == torch.bfloat16 else logits

    # -- checkpoints ----------------------------------------------------------

    def state_dict(self) -> dict:
        # The meta learning rate is a function of the iteration (meta_lr): no schedule state.
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
