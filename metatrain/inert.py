"""Settings that are switched on but cannot change what a run computes.

A sweep cell whose switch is inert costs as much as any other and reports a
number that looks like a measurement of that switch. `inert_settings` names
each such setting, one line apiece, so that the run says so before it starts;
nothing here stops a run.
"""

from metatrain.algorithms import learner_class
from metatrain.registry import BACKBONES


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
    if cfg.model.bn_eval.value == "batch":
        lines.append(
            "model.bn_eval=batch is now spelled model.bn_eval=transductive (the same "
            "evaluation); the old name goes in a later release"
        )
    return lines


def inert_settings(cfg) -> list[str]:
    """One line for each setting of `cfg` that is on but cannot change the run."""
    learner = learner_class(cfg.algorithm.name)  # each declares its own (inert_settings)
    backbone = BACKBONES.get(cfg.model.name).target  # and each backbone
    return learner.inert_settings(cfg) + backbone.inert_settings(cfg) + _evaluation(cfg)
