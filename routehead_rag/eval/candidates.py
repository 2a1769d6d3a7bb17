"""Candidate lists as the protocol forms them, and the BM25 baseline ranking."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from .beir import BeirDataset, CandidateSource
from .protocol import PROTOCOL

if TYPE_CHECKING:  # bm25s (the 'fit' extra) is imported only when BM25 is needed
    from .first_stage import Bm25Index

def build_candidates(
    dataset: BeirDataset,
    qids: Iterable[str],
    top_k: int = 20,
    bm25_index: Bm25Index | None = None,
    *,
    pool_order: Literal["source", "bm25"] = "source",
    drop_self_match: bool | None = None,
) -> dict[str, list[str]]:
    """Each query's candidate list as the protocol forms it, best first.

    By :attr:`BeirDataset.candidate_source`:

    * ``RANKING``: the first ``top_k`` of ``candidates.jsonl``.
    * ``POOL``: the query's own paragraphs, in source order (``pool_order=
      "source"``, not a ranking) or BM25-ranked over the pool alone
      (``"bm25"``, the baseline to report), then the first ``top_k``.
    * ``CORPUS``: BM25 top-``top_k`` over the set's corpus; pass ``bm25_index``
      to reuse an index across calls (else one is built here). With
      ``drop_self_match`` (default: the set's :data:`PROTOCOL` spec, True for
      ArguAna) a document whose id equals the query id is dropped before the cut.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if pool_order not in ("source", "bm25"):
        raise ValueError(f"pool_order must be 'source' or 'bm25', got {pool_order!r}")
    qids = list(qids)
    unknown = [q for q in qids if q not in dataset.queries]
    if unknown:
        raise KeyError(
            f"{dataset.name}: {len(unknown)} query ids not in queries.jsonl, e.g. {unknown[0]!r}"
        )
    source = dataset.candidate_source

    if source is CandidateSource.CORPUS:
        from .first_stage import Bm25Index

        if drop_self_match is None:
            drop_self_match = PROTOCOL.spec(dataset.name).drop_self_match
        index = bm25_index if bm25_index is not None else Bm25Index(dataset.corpus)
        return {
            q: [
                d
                for d, _ in index.retrieve(
                    dataset.queries[q], top_k, exclude=(q,) if drop_self_match else ()
                )
            ]
            for q in qids
        }

    assert dataset.candidates is not None  # RANKING or POOL
    lacking = [q for q in qids if q not in dataset.candidates]
    if lacking:
        raise KeyError(
            f"{dataset.path / 'candidates.jsonl'} has no line for {len(lacking)} queries, "
            f"e.g. {lacking[0]!r}"
        )
    if source is CandidateSource.POOL and pool_order == "bm25":
        from .first_stage import rank_pool

        return {
            q: [d for d, _ in rank_pool(dataset.queries[q], dataset.candidates[q], dataset.corpus)][
                :top_k
            ]
            for q in qids
        }
    return {q: list(dataset.candidates[q][:top_k]) for q in qids}


def bm25_order(
    dataset: BeirDataset,
    qids: Iterable[str],
    top_k: int = 20,
    bm25_index: Bm25Index | None = None,
) -> dict[str, list[str]]:
    """The BM25 baseline ranking of every set: BM25 over the pool for a pool set,
    otherwise the same lists as :func:`build_candidates`."""
    return build_candidates(dataset, qids, top_k, bm25_index, pool_order="bm25")
