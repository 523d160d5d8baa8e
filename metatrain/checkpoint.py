"""Checkpoints: atomic writes, exact resume, and refusal of a foreign config."""

import json
import re
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from metatrain.errors import MetatrainError
from metatrain.files import save_torch
from metatrain.keys import drop_non_math


def config_fingerprint(cfg) -> dict:
    """The composed config as plain data, minus the keys that do not change the maths."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    data.pop("hydra", None)
    return drop_non_math(data)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_config(saved: dict, current: dict, where: Path) -> None:
    # Pruned again: a checkpoint written before a key joined the list still resumes.
    a, b = _flatten(drop_non_math(dict(saved))), _flatten(current)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:3])
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise MetatrainError(
            f"{where} was made with a different config ({shown}{more}); "
            "use another output directory (hydra.run.dir=...) or delete it to start over"
        )


# How torch names the import a weights-only load refused ("... GLOBAL posix.system ...").
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load(path: Path) -> dict:
    """A checkpoint's contents, read with torch's weights-only unpickler: tensors and
    plain types only, so a crafted file cannot run code while it loads."""
    try:
        with warnings.catch_warnings():  # torch warns about newer pickle protocols
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch.load raises, the answer is the same
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise MetatrainError(
                f"checkpoint {path} asks to import {refused.group(1)}, which no metatrain "
                "checkpoint does; refused without running it: delete it or move it away"
            ) from None
        raise MetatrainError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); move it away to start over"
        ) from None


def finished_results(path: Path, fingerprint: dict) -> dict:
    """The results.json of a finished run, checked against the current config."""
    try:
        results = json.loads(Path(path).read_text())
        saved = results["config"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MetatrainError(
            f"{path} is unreadable; move it away and the run is meta-tested again from "
            "its checkpoints"
        ) from None
    check_same_config(saved, fingerprint, path)
    return results


def save(state: dict, path: Path) -> None:
    save_torch(state, path)
