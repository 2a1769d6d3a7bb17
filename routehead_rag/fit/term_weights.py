"""Fitting the weights of the score's added terms on top of a trained router (training side): the first
stage's and the bi-encoder's (:func:`routehead_rag.recipe.final_scores`).

First stage (:func:`fit_fusion`): off, one global ``w`` from a grid, or a ``w`` the router predicts per query (its
fusion head); whichever scores best on dev nDCG@10 wins (``w = 0`` is the same ranking as no fusion, so "off" is
kept when nothing beats it).

Bi-encoder: its global weight ``v`` starts at the one chosen across domains
(:data:`routehead_rag.bi_encoder.DEFAULT_WEIGHT`); :func:`choose_bi_encoder_weight` replaces it by another of a grid
only where this fit's dev queries prefer that one significantly (a domain's own fit: e.g. multi-hop questions,
where the bi-encoder is weak, want a smaller ``v``), and :func:`fit_bi_encoder_weight` may scale it per query (the
router's bi-encoder head, ``v(q) = v * exp(<t, layernorm(q)> + e)``), kept where that beats the global ``v`` on dev
nDCG@10.

Both heads train the same way (:func:`_train_head`): listwise softmax cross-entropy of the final scores against
the grades on the train queries, starting where the global weight is (no query dependence yet), the epoch
chosen on dev (epoch 0 is the global weight). The calibration to probabilities is :mod:`.calibration`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..bi_encoder import BiEncoderConfig
from ..fusion import FusionConfig
from ..measures import batched_ndcg
from ..recipe import final_scores
from ..router.model import Router, RouterConfig
from .labelled import LabelledSet

WEIGHT_GRID = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
BI_ENCODER_WEIGHT_GRID = (5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0)  # the bi-encoder weights a fit may choose on dev
SIGNIFICANCE = 0.05  # a dev choice leaves the given weight only with a paired randomization test below this


def _ndcg(scores: torch.Tensor, data: LabelledSet, rows: torch.Tensor) -> float:
    """Mean nDCG@10 of ``rows``, from scores ``[query, passage]`` of every query."""
    return _dev_ndcg(scores[rows], data, rows)


def _dev_ndcg(scores: torch.Tensor, data: LabelledSet, rows: torch.Tensor) -> float:
    """Mean nDCG@10 of ``rows``, from their own scores ``[row, passage]``."""
    return float(batched_ndcg(scores, data.gains[rows], data.valid[rows], data.ideal_dcg[rows]).mean())


def listwise_loss(scores: torch.Tensor, gains: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over lists of the softmax cross-entropy of ``scores`` ``[list, passage]`` against the grades as a
    distribution (padding, where ``valid`` is False, left out)."""
    target = torch.where(valid, gains, torch.zeros_like(gains)).double()
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [list, passage]
    return -(target * torch.log_softmax(scores.masked_fill(~valid, -1e9), dim=1)).sum(dim=1).mean()


def _train_head(
    head: Router,
    parameters: list[torch.nn.Parameter],
    weights_of: Callable[[torch.Tensor], torch.Tensor],  # [query, input_dim] -> [query] the head's weights
    scores_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (rows, weights [row]) -> [row, passage]
    embeddings: torch.Tensor,  # [query, input_dim]
    data: LabelledSet,
    train: torch.Tensor,
    dev: torch.Tensor,
    epochs: int,
    eval_every: int,
    learning_rate: float,
) -> float:
    """Train ``parameters`` of ``head`` listwise on ``train`` (full batch, AdamW); ``head`` ends at the state with
    the best dev nDCG@10 (epoch 0 included), which is returned."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-4)
    best = (-1.0, None)
    for epoch in range(epochs + 1):
        if epoch:
            optimizer.zero_grad()
            scored = scores_of(train, weights_of(embeddings[train]).double())
            listwise_loss(scored, data.gains[train], data.valid[train]).backward()
            optimizer.step()
        if epoch % eval_every == 0 or epoch == epochs:
            with torch.no_grad():
                value = _dev_ndcg(scores_of(dev, weights_of(embeddings[dev]).double()), data, dev)
            if value > best[0] + 1e-12:
                best = (value, copy.deepcopy(head.state_dict()))
    head.load_state_dict(best[1])
    head.eval()
    return best[0]


def _with_head(router: Router, **heads: bool) -> Router:
    """A copy of ``router`` with the given heads added (its head selection, and any head it has, as trained)."""
    with_head = Router(RouterConfig(**{**router.config.model_dump(), **heads}))
    with_head.load_state_dict(router.state_dict(), strict=False)
    return with_head


@dataclass
class FusionFit:
    fusion: FusionConfig
    router: Router  # with a trained fusion head when fusion.mode == "per_query"
    dev: dict[str, float]  # dev nDCG@10 of each candidate: off, global (best w), per_query


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
    with_head = _with_head(router, fusion_head=True)
    with torch.no_grad():  # start at the best global weight: softplus(c) = w, no query dependence yet
        with_head.fusion.weight.zero_()
        with_head.fusion.bias.fill_(float(torch.log(torch.expm1(torch.tensor(max(best_weight, 1e-3))))))
    scores["per_query"] = _train_head(
        with_head, [*with_head.fusion_norm.parameters(), *with_head.fusion.parameters()], with_head.fusion_weights,
        lambda rows, weights: final_scores(attention[rows], signal[rows], weights, None, valid[rows]),
        embeddings, data, train, dev, epochs, eval_every, learning_rate)

    mode = max(("off", "global", "per_query"), key=lambda m: (scores[m], -("off", "global", "per_query").index(m)))
    if mode == "off":
        return FusionFit(FusionConfig(), router, scores)
    if mode == "global":
        return FusionFit(FusionConfig(mode="global", weight=best_weight), router, scores)
    return FusionFit(FusionConfig(mode="per_query"), with_head, scores)


def query_weights(router: Router, fusion: FusionConfig, embeddings: torch.Tensor) -> torch.Tensor | None:
    """The first-stage weight of every query ``[query]`` as the router gives it (``None``: no fusion)."""
    if fusion.mode == "off":
        return None
    if fusion.mode == "global":
        return torch.full((embeddings.shape[0],), fusion.weight, dtype=torch.float64)
    with torch.no_grad():
        return router.fusion_weights(embeddings).double()


@dataclass
class BiEncoderFit:
    bi_encoder: BiEncoderConfig  # its mode: the one dev chose
    router: Router  # with the trained bi-encoder head when bi_encoder.mode == "per_query"
    dev: dict[str, float]  # dev nDCG@10 of each candidate: global, per_query
    weights: torch.Tensor  # [query] the chosen bi-encoder weight of every query


def fit_bi_encoder_weight(
    router: Router,
    embeddings: torch.Tensor,  # [query, input_dim]
    attention: torch.Tensor,  # [query, passage] routed attention scores
    signal: torch.Tensor,  # [query, passage] first-stage signal
    fusion_weights: torch.Tensor | None,  # [query] the first-stage weight of each query (None: no fusion)
    cosines: torch.Tensor,  # [query, passage] the bi-encoder's (every train and dev row)
    bi_encoder: BiEncoderConfig,  # the global weight to start from and compare with
    data: LabelledSet,
    train: torch.Tensor,
    dev: torch.Tensor,
    *,
    seed: int = 0,
    epochs: int = 300,
    eval_every: int = 10,
    learning_rate: float = 3e-5,
) -> BiEncoderFit:
    """Choose the global bi-encoder weight or a per-query one on dev nDCG@10 (see the module notes).

    ``learning_rate``: chosen on the folds' dev queries by ``benchmarks/bi_encoder_head.py``; AdamW moves each of the
    embedding's weights by about this much per step, so ``<t, layernorm(q)>`` moves by up to hidden size times it (at
    1e-2 the weight hits its clamp in one step)."""
    valid = data.valid

    def scored(rows: torch.Tensor, weights) -> torch.Tensor:  # [row, passage]
        fusion = None if fusion_weights is None else fusion_weights[rows]
        return final_scores(attention[rows], signal[rows], fusion, None, valid[rows], cosine=cosines[rows],
                            cosine_weight=weights)

    scores = {"global": _dev_ndcg(scored(dev, bi_encoder.weight), data, dev)}
    torch.manual_seed(seed)
    with_head = _with_head(router, bi_encoder_head=True)
    with torch.no_grad():  # start at the global weight: exp(0) = 1, no query dependence yet
        with_head.bi_encoder.weight.zero_()
        with_head.bi_encoder.bias.zero_()
    scores["per_query"] = _train_head(
        with_head, [*with_head.bi_encoder_norm.parameters(), *with_head.bi_encoder.parameters()],
        lambda q: bi_encoder.weight * with_head.bi_encoder_scales(q), scored, embeddings, data, train, dev, epochs,
        eval_every, learning_rate)
    if scores["per_query"] <= scores["global"] + 1e-12:
        weights = torch.full((len(data.qids),), bi_encoder.weight, dtype=torch.float64)
        return BiEncoderFit(bi_encoder.model_copy(update={"mode": "global"}), router, scores, weights)
    per_query = bi_encoder.model_copy(update={"mode": "per_query"})
    return BiEncoderFit(per_query, with_head, scores, cosine_weights(with_head, per_query, embeddings))


def check_bi_encoder_weights(weights, name: str) -> tuple[float, ...]:
    """``weights`` as floats, refused (naming ``name`` and the values) unless a non-empty list in (0, 1000], the
    range of :class:`~routehead_rag.bi_encoder.BiEncoderConfig`'s weight."""
    weights = tuple(float(v) for v in weights)
    if not weights or any(not 0.0 < v <= 1000.0 for v in weights):
        raise ValueError(f"{name}={list(weights)}: pass a non-empty list of bi-encoder weights in (0, 1000]")
    return weights


@dataclass
class BiEncoderWeightChoice:
    bi_encoder: BiEncoderConfig  # with the chosen weight (and how it was chosen)
    dev: dict[float, float]  # dev nDCG@10 of every weight tried
    p_value: float | None  # of the chosen weight against the given one on dev (None: the given one kept as the best)


def choose_bi_encoder_weight(
    attention: torch.Tensor,  # [query, passage] routed attention scores
    signal: torch.Tensor,  # [query, passage] first-stage signal
    fusion_weights: torch.Tensor | None,  # [query] the first-stage weight of each query (None: no fusion)
    cosines: torch.Tensor,  # [query, passage] the bi-encoder's (dev rows at least)
    bi_encoder: BiEncoderConfig,  # the given weight, kept unless dev prefers another significantly
    data: LabelledSet,
    dev: torch.Tensor,
    candidates: tuple[float, ...] = BI_ENCODER_WEIGHT_GRID,
) -> BiEncoderWeightChoice:
    """The bi-encoder weight with the best dev nDCG@10 among ``candidates`` and the given one, taken only where a
    paired randomization test of it against the given weight on the dev queries is below :data:`SIGNIFICANCE`;
    else the given weight stays (ties: the given one, then the smaller). Scored without the level term (the
    calibration fits that afterwards, with the chosen weight, and may not let it cost the ranking)."""
    from ..eval.metrics import paired_randomization_test

    check_bi_encoder_weights(candidates, "candidates")
    fusion = None if fusion_weights is None else fusion_weights[dev]
    per_query = {}  # weight -> [dev] nDCG@10
    for weight in sorted({bi_encoder.weight, *candidates}):
        scores = final_scores(attention[dev], signal[dev], fusion, None, data.valid[dev], cosine=cosines[dev],
                              cosine_weight=weight)
        per_query[weight] = batched_ndcg(scores, data.gains[dev], data.valid[dev], data.ideal_dcg[dev])
    dev_ndcg = {weight: float(values.mean()) for weight, values in per_query.items()}
    best = max(dev_ndcg, key=lambda v: (round(dev_ndcg[v], 12), v == bi_encoder.weight, -v))
    if best == bi_encoder.weight:
        return BiEncoderWeightChoice(bi_encoder, dev_ndcg, None)
    p_value = paired_randomization_test(per_query[best].tolist(), per_query[bi_encoder.weight].tolist())
    if p_value >= SIGNIFICANCE:
        return BiEncoderWeightChoice(bi_encoder, dev_ndcg, p_value)
    chosen = bi_encoder.model_copy(update={
        "weight": best, "chosen_by": f"this fit's dev queries ({len(dev)}): nDCG@10 {dev_ndcg[best]:.4f} against "
        f"{dev_ndcg[bi_encoder.weight]:.4f} at {bi_encoder.weight:g} (p = {p_value:.3f})"})
    return BiEncoderWeightChoice(chosen, dev_ndcg, p_value)


def cosine_weights(router: Router, bi_encoder: BiEncoderConfig, embeddings: torch.Tensor) -> torch.Tensor:
    """The bi-encoder weight of every query ``[query]`` as the router gives it."""
    if bi_encoder.mode == "global":
        return torch.full((embeddings.shape[0],), bi_encoder.weight, dtype=torch.float64)
    with torch.no_grad():
        return bi_encoder.weight * router.bi_encoder_scales(embeddings).double()

