"""A labelled set as padded tensors, the batched nDCG the search and training use, and static head ranking.

nDCG here is ir_measures' (linear gain, log2 discount, the ideal ranking over every judged
document of the query); ties in the scores keep candidate order, as
:func:`routehead_rag.eval.metrics.ranking_to_run` encodes them.  :func:`batched_ndcg` is checked
against ir_measures in the tests, so the one static head ranking (:func:`rank_heads`, QRHead-style:
every head's mean single-head nDCG@10) is computed here, batched, for ``select-heads``, the fit's
static baseline and the benchmarks alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..heads import Head, HeadGrid


QUERY_CHUNK = 2048  # queries per piece for work batched over queries (see LabelledSet.chunks)


@dataclass
class LabelledSet:
    """Padded tensors of a labelled set, ready for batched search.

    ``scores`` ``[query, head, passage]`` (heads flattened as ``layer * num_heads + head``),
    ``gains`` ``[query, passage]`` relevance grades (0 for padding), ``valid`` ``[query, passage]``
    marks real passages, ``ideal_dcg`` ``[query]`` the ideal DCG over every judged document.
    """

    qids: list[str]
    scores: torch.Tensor
    gains: torch.Tensor
    valid: torch.Tensor
    ideal_dcg: torch.Tensor
    num_layers: int
    num_heads: int

    @property
    def grid(self) -> HeadGrid:
        return HeadGrid(self.num_layers, self.num_heads)

    def head(self, flat_index: int) -> Head:
        return self.grid.head(flat_index)

    def sum_heads(self, heads: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[row, passage]``: each row's scores summed over its heads ``heads`` ``[row, k]`` (flat indices)."""
        rows = torch.arange(self.scores.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        picked = self.scores[rows[:, None], heads]  # [row, k, passage]: only the picked heads are copied
        return picked.sum(dim=1)

    def chunks(self, size: int | None = None):
        """The set in consecutive pieces of at most ``size`` (default ``QUERY_CHUNK``) queries (the set itself
        when it fits in one), so work batched over queries keeps its intermediates to ``size x heads x passages``."""
        size = size or QUERY_CHUNK
        if len(self.qids) <= size:
            yield self
            return
        for start in range(0, len(self.qids), size):
            yield self.subset(torch.arange(start, min(start + size, len(self.qids))))

    def subset(self, rows: Sequence[int] | torch.Tensor) -> "LabelledSet":
        """The set restricted to ``rows`` (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return LabelledSet(
            [self.qids[i] for i in rows.tolist()], self.scores[rows], self.gains[rows], self.valid[rows],
            self.ideal_dcg[rows], self.num_layers, self.num_heads,
        )


def discounts(depth: int, length: int) -> torch.Tensor:
    """``1 / log2(rank + 1)`` for ranks 1..``length``, zero past ``depth``: ``[length]``."""
    ranks = torch.arange(1, length + 1, dtype=torch.float64)
    weights = 1.0 / torch.log2(ranks + 1.0)
    weights[depth:] = 0.0
    return weights


def build_labelled_set(
    per_query_scores: Mapping[str, torch.Tensor],
    doc_ids: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    depth: int = 10,
    consume: bool = False,
) -> LabelledSet:
    """Pad per-query ``[layer, head, passage]`` tensors into a :class:`LabelledSet`.

    Queries without any relevant judged document are left out (no head can help them).
    ``consume`` pops each kept query's tensor from ``per_query_scores`` (a mutable mapping the caller
    owns and no longer needs) as it is copied, so peak memory holds one copy of the scores.
    """
    qids = [q for q in per_query_scores if any(g > 0 for g in qrels.get(q, {}).values())]
    if not qids:
        raise ValueError("no query has a relevant judged document: nothing to search heads on")
    first = per_query_scores[qids[0]]
    num_layers, num_heads = first.shape[:2]
    first_shape = tuple(first.shape)
    width = max(per_query_scores[q].shape[-1] for q in qids)
    scores = torch.zeros(len(qids), num_layers * num_heads, width, dtype=torch.float64)
    gains = torch.zeros(len(qids), width, dtype=torch.float64)
    valid = torch.zeros(len(qids), width, dtype=torch.bool)
    ideal = torch.zeros(len(qids), dtype=torch.float64)
    weights = discounts(depth, max(width, depth))
    del first
    for row, qid in enumerate(qids):
        tensor = per_query_scores.pop(qid) if consume else per_query_scores[qid]
        if tensor.shape[:2] != (num_layers, num_heads):
            raise ValueError(f"query {qid!r} has scores of shape {tuple(tensor.shape)}, others {first_shape}")
        count = tensor.shape[-1]
        scores[row, :, :count] = tensor.reshape(num_layers * num_heads, count).double()
        judged = qrels.get(qid, {})
        gains[row, :count] = torch.tensor([float(max(judged.get(d, 0), 0)) for d in doc_ids[qid]], dtype=torch.float64)
        valid[row, :count] = True
        best = sorted((max(g, 0) for g in judged.values()), reverse=True)[:depth]
        ideal[row] = sum(g * float(weights[i]) for i, g in enumerate(best))
    return LabelledSet(qids, scores, gains, valid, ideal, num_layers, num_heads)


def batched_ndcg(
    scores: torch.Tensor,  # [..., passage]
    gains: torch.Tensor,  # [..., passage] (broadcastable)
    valid: torch.Tensor,  # [..., passage] bool (broadcastable)
    ideal_dcg: torch.Tensor,  # [...] (broadcastable)
    depth: int = 10,
) -> torch.Tensor:
    """nDCG@``depth`` of rankings by ``scores`` (descending, ties in passage order): ``[...]``."""
    masked = scores.masked_fill(~valid, float("-inf"))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    ranked_gains = torch.gather(gains.expand_as(masked), -1, order)
    ranked_valid = torch.gather(valid.expand_as(masked), -1, order)
    weights = discounts(depth, scores.shape[-1]).to(scores.device)
    dcg = (ranked_gains * ranked_valid * weights).sum(dim=-1)
    return torch.where(ideal_dcg > 0, dcg / ideal_dcg.clamp_min(1e-12), torch.zeros_like(dcg))


def single_head_quality(data: LabelledSet, depth: int = 10, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean single-head nDCG@``depth`` over the set (or its ``rows``): ``[head]`` (flattened).

    Computed in pieces of at most ``QUERY_CHUNK`` queries, so its intermediates do not grow with the set."""
    rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
    count = len(data.qids) if rows is None else len(rows)
    if count == 0:
        raise ValueError("single-head quality of no queries: pass at least one row")
    total = None
    for start in range(0, count, QUERY_CHUNK):
        if rows is None:
            part = data if count <= QUERY_CHUNK else data.subset(torch.arange(start, min(start + QUERY_CHUNK, count)))
        else:
            part = data.subset(rows[start : start + QUERY_CHUNK])
        per_query = batched_ndcg(
            part.scores, part.gains[:, None, :], part.valid[:, None, :], part.ideal_dcg[:, None], depth
        )  # [query, head]
        if count <= QUERY_CHUNK:
            return per_query.mean(dim=0)
        total = per_query.sum(dim=0) if total is None else total + per_query.sum(dim=0)
    return total / count


def rank_heads(data: LabelledSet, depth: int = 10) -> list[tuple[Head, float]]:
    """Every head with its mean single-head nDCG@``depth`` over the set, best first (ties: lower layer, then head).

    The set holds only queries with a relevant judged document (:func:`build_labelled_set`).
    """
    quality = single_head_quality(data, depth)  # [head]
    order = torch.argsort(quality, descending=True, stable=True).tolist()  # stable: ties keep flat order
    return [(data.head(i), float(quality[i])) for i in order]
