"""A NaN or inf meta-loss or meta-gradient never reaches the parameters.

Each meta-step runs on a copy of the learner's state taken just before it. If
the step's loss, its meta-gradient or the parameters it produced are not all
finite, the copy is put back: parameters, optimiser moments, schedules and
running statistics are as before the step, so neither the next step nor a
checkpoint ever sees the bad values. Then `train.nonfinite=stop` ends the run
(last.pt stays at its last good save) and `skip` goes on with the next task batch,
stopping after `train.nonfinite_patience` skips in a row.
"""

import torch

from metatrain.errors import MetatrainError


def _clone(state):
    """A deep copy of a (nested) state dict's tensors; other values are shared."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_clone(v) for v in state)
    return state


def _all_finite(tensors) -> torch.Tensor:
    """One boolean on the device: every element of every tensor is finite."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


class NonFiniteGuard:
    def __init__(self, learner, mode, patience: int):
        self.learner = learner
        self.mode = getattr(mode, "value", mode)  # "stop" | "skip"
        self.patience = max(int(patience), 1)
        self.in_a_row = 0
        self.skipped = 0  # since the run (this session) started

    def step(self, batch, iteration: int) -> dict[str, torch.Tensor] | None:
        """The learner's meta-step, undone if anything came out non-finite (then
        None: a skipped step has no loss to log)."""
        before = _clone(self.learner.state_dict())
        metrics = self.learner.meta_step(batch, iteration)
        params = list(self.learner.net.parameters())
        checked = [metrics["loss"], *params, *(p.grad for p in params)]
        if bool(_all_finite(checked)):  # the one host sync this costs per iteration
            self.in_a_row = 0
            return metrics
        self.learner.load_state_dict(before)
        for p in params:
            p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        what = f"non-finite meta-loss or meta-gradient at iteration {iteration + 1}"
        if self.mode == "stop":
            raise MetatrainError(
                f"{what}; the step was undone and the run stopped, last.pt keeps its last good "
                "iteration: lower algorithm.meta_lr (a new run) or resume with train.nonfinite=skip"
            )
        if self.in_a_row >= self.patience:
            raise MetatrainError(
                f"{what}: {self.in_a_row} steps in a row skipped "
                f"(train.nonfinite_patience={self.patience}); last.pt keeps its last good "
                "iteration: lower algorithm.meta_lr or raise the patience"
            )
        return None

    def metrics(self) -> dict[str, float]:
        return {"train/nonfinite_skips": float(self.skipped)} if self.skipped else {}
