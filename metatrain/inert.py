"""Settings that are switched on but cannot change what a run computes.

A sweep cell whose switch is inert costs as much as any other and reports a
number that looks like a measurement of that switch. `inert_settings` names
each such setting, one line apiece, so that the run says so before it starts;
nothing here stops a run.
"""

from metatrain.config import ModelConfig
from metatrain.models.conv4 import Conv4Config
from metatrain.naming import bn_eval_mode


def _maml(cfg) -> list[str]:
    a, t = cfg.algorithm, cfg.train
    lines = []
    run_epochs = -(-t.iterations // t.iters_per_epoch)  # epochs the run starts, rounded up
    if a.da:
        if a.first_order:
            lines.append(
                "algorithm.da=true changes nothing: algorithm.first_order=true is first order "
                "throughout"
            )
        elif a.da_epochs <= 0:
            lines.append("algorithm.da=true changes nothing with algorithm.da_epochs=0")
        elif a.da_epochs >= run_epochs:
            lines.append(
                f"algorithm.da=true with da_epochs={a.da_epochs} covers all {run_epochs} epochs "
                f"of this run ({t.iterations} iterations of {t.iters_per_epoch}): it is first "
                "order throughout"
            )
    if a.msl and (a.train_steps == 1 or a.msl_epochs <= 0):
        why = "one inner step" if a.train_steps == 1 else "algorithm.msl_epochs=0"
        lines.append(f"algorithm.msl=true changes nothing with {why}: only the last step counts")
    per_epoch = a.ca_every.value == "epoch"
    if a.ca and (a.min_lr == a.meta_lr or t.iterations <= 1 or (per_epoch and run_epochs <= 1)):
        if a.min_lr == a.meta_lr:
            why = "min_lr equal to meta_lr"
        elif t.iterations <= 1:
            why = "a single iteration"
        else:
            why = "a single epoch (the rate changes per epoch; algorithm.ca_every=iteration)"
        lines.append(f"algorithm.ca=true changes nothing with {why}")
    if a.bnrs and bn_eval_mode(cfg.model.bn_eval) != "running":
        lines.append(
            "algorithm.bnrs=true changes nothing unless evaluation reads running statistics "
            "(model.bn_eval=running): its per-step running statistics are never read"
        )
    elif a.bnrs and a.train_steps == 1:
        lines.append(
            "algorithm.bnrs=true changes nothing with one inner step: one row of running "
            "statistics either way"
        )
    return lines


def _reptile(cfg) -> list[str]:
    a = cfg.algorithm
    lines = []
    if a.meta_lr != 0:
        lines.append(
            f"algorithm.meta_lr={a.meta_lr} is unused by Reptile, whose outer step is "
            "algorithm.meta_step"
        )
    if a.grad_clip > 0:
        lines.append("algorithm.grad_clip is unused by Reptile")
    if a.inner_state.value == "carry" and a.inner_optimizer.value != "adam":
        lines.append("algorithm.inner_state=carry changes nothing: SGD keeps no state")
    return lines


def _evaluation(cfg) -> list[str]:
    e, t = cfg.eval, cfg.train
    lines = []
    if e.ensemble_top_k > 1:
        validations = t.iterations // t.val_interval + (t.iterations % t.val_interval != 0)
        if e.test_from.value == "last":
            lines.append(
                f"eval.ensemble_top_k={e.ensemble_top_k} changes nothing with "
                "eval.test_from=last: the final parameters alone are tested"
            )
        elif e.ensemble_top_k > min(t.keep_best, validations):
            lines.append(
                f"eval.ensemble_top_k={e.ensemble_top_k} is capped at "
                f"{min(t.keep_best, validations)}: train.keep_best={t.keep_best} checkpoints "
                f"are kept of {validations} validations"
            )
    mode = bn_eval_mode(cfg.model.bn_eval)
    if mode != "running" and cfg.model.bn_momentum != ModelConfig.bn_momentum:
        lines.append(
            "model.bn_momentum changes nothing: evaluation normalises with batch statistics "
            f"(model.bn_eval={mode}), never the running ones"
        )
    if cfg.model.bn_eval.value == "batch":
        lines.append(
            "model.bn_eval=batch is now spelled model.bn_eval=transductive (the same "
            "evaluation); the old name goes in a later release"
        )
    return lines


def _conv4(cfg) -> list[str]:
    m = cfg.model
    lines = []
    if m.get("name") != "conv4":
        return lines
    if m.activation.value == "relu" and m.activation_slope != Conv4Config.activation_slope:
        lines.append(
            "model.activation_slope changes nothing with model.activation=relu "
            "(set model.activation=leaky_relu)"
        )
    if m.pool_padding.value == "same" and m.downsample.value == "stride":
        lines.append("model.pool_padding=same changes nothing with model.downsample=stride")
    return lines


def inert_settings(cfg) -> list[str]:
    """One line for each setting of `cfg` that is on but cannot change the run."""
    name = cfg.algorithm.name
    lines = _maml(cfg) if name == "maml" else _reptile(cfg) if name == "reptile" else []
    return lines + _conv4(cfg) + _evaluation(cfg)
