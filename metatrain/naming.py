"""Names that say what ran: the algorithm and the batch-norm mode at test.

`algorithm.name` is the learner (`maml` covers MAML, FOMAML and MAML++, which
are presets of one implementation), so it cannot tell them apart. The label
here can: `maml`, `fomaml`, `mamlpp` or `reptile`, or, for any other set of
MAML++ switches, the nearer preset and the switches that differ from it
(`maml+msl+lslr`, `mamlpp+da`, `mamlpp-ca`, `mamlpp+first_order`). `mamlpp` is
MAML++ as its authors' code and configs ran it (conf/algorithm/mamlpp.yaml and the
mamlpp_* presets): msl, bnwb, lslr and, except on MiniImageNet, ca. BNRS counts
only under `model.bn_eval=running`, the one mode where per-step running statistics
are read.

Plain Python, no torch: scripts/summarize.py imports it.
"""

SWITCHES = ("msl", "da", "bnrs", "bnwb", "lslr", "ca")  # MAML++'s six fixes, paper order
# The switches of MAML++ as its authors ran it: derivative-order annealing off (their
# configs' first_order_to_second_order_epoch -1); on MiniImageNet a constant meta rate
# (min_learning_rate = meta_learning_rate), so ca off there.
MAMLPP = ("msl", "bnwb", "lslr", "ca")
CONSTANT_META_RATE = ("miniimagenet",)
# MAML switches published as methods of their own (ANIL, Meta-SGD): the label leads with them.
VARIANTS = ("anil", "metasgd")

# What `model.bn_eval` means at meta-test, in words for tables and the console.
BN_MODES = {
    "transductive": "transductive (batch statistics of the query set)",
    "support_plus_query": "non-transductive (each query with the support set alone)",
    "running": "running statistics",
    "batch": "transductive (batch statistics of the query set)",  # the former name
}


def _get(node, key, default=None):
    """node[key] for a dict or an OmegaConf node (or a dataclass)."""
    if node is None:
        return default
    if isinstance(node, dict):
        return node.get(key, default)
    return getattr(node, key, default)


def _text(value) -> str:
    """An enum (from a structured config) or a plain string, as its value."""
    return str(getattr(value, "value", value))


def algorithm_label(cfg) -> str:
    """fomaml, maml, mamlpp, reptile, or the nearer of maml/mamlpp with the switches
    that set this run apart from it. `cfg` is a composed config (dict or OmegaConf)."""
    algo = _get(cfg, "algorithm") or {}
    name = _text(_get(algo, "name"))
    if name != "maml":
        return name
    # bnrs acts only where evaluation reads running statistics: under transductive
    # evaluation (the published protocol) it changes nothing, so it does not count.
    switches = [s for s in SWITCHES if s != "bnrs" or bn_mode(cfg) == "running"]
    on = [s for s in switches if _get(algo, s, False)]
    first_order = bool(_get(algo, "first_order", False))
    variants = [v for v in VARIANTS if _get(algo, v, False)]
    if variants:
        return "+".join(variants) + "+first_order" * first_order + "".join(f"+{s}" for s in on)
    dataset = _text(_get(_get(cfg, "dataset") or {}, "name", ""))
    reference = [s for s in MAMLPP if not (s == "ca" and dataset in CONSTANT_META_RATE)]
    missing = [s for s in switches if s in reference and s not in on]
    extra = [s for s in on if s not in reference]
    # Name a set from the preset it is closer to, first order counting as one more
    # difference from MAML++ (ties go to MAML).
    if len(missing) + len(extra) + first_order < len(on):
        return (
            "mamlpp"
            + "".join(f"-{s}" for s in missing)
            + "".join(f"+{s}" for s in extra)
            + "+first_order" * first_order
        )
    return ("fomaml" if first_order else "maml") + "".join(f"+{s}" for s in on)


def bn_eval_mode(value) -> str:
    """A model.bn_eval value (enum or text) as transductive, support_plus_query or
    running: the former spelling `batch` reads as transductive."""
    mode = _text(value)
    return "transductive" if mode == "batch" else mode


def bn_mode(cfg) -> str:
    """model.bn_eval of a composed config, as bn_eval_mode gives it."""
    return bn_eval_mode(_get(_get(cfg, "model") or {}, "bn_eval", "transductive"))
