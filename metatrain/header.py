"""The lines a run opens with: where it writes, what it runs, on what.

Five short lines instead of the composed config (about 90 lines of YAML that
pushed any error off the screen); the whole config stays in RUN_DIR/.hydra/
config.yaml and `metatrain --cfg job [overrides]` prints it.
"""

from pathlib import Path

from metatrain.naming import algorithm_label


def _choices_and_overrides() -> tuple[dict, list[str]]:
    """Hydra's group choices and the command-line overrides; empty outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return dict(hc.runtime.choices), list(hc.overrides.task)
    except ValueError:  # train(cfg) called from Python, not the command line
        return {}, []


def lines(cfg, run_dir: Path, device: str, threads: int, why: str) -> list[str]:
    choices, overrides = _choices_and_overrides()
    ds, t = cfg.dataset, cfg.train
    what = (
        f"{algorithm_label(cfg)}, {ds.name} {ds.ways}-way {ds.shots}-shot, "
        f"{t.iterations:,} iterations"
    )
    preset = choices.get("experiment")
    preset = f"experiment={preset}" if preset else "none (the defaults)"
    own = [o for o in overrides if not o.startswith("experiment=")]
    out = [
        f"run        {run_dir}",
        f"preset     {preset}: {what}",
        f"overrides  {' '.join(own) if own else 'none'}",
        f"device     {device}, {threads} thread{'s' * (threads != 1)} ({why})",
    ]
    saved = Path(run_dir) / ".hydra" / "config.yaml"
    if saved.exists():
        out.append(f"config     {saved} (or: metatrain --cfg job ...)")
    return out
