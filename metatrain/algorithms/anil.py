"""ANIL: the network passes of one task when only the head adapts.

Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards
Understanding the Effectiveness of MAML", ICLR 2020. ANIL (Almost No Inner Loop)
adapts only the final linear layer in the inner loop; the trunk is meta-learned
through the query loss alone. Its features then do not change during adaptation,
so they are computed once per task and every inner step reuses them, which is
where ANIL's speed comes from. Where the trunk itself depends on the step (per-step
batch-norm weights, or per-step running statistics at evaluation) they are
computed once per step instead. The maths is MAML's with the trunk frozen in the
inner loop (tests/test_anil.py checks the meta-gradient by hand).
"""

from metatrain.algorithms import query_norm
from metatrain.algorithms.maml_task import Passes


def task_passes(
    model, params, xs, xq, *, running, support_model, query_model, anil: bool, per_query=False
) -> Passes:
    """Passes: support(fast, i) and query(fast, i) -> (logits, statistics) for one task,
    at inner step i with adapted parameters `fast`, and prepare(i), to be called before
    step i's inner gradient: ANIL's features must be computed outside that gradient's
    transform, or the cached tensors would leak out of it. With `per_query` each query
    is normalised with the support set alone (query_norm.py; statistics None)."""
    if not anil:

        def support(fast, i):
            return support_model(fast, xs, step=i, running=running)

        def query(fast, i):
            if per_query:
                # the eager model: compiled graphs do not nest inside vmap
                return query_norm.one_task(lambda x: model(fast, x, step=i)[0], xs, xq), None
            return query_model(fast, xq, step=i, running=running)

        return Passes(support, query)
    per_step = model.trunk_varies_with_step(running)
    cache = {}

    def features(x, which: str, i: int):
        k = (which, i if per_step else 0)
        if k not in cache:
            # the trunk at the meta-parameters: ANIL never adapts it
            if which == "query" and per_query:
                # (Q, F): each query's features from a pass with the support set alone
                h = query_norm.one_task(lambda b: model.trunk(params, b, i, False)[0], xs, xq)
                cache[k] = h, None
            else:
                cache[k] = model.trunk(params, x, i, running)
        return cache[k]

    def prepare(i):
        features(xs, "support", i)
        features(xq, "query", i)

    def support(fast, i):
        h, s = features(xs, "support", i)
        return model.head(fast, h), s

    def query(fast, i):
        h, s = features(xq, "query", i)
        return model.head(fast, h), s

    return Passes(support, query, prepare)
