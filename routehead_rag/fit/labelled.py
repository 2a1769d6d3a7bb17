"""A labelled set as padded tensors, and the static head ranking the search and training use.

nDCG is :mod:`routehead_rag.measures`' (ir_measures' definition, the ideal over every judged document),
so the one static head ranking (:func:`rank_heads`, QRHead-style: every head's mean single-head
nDCG@10) is computed here, batched, for ``select-heads``, the fit's static baseline and the
benchmarks alike.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..heads import Head, HeadGrid
from ..measures import batched_ndcg, ideal_dcg

QUERY_CHUNK = 256  # queries per piece for work batched over queries (see LabelledSet.chunks)


@dataclass
class LabelledSet:
    """Padded tensors of a labelled set, ready for batched search.

    ``scores`` ``[query, head, passage]`` (heads flattened as ``layer * num_heads + head``; kept in
    the precision it was built with, possibly on disk, and read in pieces: every computation takes
    the rows and heads it needs and works in float64), ``gains`` ``[query, passage]`` relevance
    grades (0 for padding), ``valid`` ``[query, passage]`` marks real passages, ``ideal_dcg``
    ``[query]`` the ideal DCG over every judged document.
    """

    qids: list[str]
    scores: torch.Tensor
    gains: torch.Tensor
    valid: torch.Tensor
    ideal_dcg: torch.Tensor
    num_layers: int
    num_heads: int
    backing: Any = field(default=None, repr=False)  # the open temporary file behind an on-disk ``scores``

    @property
    def num_flat_heads(self) -> int:
        return self.scores.shape[1]

    def rows_scores(self, rows: torch.Tensor | None = None, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``[row, head, passage]`` float64 copy of ``rows`` (all by default) and ``heads`` (all by default)."""
        picked = self.scores if rows is None else self.scores[torch.as_tensor(rows, dtype=torch.long)]
        if heads is not None:
            picked = picked[:, heads, :]
        return picked.double()

    @property
    def grid(self) -> HeadGrid:
        return HeadGrid(self.num_layers, self.num_heads)

    def head(self, flat_index: int) -> Head:
        return self.grid.head(flat_index)

    def sum_heads(self, heads: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[row, passage]``: each row's scores summed over its heads ``heads`` ``[row, k]`` (flat indices)."""
        rows = torch.arange(self.scores.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        picked = self.scores[rows[:, None], heads]  # [row, k, passage]: only the picked heads are copied
        return picked.double().sum(dim=1)

    def chunks(self, size: int | None = None):
        """The set in consecutive pieces of at most ``size`` (default ``QUERY_CHUNK``) queries (the set itself
        when it fits in one), so work batched over queries keeps its intermediates to ``size x heads x passages``."""
        size = size or QUERY_CHUNK
        if len(self.qids) <= size:
            yield self
            return
        for start in range(0, len(self.qids), size):
            yield self.subset(torch.arange(start, min(start + size, len(self.qids))))

    def subset(self, rows: Sequence[int] | torch.Tensor) -> LabelledSet:
        """The set restricted to ``rows`` (in that order)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return LabelledSet(
            [self.qids[i] for i in rows.tolist()], self.scores[rows], self.gains[rows], self.valid[rows],
            self.ideal_dcg[rows], self.num_layers, self.num_heads,
        )  # an in-memory copy of those rows, whatever backs this set


def scratch_tensor(shape: tuple[int, ...], dtype: torch.dtype, folder: bool | str | Path = True):
    """A zero-filled tensor in an unlinked temporary file, memory-mapped: ``(tensor, open file)``.

    ``folder``: ``True`` for the system's temporary folder, or a folder (made if missing). The file
    has no name, so the system removes it when the tensor and the file are dropped, also after a kill;
    its pages are page cache the kernel can reclaim, so it does not count as memory the process holds."""
    folder = None if folder is True else Path(folder)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    backing = tempfile.TemporaryFile(dir=folder, prefix="routehead-scratch-")
    array = np.memmap(backing, dtype=str(dtype).removeprefix("torch."), mode="w+", shape=shape)
    return torch.from_numpy(array), backing  # zero-filled by the file system


def labelled_queries(qids: Iterable[str], qrels: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The queries of ``qids`` a labelled set keeps, in order: those with a relevant judged document (no head can
    help the others)."""
    return [q for q in qids if any(g > 0 for g in qrels.get(q, {}).values())]


def grades(doc_ids: Sequence[str], judged: Mapping[str, int]) -> torch.Tensor:
    """``[passage]`` float64: each candidate's relevance grade (unjudged and negative grades are 0)."""
    return torch.tensor([float(max(judged.get(d, 0), 0)) for d in doc_ids], dtype=torch.float64)


class LabelledSetBuilder:
    """Fills a :class:`LabelledSet` row by row as each query's scores arrive, in any order.

    What is known before extraction fixes the set's shape: the queries kept (those with a relevant
    judged document; no head can help the others), their candidates and grades. ``dtype`` is the
    precision the scores are kept in (float16 holds float16 extractions exactly); ``on_disk`` keeps
    them in an unlinked temporary file (``True``: the system's temporary folder; or a folder),
    memory-mapped, so filling the set holds one query's scores at a time and the set's memory does not
    grow with the number of queries; the system removes the file when the set is dropped, also after
    a kill.
    """

    def __init__(
        self,
        doc_ids: Mapping[str, Sequence[str]],  # every query's candidates, in the set's query order
        qrels: Mapping[str, Mapping[str, int]],
        num_layers: int,
        num_heads: int,
        depth: int = 10,
        dtype: torch.dtype = torch.float64,
        on_disk: bool | str | Path = False,
    ):
        qids = labelled_queries(doc_ids, qrels)
        if not qids:
            raise ValueError("no query has a relevant judged document: nothing to search heads on")
        if dtype not in (torch.float16, torch.float32, torch.float64):
            raise ValueError(f"a labelled set is float16, float32 or float64, got {dtype}")
        width = max(len(doc_ids[q]) for q in qids)
        shape = (len(qids), num_layers * num_heads, width)
        self.backing = None
        if on_disk is not False:
            self.scores, self.backing = scratch_tensor(shape, dtype, on_disk)
        else:
            self.scores = torch.zeros(shape, dtype=dtype)
        self.qids, self.num_layers, self.num_heads, self.dtype = qids, num_layers, num_heads, dtype
        self.row_of = {q: row for row, q in enumerate(qids)}
        self.counts = {q: len(doc_ids[q]) for q in qids}
        self.gains = torch.zeros(len(qids), width, dtype=torch.float64)
        self.valid = torch.zeros(len(qids), width, dtype=torch.bool)
        self.ideal = torch.zeros(len(qids), dtype=torch.float64)
        self.filled = torch.zeros(len(qids), dtype=torch.bool)
        for row, qid in enumerate(qids):
            judged = qrels.get(qid, {})
            count = self.counts[qid]
            self.gains[row, :count] = grades(doc_ids[qid], judged)
            self.valid[row, :count] = True
            self.ideal[row] = ideal_dcg(judged.values(), depth)

    def wants(self, qid: str) -> bool:
        """Whether ``qid`` is a row of the set (it has a relevant judged document)."""
        return qid in self.row_of

    def put(self, qid: str, tensor: torch.Tensor) -> None:
        """Write query ``qid``'s ``[layer, head, passage]`` scores (a query the set leaves out is ignored)."""
        if qid not in self.row_of:
            return
        expected = (self.num_layers, self.num_heads, self.counts[qid])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"query {qid!r} has scores of shape {tuple(tensor.shape)}, expected {expected} "
                             "(layers, heads, its candidates)")
        row = self.row_of[qid]
        self.scores[row, :, : expected[2]] = tensor.reshape(self.num_layers * self.num_heads, expected[2]).to(self.dtype)
        self.filled[row] = True

    def finish(self) -> LabelledSet:
        """The filled set; every kept query must have been put."""
        if not bool(self.filled.all()):
            missing = [self.qids[i] for i in (~self.filled).nonzero().flatten()[:3].tolist()]
            raise ValueError(f"{int((~self.filled).sum())} queries have no scores yet (e.g. {missing})")
        return LabelledSet(self.qids, self.scores, self.gains, self.valid, self.ideal, self.num_layers, self.num_heads,
                           self.backing)


def build_labelled_set(
    per_query_scores: Mapping[str, torch.Tensor],
    doc_ids: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    depth: int = 10,
    consume: bool = False,
    dtype: torch.dtype = torch.float64,
    on_disk: bool | str | Path = False,
) -> LabelledSet:
    """Pad per-query ``[layer, head, passage]`` tensors into a :class:`LabelledSet` (in their order).

    Queries without any relevant judged document are left out (no head can help them).
    ``consume`` pops each kept query's tensor from ``per_query_scores`` (a mutable mapping the caller
    owns and no longer needs) as it is copied, so peak memory holds one copy of the scores.
    ``dtype`` and ``on_disk`` as :class:`LabelledSetBuilder`.
    """
    kept = labelled_queries(per_query_scores, qrels)
    if not kept:
        raise ValueError("no query has a relevant judged document: nothing to search heads on")
    num_layers, num_heads = per_query_scores[kept[0]].shape[:2]  # every query's shape is checked as it is put
    builder = LabelledSetBuilder({q: doc_ids[q] for q in kept}, qrels, num_layers, num_heads, depth, dtype, on_disk)
    for qid in kept:
        builder.put(qid, per_query_scores.pop(qid) if consume else per_query_scores[qid])
    return builder.finish()


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
            part.scores.double(), part.gains[:, None, :], part.valid[:, None, :], part.ideal_dcg[:, None], depth
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
