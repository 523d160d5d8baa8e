"""Every random number generator a run draws from, as plain data and tensors.

Stored in last.pt so a resumed run draws exactly what the uninterrupted one
would have. Plain types (ints, lists, tensors) keep the checkpoint loadable with
`torch.load(..., weights_only=True)`: numpy's own state object would need its
array class unpickled, which a weights-only load refuses.
"""

import random

import numpy as np
import torch


def capture(generator: torch.Generator) -> dict:
    version, mt_state, gauss = random.getstate()  # (int, tuple of 625 ints, float | None)
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "sampler": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict, generator: torch.Generator) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
