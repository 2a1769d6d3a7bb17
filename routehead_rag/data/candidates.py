"""Candidate lists: one rule for what a re-ranker sees and what the first-stage baseline ranks.

Every query's candidates are the first stage's top ``k``, in the first stage's order, with its
scores. The baseline row of a table *is* that list, and the re-ranker is handed exactly that list
(passages in that order, the scores as its first-stage signal), so both are compared on the same
passages. By :attr:`BeirDataset.candidate_source` and the first-stage ``kind``:

* ``"bm25"``: a set's own ranking (``candidates.jsonl`` with scores, e.g. trec-dl's Pyserini BM25
  top-100) cut to ``k``; BM25 over a query's own pool (``candidates.jsonl`` without scores: its
  source order is not a ranking), cut to ``k``; BM25 top ``k`` over the set's corpus otherwise.
* ``"dense"``: the packaged all-MiniLM-L6-v2 bi-encoder's top ``k`` by cosine similarity, over the
  query's pool for a pool set, else over the set's corpus (:class:`.first_stage.DenseRetriever`).

With ``drop_self_match`` (default: the set's :data:`PROTOCOL` spec, True for ArguAna) a document
whose id equals the query id is dropped before the cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .beir import BeirDataset, CandidateSource
from .protocol import PROTOCOL

if TYPE_CHECKING:  # bm25s (the 'fit' extra) and sentence-transformers load when needed
    from .first_stage import Bm25Index, DenseRetriever

FirstStageKind = Literal["bm25", "dense"]
FIRST_STAGE_KINDS: tuple[str, ...] = ("bm25", "dense")


@dataclass(frozen=True)
class Candidates:
    """One query's candidates in first-stage order (best first) with the first stage's scores."""

    doc_ids: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.doc_ids)


def first_stage_lists(
    dataset: BeirDataset,
    qids: Iterable[str],
    top_k: int = 20,
    kind: FirstStageKind = "bm25",
    *,
    bm25_index: Bm25Index | None = None,
    dense: DenseRetriever | None = None,
    drop_self_match: bool | None = None,
) -> dict[str, Candidates]:
    """Each query's candidates as the module notes say: ``{qid: Candidates}``, in ``qids`` order.

    ``bm25_index`` (CORPUS sets) and ``dense`` (a :class:`DenseRetriever`) may be passed to reuse them
    across calls; else they are built here.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if kind not in FIRST_STAGE_KINDS:
        raise ValueError(f"the first stage must be one of {list(FIRST_STAGE_KINDS)}, got {kind!r}")
    qids = list(qids)
    unknown = [q for q in qids if q not in dataset.queries]
    if unknown:
        raise KeyError(f"{dataset.name}: {len(unknown)} query ids not in queries.jsonl, e.g. {unknown[0]!r}")
    source = dataset.candidate_source
    if source is not CandidateSource.CORPUS:
        lacking = [q for q in qids if q not in (dataset.candidates or {})]
        if lacking:
            raise KeyError(f"{dataset.path / 'candidates.jsonl'} has no line for {len(lacking)} queries, e.g. {lacking[0]!r}")
    if drop_self_match is None:
        drop_self_match = PROTOCOL.spec(dataset.name).drop_self_match

    def cut(qid: str, ranked: Sequence[tuple[str, float]]) -> Candidates:
        kept = [(d, s) for d, s in ranked if not (drop_self_match and d == qid)][:top_k]
        return Candidates([d for d, _ in kept], [float(s) for _, s in kept])

    if kind == "dense":
        from .first_stage import DenseRetriever

        dense = dense or DenseRetriever()
        if source is CandidateSource.POOL:
            return {q: cut(q, dense.rank(dataset.queries[q], dataset.candidates[q], dataset.corpus)) for q in qids}
        return {q: cut(q, ranked) for q, ranked in zip(qids, dense.retrieve_many(
            [dataset.queries[q] for q in qids], dataset.corpus, top_k + int(drop_self_match)))}
    if source is CandidateSource.RANKING:
        return {q: cut(q, list(zip(dataset.candidates[q], dataset.candidate_scores[q]))) for q in qids}
    if source is CandidateSource.POOL:
        from .first_stage import rank_pool

        return {q: cut(q, rank_pool(dataset.queries[q], dataset.candidates[q], dataset.corpus)) for q in qids}
    from .first_stage import Bm25Index

    index = bm25_index if bm25_index is not None else Bm25Index(dataset.corpus)
    return {q: cut(q, index.retrieve(dataset.queries[q], top_k, exclude=(q,) if drop_self_match else ())) for q in qids}
