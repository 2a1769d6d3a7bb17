"""nDCG computed by us, batched in torch: the one place, checked against ir_measures in the tests.

ir_measures (:mod:`routehead_rag.eval.metrics`) evaluates runs; the head search, router training,
fusion fitting and LoRA training need nDCG of many candidate rankings at once, as tensors. The
definition is ir_measures' (linear gain, log2 discount, ties in the scores keep candidate order). Two
ideals, named apart:

* :func:`ideal_dcg`: over *every* judged document of the query (ir_measures' ideal): the nDCG every
  reported number uses;
* :func:`candidate_ideal_dcg`: over the candidates' own grades only (judged documents the first stage
  missed do not count): the nDCG a re-ranker can reach, higher than the first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def discounts(depth: int, length: int) -> torch.Tensor:
    """``1 / log2(rank + 1)`` for ranks 1..``length``, zero past ``depth``: ``[length]``."""
    ranks = torch.arange(1, length + 1, dtype=torch.float64)
    weights = 1.0 / torch.log2(ranks + 1.0)
    weights[depth:] = 0.0
    return weights


def ideal_dcg(grades: Iterable[float], depth: int = 10) -> float:
    """DCG@``depth`` of the ideal ranking of ``grades`` (every judged document's; negatives count as 0)."""
    best = sorted((max(float(g), 0.0) for g in grades), reverse=True)[:depth]
    weights = discounts(depth, max(len(best), 1))
    return float(sum(g * float(weights[i]) for i, g in enumerate(best)))


def candidate_ideal_dcg(gains: torch.Tensor, depth: int = 10) -> torch.Tensor:
    """``[...]`` the ideal DCG@``depth`` over the candidates' own gains ``[..., passage]`` (the re-ranker's ceiling)."""
    ordered = gains.double().clamp_min(0).sort(dim=-1, descending=True).values
    return (ordered * discounts(depth, gains.shape[-1])).sum(dim=-1)


def batched_ndcg(
    scores: torch.Tensor,  # [..., passage]
    gains: torch.Tensor,  # [..., passage] (broadcastable)
    valid: torch.Tensor,  # [..., passage] bool (broadcastable)
    ideal: torch.Tensor,  # [...] (broadcastable): ideal_dcg or candidate_ideal_dcg
    depth: int = 10,
) -> torch.Tensor:
    """nDCG@``depth`` of rankings by ``scores`` (descending, ties in passage order): ``[...]``; 0 where the ideal is 0."""
    masked = scores.masked_fill(~valid, float("-inf"))
    order = torch.argsort(masked, dim=-1, descending=True, stable=True)
    ranked_gains = torch.gather(gains.expand_as(masked), -1, order)
    ranked_valid = torch.gather(valid.expand_as(masked), -1, order)
    weights = discounts(depth, scores.shape[-1]).to(scores.device)
    dcg = (ranked_gains * ranked_valid * weights).sum(dim=-1)
    return torch.where(ideal > 0, dcg / ideal.clamp_min(1e-12), torch.zeros_like(dcg))
