"""The one list of config keys that do not change what a run computes.

A key listed here (with everything under it) is left out of the run directory's
name (Hydra's `override_dirname.exclude_keys`, generated from this list by the
`mt_non_math_keys` resolver), out of the checkpoint's config fingerprint (so a
run resumes under another value) and out of summarize's row key (cells that
differ only here share a row). Adding a key is one line below.

Pure Python on purpose: scripts import it without loading torch.
"""

NON_MATH_KEYS = (
    "logger",  # where metrics go
    "device",
    "sweep_name",
    "dataset.root",  # where the same images are read from
    "dataset.in_memory",  # memory or memory-mapped: the same tasks (tested)
    "train.log_interval",
    "train.backend",  # loop and vmap agree to 1e-10 in float64 (tested)
    "train.vmap_chunk",
    "train.inner_checkpoint",  # recomputed meta-gradient equals the unrolled one (tested)
    "train.channels_last",  # speed switches: same maths up to rounding
    "train.tf32",
    "train.amp_bf16",
    "train.compile",
    "train.cuda_graphs",
    "train.nonfinite",  # guards: a finite run computes the same either way
    "train.nonfinite_patience",
    "train.threads",  # how many CPU threads compute the same operators
    "train.dist_timeout_s",  # how long a distributed run waits for a lost rank
    "eval.batch",  # tasks adapted at once; each task's result is its own
)

# Keys that set how a trained network is tested, not what was trained: with
# NON_MATH_KEYS, everything `metatrain-eval` accepts (EVAL_KEYS), beside the algorithm
# keys each learner declares as its own (MetaLearner.eval_keys: MAML's eval_steps,
# Reptile's eval_iters). eval.split exists only there: it picks the split tested
# (test, or val to re-score validation).
EVAL_PROTOCOL_KEYS = (
    "eval.split",
    "eval.test_tasks",
    "eval.val_tasks",
    "eval.seed",
    "eval.ensemble_top_k",
    "eval.test_from",
    "dataset.ways",  # at most the trained ways: the head's first units
    "dataset.shots",
    "dataset.queries",
    "eval.queries",
    "dataset.eval_rotation",
    "model.bn_eval",
)
EVAL_KEYS = (*EVAL_PROTOCOL_KEYS, *NON_MATH_KEYS)


def is_eval_key(key: str, learner_keys: tuple[str, ...] = ()) -> bool:
    """True for a key metatrain-eval may set (or one under a listed key); `learner_keys`:
    the dotted algorithm keys the run's learner declares."""
    return any(key == k or key.startswith(k + ".") for k in (*EVAL_KEYS, *learner_keys))


def is_non_math(key: str) -> bool:
    """True for a listed key or any key under one ("logger.mode", "+logger.tags")."""
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") for k in NON_MATH_KEYS)


def drop_non_math(data: dict, extra: tuple[str, ...] = ()) -> dict:
    """`data` (nested plain dicts) without NON_MATH_KEYS and `extra`, pruned in place."""
    for key in (*NON_MATH_KEYS, *extra):
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node.get(p), dict) else {}
        node.pop(leaf, None)
    return data


def exclude_keys(root) -> list[str]:
    """Every dotted key Hydra may see on the command line for NON_MATH_KEYS: Hydra
    compares `exclude_keys` by equality, so `logger.mode=online` needs "logger.mode"
    listed beside "logger". `root` is the composed config (an OmegaConf node)."""
    out = []

    def walk(key: str, node) -> None:
        out.append(key)
        if hasattr(node, "keys") and not isinstance(node, str):
            for child in node:
                walk(f"{key}.{child}", node._get_node(child, validate_access=False))

    for key in NON_MATH_KEYS:
        node = root
        for part in key.split("."):
            # _get_node reads without resolving interpolations (absent: None)
            node = node._get_node(part, validate_access=False) if hasattr(node, "keys") else None
        walk(key, node)
    return out
