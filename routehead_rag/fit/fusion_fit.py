"""Fitting first-stage fusion on top of a trained router (training side).

The fusion weight is chosen on dev nDCG@10: off, one global ``w`` from a grid, or a ``w`` the router
predicts per query (its fusion head, trained listwise on the train queries, epoch on dev); whichever
scores best on dev wins (``w = 0`` is the same ranking as no fusion, so "off" is kept when nothing
beats it). The calibration to probabilities is :mod:`.calibration`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..fusion import FusionConfig
from ..measures import batched_ndcg
from ..recipe import final_scores
from ..router.model import Router, RouterConfig
from .labelled import LabelledSet

WEIGHT_GRID = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def _ndcg(scores: torch.Tensor, data: LabelledSet, rows: torch.Tensor) -> float:
    return float(batched_ndcg(scores[rows], data.gains[rows], data.valid[rows], data.ideal_dcg[rows]).mean())


@dataclass
class FusionFit:
    fusion: FusionConfig
    router: Router  # with a trained fusion head when fusion.mode == "per_query"
    dev: dict[str, float]  # dev nDCG@10 of each candidate: off, global (best w), per_query
    final: torch.Tensor  # [query, passage] the chosen final scores (before calibration)


def fit_fusion(
    router: Router,
    embeddings: torch.Tensor,  # [query, input_dim]
    attention: torch.Tensor,  # [query, passage] routed attention scores
    signal: torch.Tensor,  # [query, passage] first-stage signal (raw: scores, or minus the rank)
    data: LabelledSet,
    train: torch.Tensor,
    dev: torch.Tensor,
    *,
    seed: int = 0,
    epochs: int = 300,
    eval_every: int = 10,
    learning_rate: float = 3e-3,
) -> FusionFit:
    """Choose off / global / per-query fusion on dev nDCG@10 (see the module notes)."""
    valid = data.valid

    def fused(weight) -> torch.Tensor:  # [query, passage]: the recipe's formula, a float or one weight per query
        return final_scores(attention, signal, weight, None, valid)

    by_weight = {w: _ndcg(fused(w), data, dev) for w in WEIGHT_GRID}
    best_weight = max(WEIGHT_GRID, key=lambda w: (by_weight[w], -w))
    scores = {"off": _ndcg(final_scores(attention, valid=valid), data, dev), "global": by_weight[best_weight]}

    torch.manual_seed(seed)
    config = RouterConfig(**{**router.config.model_dump(), "fusion_head": True})
    with_head = Router(config)
    with_head.load_state_dict(router.state_dict(), strict=False)  # the head selection as trained
    with torch.no_grad():  # start at the best global weight: softplus(c) = w, no query dependence yet
        with_head.fusion.weight.zero_()
        with_head.fusion.bias.fill_(float(torch.log(torch.expm1(torch.tensor(max(best_weight, 1e-3))))))
    parameters = [*with_head.fusion_norm.parameters(), *with_head.fusion.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)
    target = torch.where(data.valid, data.gains, torch.zeros_like(data.gains))
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [query, passage]
    best = (-1.0, None)
    for epoch in range(epochs + 1):
        if epoch:
            optimizer.zero_grad()
            weights = with_head.fusion_weights(embeddings[train]).double()  # [train]
            scored = final_scores(attention[train], signal[train], weights, None, valid[train])
            loss = -(target[train] * torch.log_softmax(scored.masked_fill(~valid[train], -1e9), dim=1)).sum(dim=1).mean()
            loss.backward()
            optimizer.step()
        if epoch % eval_every == 0 or epoch == epochs:
            with torch.no_grad():
                weights = with_head.fusion_weights(embeddings).double()
            value = _ndcg(fused(weights), data, dev)
            if value > best[0] + 1e-12:
                best = (value, copy.deepcopy(with_head.state_dict()))
    with_head.load_state_dict(best[1])
    with_head.eval()
    scores["per_query"] = best[0]

    mode = max(("off", "global", "per_query"), key=lambda m: (scores[m], -("off", "global", "per_query").index(m)))
    if mode == "off":
        return FusionFit(FusionConfig(), router, scores, final_scores(attention, valid=valid))
    if mode == "global":
        return FusionFit(FusionConfig(mode="global", weight=best_weight), router, scores, fused(best_weight))
    with torch.no_grad():
        weights = with_head.fusion_weights(embeddings).double()
    return FusionFit(FusionConfig(mode="per_query"), with_head, scores, fused(weights))


def query_weights(router: Router, fusion: FusionConfig, embeddings: torch.Tensor) -> torch.Tensor | None:
    """The first-stage weight of every query ``[query]`` as the router gives it (``None``: no fusion)."""
    if fusion.mode == "off":
        return None
    if fusion.mode == "global":
        return torch.full((embeddings.shape[0],), fusion.weight, dtype=torch.float64)
    with torch.no_grad():
        return router.fusion_weights(embeddings).double()
