"""Evaluation through ir_measures; no metric is computed by hand here.

Conventions, checked in tests/unit/test_metrics.py:

* ``nDCG@10`` is ir_measures' (pytrec_eval's): linear gain (the grade), log2
  discount, and the ideal ranking over *every* judged document of the query
  in the qrels passed, retrieved or not.
* The mean is over the queries of ``qrels`` (or the ``qids`` given). A query
  missing from the run, or with an empty run, counts as 0; it is never
  dropped. A judged query with no relevant document scores 0 (ir_measures'
  value). Run entries for queries outside the qrels are ignored.
* trec_eval, and so ir_measures, orders a run by score and breaks ties by
  document id *descending*, not by the order you meant. Turn an ordered list
  into a run with :func:`ranking_to_run`, which writes strictly decreasing
  scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from ..extras import require

ir_measures = require("ir_measures", "fit")
from ir_measures.measures import Measure  # noqa: E402  (after the extra's check)

__all__ = [
    "Qrels",
    "Run",
    "candidate_recall",
    "evaluate",
    "parse_measure",
    "per_query",
    "ranking_to_run",
    "rankings_to_run",
]

Run = Mapping[str, Mapping[str, float]]  # {qid: {doc_id: score}}, higher is better
Qrels = Mapping[str, Mapping[str, int]]  # {qid: {doc_id: grade}}


def parse_measure(measure: str | Measure) -> Measure:
    """An ir_measures measure from its name (``"nDCG@10"``, ``"R(rel=2)@20"``)."""
    if isinstance(measure, Measure):
        return measure
    try:
        return ir_measures.parse_measure(measure)
    except Exception as e:  # ir_measures raises several types for a bad name
        raise ValueError(
            f"{measure!r} is not an ir_measures measure; write e.g. 'nDCG@10' or 'R(rel=2)@20'"
        ) from e


def _per_query_many(
    run: Run, qrels: Qrels, measures: Sequence[Measure], qids: Iterable[str] | None
) -> dict[Measure, dict[str, float]]:
    qids = list(qrels) if qids is None else list(dict.fromkeys(qids))
    unjudged = [q for q in qids if q not in qrels]
    if unjudged:
        raise ValueError(
            f"{len(unjudged)} query ids have no qrels (e.g. {unjudged[0]!r}); they cannot be scored"
        )
    sub_qrels = {q: {d: int(g) for d, g in qrels[q].items()} for q in qids}
    sub_run = {q: {d: float(s) for d, s in run[q].items()} for q in qids if run.get(q)}
    values = {m: dict.fromkeys(qids, 0.0) for m in measures}  # missing query -> 0
    if sub_run and any(sub_qrels.values()):
        for metric in ir_measures.iter_calc(list(measures), sub_qrels, sub_run):
            values[metric.measure][metric.query_id] = float(metric.value)
    return values


def evaluate(
    run: Run,
    qrels: Qrels,
    measures: Iterable[str | Measure] = ("nDCG@10",),
    *,
    qids: Iterable[str] | None = None,
) -> dict[str, float]:
    """Mean of each measure over the judged queries, keyed as you spelled it.

    ``qids`` restricts the mean to those queries (each must have qrels);
    default: every query of ``qrels``. See the module notes for how missing
    queries count.
    """
    names = [m if isinstance(m, str) else str(m) for m in measures]
    parsed = [parse_measure(m) for m in measures]
    values = _per_query_many(run, qrels, parsed, qids)
    out: dict[str, float] = {}
    for name, m in zip(names, parsed):
        per_q = values[m]
        out[name] = sum(per_q.values()) / len(per_q) if per_q else math.nan
    return out


def per_query(
    run: Run,
    qrels: Qrels,
    measure: str | Measure = "nDCG@10",
    *,
    qids: Iterable[str] | None = None,
) -> dict[str, float]:
    """``{qid: value}`` for one measure over the judged queries (missing -> 0)."""
    m = parse_measure(measure)
    return _per_query_many(run, qrels, [m], qids)[m]


def ranking_to_run(
    qid: str, doc_ids: Sequence[str], scores: Sequence[float] | None = None
) -> dict[str, dict[str, float]]:
    """``{qid: {doc_id: score}}`` whose scores encode a ranking exactly.

    Without ``scores`` the list order is the ranking (best first). With
    ``scores`` the documents are sorted by score, higher first, and equal
    scores keep their order in ``doc_ids`` (the candidate order).

    Either way the written scores are ``n, n-1, ..., 1``: strictly decreasing
    by rank. trec_eval (and ir_measures after it) would otherwise break a tie
    by document id descending, so raw tied scores would let the document ids
    decide the metric.
    """
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError(f"ranking of {qid!r} repeats a document")
    order = list(range(len(doc_ids)))
    if scores is not None:
        if len(scores) != len(doc_ids):
            raise ValueError(f"{len(scores)} scores for {len(doc_ids)} documents of {qid!r}")
        if any(math.isnan(float(s)) for s in scores):
            raise ValueError(f"NaN score in the ranking of {qid!r}")
        order.sort(key=lambda i: -float(scores[i]))  # stable: ties keep candidate order
    n = len(doc_ids)
    return {qid: {doc_ids[i]: float(n - rank) for rank, i in enumerate(order)}}


def rankings_to_run(rankings: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """:func:`ranking_to_run` for ``{qid: ordered doc ids}``."""
    run: dict[str, dict[str, float]] = {}
    for qid, doc_ids in rankings.items():
        run.update(ranking_to_run(qid, doc_ids))
    return run


def candidate_recall(
    candidates: Mapping[str, Sequence[str]],
    qrels: Qrels,
    k: int = 20,
    rel: int = 1,
    *,
    qids: Iterable[str] | None = None,
) -> float:
    """Mean recall@``k`` of ordered candidate lists: ir_measures ``R(rel=rel)@k``.

    ``rel`` is the lowest grade counted relevant (2 for TREC DL, see
    ``PROTOCOL.spec(name).binary_rel``). A query without a relevant document
    at that level scores 0, as ir_measures gives.
    """
    measure = f"R@{k}" if rel == 1 else f"R(rel={rel})@{k}"
    return evaluate(rankings_to_run(candidates), qrels, [measure], qids=qids)[measure]


def paired_randomization_test(
    a: Sequence[float], b: Sequence[float], trials: int = 10_000, seed: int = 0
) -> float:
    """Two-sided p-value of a paired randomization (sign-flip) test of ``mean(a - b) != 0``.

    ``a`` and ``b`` are per-query values of two systems on the same queries, in the same
    order.  Each trial flips the sign of every per-query difference with probability 1/2;
    the p-value is the share of trials (the observed one included) whose absolute mean
    difference is at least the observed one (Smucker et al., CIKM 2007).
    """
    import torch

    if len(a) != len(b):
        raise ValueError(f"paired values must align: got {len(a)} and {len(b)} per-query values")
    if not a:
        raise ValueError("no per-query values to test")
    if trials < 1:
        raise ValueError(f"trials must be at least 1, got {trials}")
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # [query]
    observed = diff.mean().abs()
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, trials, 1000):  # batches bound the memory to 1000 x queries
        size = min(1000, trials - start)
        signs = torch.randint(0, 2, (size, diff.numel()), generator=generator, dtype=torch.float64) * 2 - 1
        hits += int(((signs * diff).mean(dim=1).abs() >= observed - 1e-12).sum())
    return (hits + 1) / (trials + 1)
