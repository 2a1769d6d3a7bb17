"""Offline head search: per-query pseudo-labels (the best small head set) from labelled data.

Input: debiased per-head scores ``[layer, head, passage]`` of many labelled queries (one
extraction pass, see :mod:`routehead_rag.offline.extraction`).  Steps:

1. **pool** — rank every head by its single-head nDCG@10 over the whole set and keep the
   ``pool_size`` best (K);
2. **per query** — greedy forward selection of up to ``max_heads`` (P) heads from the pool,
   maximising nDCG@10 of the summed scores, then swap refinement (replace one chosen head
   by a pool head while that helps);
3. ties prefer fewer heads, then globally stronger heads (lower pool rank);
4. robustness — one query's 20 passages are easy to overfit, so a head is only added or
   swapped in when it improves the query's nDCG@10 by at least ``margin``, and the
   objective blends in the heads' pool-wide quality with weight ``pool_weight``.

Everything is vectorised over queries and pool heads, with the batched nDCG of
:mod:`.labelled` (checked against ir_measures in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..heads import Head, HeadGrid
from ..measures import batched_ndcg
from .labelled import LabelledSet, single_head_quality


class SearchConfig(BaseModel):
    """Settings of the head search; recorded with a fitted router."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    pool_size: int = Field(64, ge=1, description="K: heads kept by single-head quality over the set")
    max_heads: int = Field(8, ge=1, description="P: most heads in one query's label")
    depth: int = Field(10, ge=1, description="nDCG cut-off")
    margin: float = Field(0.01, ge=0.0, description="least nDCG gain for adding or swapping in a head")
    pool_weight: float = Field(
        0.1, ge=0.0, description="weight of the heads' mean pool-wide quality in the per-query objective"
    )
    swap_rounds: int = Field(2, ge=0, description="passes of swap refinement")
    starts: int = Field(4, ge=0, description="extra greedy restarts, seeded with each of the best pool heads")


@dataclass
class SearchResult:
    """Per-query labels over the flattened heads, and what the search saw."""

    qids: list[str]
    labels: torch.Tensor  # [query, head] multi-hot (flattened heads)
    query_ndcg: torch.Tensor  # [query] nDCG@depth of each query's own label
    pool: list[int]  # flattened head indices, best first
    pool_quality: torch.Tensor  # [pool] mean single-head nDCG
    num_layers: int
    num_heads: int

    def heads_of(self, row: int) -> list[Head]:
        return HeadGrid(self.num_layers, self.num_heads).heads(self.labels[row].nonzero().flatten().tolist())


def search_heads(data: LabelledSet, config: SearchConfig | None = None) -> SearchResult:
    """Forward selection + swap refinement of at most ``max_heads`` pool heads per query.

    Greedy selection from an empty set can lock onto a head that ranks one query's relevant
    passage first by chance; so the search also restarts from each of the ``starts`` globally
    strongest pool heads and keeps, per query, the best objective (ties: fewer heads, then
    the earlier start).
    """
    config = config or SearchConfig()
    quality = single_head_quality(data, config.depth)  # [head]
    pool_size = min(config.pool_size, quality.numel())
    # stable: equal quality keeps lower head index first
    pool = torch.argsort(quality, descending=True, stable=True)[:pool_size]  # [pool]
    chosen, final = [], []
    for part in data.chunks():  # queries are searched independently once the pool is fixed
        searcher = _PoolSearch(part, pool, quality[pool], config)
        best = searcher.run(seed=None)
        for seed in range(min(config.starts, pool_size)):
            candidate = searcher.run(seed=seed)
            better = (candidate.value > best.value + 1e-12) | (
                (candidate.value > best.value - 1e-12) & (candidate.count < best.count)
            )
            best = best.where(better, candidate)
        chosen.append(best.chosen)
        final.append(batched_ndcg(best.summed, part.gains, part.valid, part.ideal_dcg, config.depth))

    labels = torch.zeros(len(data.qids), data.num_flat_heads, dtype=torch.bool)
    labels[:, pool] = torch.cat(chosen)
    return SearchResult(
        qids=list(data.qids), labels=labels, query_ndcg=torch.cat(final), pool=pool.tolist(), pool_quality=quality[pool],
        num_layers=data.num_layers, num_heads=data.num_heads,
    )


@dataclass
class _State:
    chosen: torch.Tensor  # [query, pool] bool
    summed: torch.Tensor  # [query, passage] summed scores of the chosen heads
    quality_sum: torch.Tensor  # [query]
    count: torch.Tensor  # [query]
    value: torch.Tensor  # [query] objective

    def where(self, take: torch.Tensor, other: _State) -> _State:
        """Per query: ``other`` where ``take`` else ``self``."""
        return _State(
            chosen=torch.where(take[:, None], other.chosen, self.chosen),
            summed=torch.where(take[:, None], other.summed, self.summed),
            quality_sum=torch.where(take, other.quality_sum, self.quality_sum),
            count=torch.where(take, other.count, self.count),
            value=torch.where(take, other.value, self.value),
        )


class _PoolSearch:
    """Greedy forward selection and swap refinement over a pool, batched over queries."""

    def __init__(self, data: LabelledSet, pool: torch.Tensor, pool_quality: torch.Tensor, config: SearchConfig):
        self.config = config
        self.scores = data.rows_scores(heads=pool)  # [query, pool, passage] float64
        self.quality = pool_quality  # [pool]
        self.gains = data.gains[:, None, :]
        self.valid = data.valid[:, None, :]
        self.ideal = data.ideal_dcg[:, None]
        # a tiny preference for globally stronger (earlier) pool heads breaks exact ties
        self.tie_break = -torch.arange(pool.numel(), dtype=torch.float64) * 1e-9  # [pool]

    def objective(self, ndcg, quality_sum, size):
        return ndcg + self.config.pool_weight * quality_sum / size.clamp_min(1)

    def run(self, seed: int | None) -> _State:
        config, scores, quality = self.config, self.scores, self.quality
        n_query, pool_size, width = scores.shape
        state = _State(
            chosen=torch.zeros(n_query, pool_size, dtype=torch.bool),
            summed=torch.zeros(n_query, width, dtype=scores.dtype),
            quality_sum=torch.zeros(n_query, dtype=torch.float64),
            count=torch.zeros(n_query, dtype=torch.long),
            value=torch.zeros(n_query, dtype=torch.float64),
        )
        if seed is not None:
            state.chosen[:, seed] = True
            state.summed += scores[:, seed]
            state.quality_sum += quality[seed]
            state.count += 1
            ndcg = batched_ndcg(state.summed, self.gains[:, 0], self.valid[:, 0], self.ideal[:, 0], config.depth)
            state.value = self.objective(ndcg, state.quality_sum, state.count)
        self._forward(state)
        self._swap(state)
        return state

    def _forward(self, state: _State) -> None:
        config, scores, quality = self.config, self.scores, self.quality
        while int(state.count.min()) < config.max_heads:
            trial = state.summed[:, None, :] + scores  # [query, pool, passage]
            ndcg = batched_ndcg(trial, self.gains, self.valid, self.ideal, config.depth)  # [query, pool]
            value = self.objective(ndcg, state.quality_sum[:, None] + quality[None, :], (state.count + 1)[:, None])
            value = value.masked_fill(state.chosen, float("-inf")) + self.tie_break
            best_value, best = value.max(dim=1)  # [query]
            grow = ((best_value - state.value > config.margin) | (state.count == 0)) & (state.count < config.max_heads)
            if not grow.any():
                return
            rows, new = grow.nonzero().flatten(), best[grow]
            state.chosen[rows, new] = True
            state.summed[rows] += scores[rows, new]
            state.quality_sum[rows] += quality[new]
            state.count[rows] += 1
            state.value[rows] = best_value[rows] - self.tie_break[new]

    def _swap(self, state: _State) -> None:
        """Try replacing each chosen head (by label position, all queries at once) by a better pool head."""
        config, scores, quality = self.config, self.scores, self.quality
        n_query = scores.shape[0]
        for _ in range(config.swap_rounds):
            # members[q, j]: pool index of query q's j-th chosen head, -1 past its count
            members = torch.full((n_query, config.max_heads), -1, dtype=torch.long)
            for q_index, row in enumerate(state.chosen):
                picked = row.nonzero().flatten()
                members[q_index, : picked.numel()] = picked
            changed = False
            for position in range(config.max_heads):
                rows = (members[:, position] >= 0).nonzero().flatten()
                if rows.numel() == 0:
                    continue
                slot = members[rows, position]  # [rows]
                base = state.summed[rows] - scores[rows, slot]  # [rows, passage]
                trial = base[:, None, :] + scores[rows]  # [rows, pool, passage]
                ndcg = batched_ndcg(trial, self.gains[rows], self.valid[rows], self.ideal[rows], config.depth)
                qsum = state.quality_sum[rows, None] - quality[slot][:, None] + quality[None, :]
                value = self.objective(ndcg, qsum, state.count[rows, None])
                value = value.masked_fill(state.chosen[rows], float("-inf")) + self.tie_break
                best_value, best = value.max(dim=1)
                better = best_value - state.value[rows] > config.margin
                if not better.any():
                    continue
                changed = True
                sel, old, new = rows[better], slot[better], best[better]
                state.chosen[sel, old] = False
                state.chosen[sel, new] = True
                members[sel, position] = new
                state.summed[sel] = base[better] + scores[sel, new]
                state.quality_sum[sel] += quality[new] - quality[old]
                state.value[sel] = best_value[better] - self.tie_break[new]
            if not changed:
                return
