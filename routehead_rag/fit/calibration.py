"""Calibrated scores that mean the same in every list (training side).

A probability a user thresholds must not depend on how many other candidates there are or how good
they are. The within-list z-score cannot give that (one candidate alone always has z = 0), so the
score the calibration maps carries an absolute term, the attention level ``u * attention * n``
(:func:`routehead_rag.recipe.final_scores`), and the map sees the list size:
``p = sigmoid(a * score + d * log(n) + b)``.

What it is fitted on: the fit's dev queries, each as its full candidate list *and* as sub-lists
scored on their own (:func:`sublist_sources`: one relevant candidate alone, one irrelevant one alone,
and five candidates), so the map has seen lists of 1, 5 and 20 and single relevant and irrelevant
passages. The level weight ``u`` is chosen from a grid by the calibration's log-likelihood on those
lists, among the weights whose full-list dev nDCG@10 stays within ``tolerance`` of ``u = 0`` (the
level term may move the ranking a little; it must not cost it). Fused and unfused configurations
(``fuse_first_stage``) each get their own calibration, fitted on their own scores.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..fusion import CalibrationConfig
from ..measures import batched_ndcg
from ..recipe import final_scores
from .sources import FitSource

LEVEL_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
SUBLIST_SIZE = 5


@dataclass
class Lists:
    """Padded lists to calibrate on: ``[list, passage]`` tensors (the routed attention, the first-stage signal,
    grades, validity) and the first-stage weight of each list's query (``[list]``, or ``None``: no fusion)."""

    attention: torch.Tensor
    signal: torch.Tensor
    gains: torch.Tensor
    valid: torch.Tensor
    weights: torch.Tensor | None
    ideal: torch.Tensor | None = None  # [list] ideal DCG (full lists only: where nDCG is measured)
    cosine: torch.Tensor | None = None  # [list, passage] the bi-encoder's cosines (None: the router has none)
    cosine_weights: torch.Tensor | None = None  # [list] the bi-encoder weight of each list's query (with cosine)

    @property
    def cosine_weight(self) -> torch.Tensor | float:
        """What :func:`~routehead_rag.recipe.final_scores` takes: the per-list weights, or 0 without a bi-encoder."""
        if (self.cosine is None) != (self.cosine_weights is None):
            raise ValueError("Lists.cosine and Lists.cosine_weights go together: pass both or neither")
        return 0.0 if self.cosine_weights is None else self.cosine_weights

    @staticmethod
    def cat(parts: Sequence[Lists]) -> Lists:
        width = max(p.attention.shape[1] for p in parts)

        def pad(t: torch.Tensor, value=0) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        weights = None if parts[0].weights is None else torch.cat([p.weights for p in parts])
        cosine = None if parts[0].cosine is None else torch.cat([pad(p.cosine.double()) for p in parts])
        cosine_weights = None if parts[0].cosine_weights is None else torch.cat([p.cosine_weights for p in parts])
        return Lists(torch.cat([pad(p.attention.double()) for p in parts]), torch.cat([pad(p.signal) for p in parts]),
                     torch.cat([pad(p.gains) for p in parts]), torch.cat([pad(p.valid, False) for p in parts]), weights,
                     cosine=cosine, cosine_weights=cosine_weights)


def sublist_sources(sources: Sequence[FitSource], keys: Sequence[str], seed: int = 0) -> tuple[list[FitSource], dict]:
    """Sub-lists of the queries ``keys`` (``"<source>/<qid>"``) as fit sources of their own (cached like any other):
    per query, one relevant candidate alone, one irrelevant one alone, and ``SUBLIST_SIZE`` candidates (first-stage
    order kept). Returns the sources and ``{sub-list key: query key}``."""
    rng = random.Random(seed)
    by_name = {s.name: s for s in sources}
    grouped: dict[str, list[str]] = {}
    for key in keys:
        name, qid = key.split("/", 1)
        grouped.setdefault(name, []).append(qid)
    out, parent = [], {}
    for name, qids in grouped.items():
        source = by_name[name]
        candidates: dict[str, list[str]] = {}
        for qid in qids:
            ids, grades = source.candidates[qid], source.qrels.get(qid, {})
            relevant = [d for d in ids if grades.get(d, 0) > 0]
            irrelevant = [d for d in ids if grades.get(d, 0) <= 0]
            if relevant and irrelevant:
                candidates[f"{qid}#relevant"] = [rng.choice(relevant)]
                candidates[f"{qid}#irrelevant"] = [rng.choice(irrelevant)]
            if len(ids) > SUBLIST_SIZE:
                picked = sorted(rng.sample(range(len(ids)), SUBLIST_SIZE))
                candidates[f"{qid}#{SUBLIST_SIZE}"] = [ids[i] for i in picked]
        sub = FitSource(
            name=f"{name}+sublists", queries={k: source.queries[k.split("#")[0]] for k in candidates},
            candidates=candidates, qrels={k: source.qrels.get(k.split("#")[0], {}) for k in candidates},
            passages=lambda qid, ids, source=source: source.passages(qid.split("#")[0], ids), origin=source.origin,
            key=source.key, instruction=source.instruction,
        )
        out.append(sub)
        parent.update({f"{sub.name}/{k}": f"{name}/{k.split('#')[0]}" for k in candidates})
    return out, parent


def _logistic(scores: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor, steps: int = 200):
    """``(slope, count_slope, intercept)`` of ``p = sigmoid(a * score + d * log n + b)``, ``a > 0``, by LBFGS on the
    cross-entropy; with the mean cross-entropy."""
    mean, std = float(scores.mean()), float(scores.std().clamp_min(1e-12))
    x, log_n = (scores - mean) / std, torch.log(counts)
    raw = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # slope = softplus(raw) / std
    d = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([raw, d, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss_of():
        logits = torch.nn.functional.softplus(raw) * x + d * log_n + b
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def closure():
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        slope = float(torch.nn.functional.softplus(raw)) / std
        return max(slope, 1e-9), float(d), float(b) - slope * mean, float(loss_of())


def fit_calibration(full: Lists, sub: Lists | None, fused: bool, relevant_grade: int = 1,
                    tolerance: float = 0.002, level_grid: Sequence[float] = LEVEL_GRID):
    """The level weight and the calibration of one configuration (``fused``: with the first stage); see the notes.
    The lists' ``cosine`` is added at their ``cosine_weights`` (the router's bi-encoder weight of each query).

    Returns ``(level_weight, CalibrationConfig, metrics)``; ``metrics`` hold the ECE on the dev lists (full and
    sub-lists), the nDCG@10 of each level weight tried and the cross-entropy."""
    lists = full if sub is None else Lists.cat([full, sub])
    weights = lists.weights if fused else None
    ndcg, fits = {}, {}
    for level in level_grid:
        on_full = final_scores(full.attention, full.signal, full.weights if fused else None, None, full.valid, level,
                               full.cosine, full.cosine_weight)
        ndcg[level] = float(batched_ndcg(on_full, full.gains, full.valid, full.ideal).mean())
        scores = final_scores(lists.attention, lists.signal, weights, None, lists.valid, level, lists.cosine,
                              lists.cosine_weight)  # [list, passage]
        counts = lists.valid.sum(dim=1, keepdim=True).double().expand_as(scores)
        fits[level] = _logistic(scores[lists.valid], counts[lists.valid], (lists.gains[lists.valid] >= relevant_grade).double())
    eligible = [u for u in level_grid if ndcg[u] >= ndcg[level_grid[0]] - tolerance]
    level = min(eligible, key=lambda u: (fits[u][3], u))
    slope, count_slope, intercept, loss = fits[level]
    config = CalibrationConfig(slope=slope, intercept=intercept, count_slope=count_slope,
                               target=f"grade >= {relevant_grade}")
    probabilities = final_scores(lists.attention, lists.signal, weights, config, lists.valid, level, lists.cosine,
                                 lists.cosine_weight)[lists.valid]
    labels = (lists.gains[lists.valid] >= relevant_grade).double()
    metrics = {"ece": expected_calibration_error(probabilities, labels), "pairs": float(len(labels)),
               "positive_rate": float(labels.mean()), "cross_entropy": loss,
               **{f"ndcg@10 level {u:g}": value for u, value in ndcg.items()}}
    if sub is not None:  # the single-passage lists: does a relevant passage alone score above an irrelevant one?
        single = sub.valid.sum(dim=1) == 1
        if bool(single.any()):
            p = final_scores(sub.attention, sub.signal, sub.weights if fused else None, config, sub.valid, level,
                             sub.cosine, sub.cosine_weight)[single, 0]
            rel = sub.gains[single, 0] >= relevant_grade
            metrics["single_relevant_mean_p"] = float(p[rel].mean()) if bool(rel.any()) else float("nan")
            metrics["single_irrelevant_mean_p"] = float(p[~rel].mean()) if bool((~rel).any()) else float("nan")
    return level, config, metrics


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by their share of pairs."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.clamp(torch.bucketize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            error += float(members.double().mean()) * abs(float(labels[members].mean()) - float(probabilities[members].mean()))
    return error


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> list[dict[str, float]]:
    """Per probability bin: mean predicted probability, observed rate of relevant passages, share of pairs."""
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.clamp(torch.bucketize(probabilities, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if members.any():
            rows.append({"bin": b, "predicted": float(probabilities[members].mean()),
                         "observed": float(labels[members].mean()), "share": float(members.double().mean())})
    return rows


def calibrate_router(backbone, sources: Sequence[FitSource], scoring, pooled, data, routed: torch.Tensor,
                     weights: torch.Tensor | None, rows: Sequence[int], cache_dir, progress, executor=None,
                     storage_dtype: str = "float16", lora=None, full_attention: dict[str, torch.Tensor] | None = None,
                     queries: int = 200, seed: int = 0, cosines: torch.Tensor | None = None, bi_encoder=None,
                     cosine_weights: torch.Tensor | None = None):
    """The calibrations of a fitted router on the dev ``rows`` of ``data`` (see the module notes).

    ``routed`` ``[query, k]`` are the routed heads (flat indices) of every row, ``weights`` ``[query]`` the first-
    stage weight of every row (``None``: no fusion). The sub-lists of up to ``queries`` dev queries are scored from
    the extraction cache (base model) or, with ``lora``, live with it, as ``full_attention`` (``{key: [passage]}``,
    the LoRA's dev scores) is for the full lists. ``bi_encoder`` (a :class:`~routehead_rag.bi_encoder.BiEncoderConfig`)
    adds its cosine at its weight: ``cosines`` ``[query, passage]`` for the full lists, the sub-lists' computed
    here; ``cosine_weights`` ``[query]``: each row's weight for it (the router's per-query one; ``None``: the
    bi-encoder's own weight for every row). Returns ``(level_weight, calibration, calibration_unfused,
    metrics)``; ``calibration_unfused`` is ``None`` without fusion (one configuration)."""
    from ..engine.scorer import AttentionScorer
    from .extract import cached_cosines, cosine_cache_folder, extract_sources

    rows = [r for r in rows if full_attention is None or data.qids[r] in full_attention]
    sample = sorted(rows, key=lambda r: random.Random(f"{seed}:{data.qids[r]}").random())[:queries]
    index = torch.tensor(rows)
    attention = data.sum_heads(routed[index], index)  # [row, passage]
    if full_attention is not None:
        for i, r in enumerate(rows):
            scores = full_attention[data.qids[r]]
            attention[i, : scores.numel()] = scores.double()
    signal = pooled.first_stage_signal(data)[index]
    row_weights = None if weights is None else weights[index]
    if bi_encoder is not None and cosine_weights is None:
        cosine_weights = torch.full((len(data.qids),), bi_encoder.weight, dtype=torch.float64)
    full = Lists(attention, signal, data.gains[index], data.valid[index], row_weights, data.ideal_dcg[index],
                 None if bi_encoder is None else cosines[index],
                 None if bi_encoder is None else cosine_weights[index].double())
    encoder = None
    if bi_encoder is not None:
        from ..bi_encoder import load_bi_encoder

        encoder = load_bi_encoder(bi_encoder.model)
        folder = None if cache_dir is None else cosine_cache_folder(encoder, cache_dir)
    subs, parent = sublist_sources(sources, [data.qids[r] for r in sample], seed)
    row_of = {key: row for row, key in enumerate(data.qids)}
    heads_of = {key: data.grid.heads(routed[row_of[key]].tolist()) for key in set(parent.values())}
    parts = []
    if lora is None:
        relabelled = None if progress is None else (lambda _stage, done, total: progress("calibration lists", done, total))
        extracted = extract_sources(backbone, subs, scoring, cache_dir, relabelled, executor=executor,
                                    storage_dtype=storage_dtype)
        scored = {key: AttentionScorer.aggregate(_scores(extracted.scores[key]), heads_of[parent[key]])
                  for key in extracted.scores}
    else:
        scored = {}
        for source in subs:
            scorer = AttentionScorer(backbone, scoring if source.instruction is None else
                                     scoring.with_instruction(source.instruction))
            for qid, ids in source.candidates.items():
                key = f"{source.name}/{qid}"
                heads = heads_of[parent[key]]
                scored[key] = scorer.passage_scores(source.queries[qid], source.passages(qid, ids), heads, lora)
    for key, scores in scored.items():
        name, qid = key.split("/", 1)
        source = next(s for s in subs if s.name == name)
        grades = source.qrels.get(qid, {})
        count = scores.numel()
        gains = torch.tensor([[float(max(grades.get(d, 0), 0)) for d in source.candidates[qid]]], dtype=torch.float64)
        weight = None if weights is None else weights[row_of[parent[key]]].reshape(1)
        cosine = None if encoder is None else cached_cosines(
            encoder, source.queries[qid], source.passages(qid, source.candidates[qid]), folder).reshape(1, count)
        cosine_weight = None if encoder is None else cosine_weights[row_of[parent[key]]].double().reshape(1)
        parts.append(Lists(scores.double().reshape(1, count), -torch.arange(count, dtype=torch.float64).reshape(1, count),
                           gains, torch.ones(1, count, dtype=torch.bool), weight, cosine=cosine,
                           cosine_weights=cosine_weight))
    sub = Lists.cat(parts) if parts else None
    level, calibration, metrics = fit_calibration(full, sub, fused=weights is not None)
    unfused = None
    if weights is not None:
        _, unfused, unfused_metrics = fit_calibration(full, sub, fused=False, level_grid=(level,))
        metrics.update({f"unfused_{k}": v for k, v in unfused_metrics.items() if not k.startswith("ndcg")})
    metrics["sublists"] = float(len(parts))
    return level, calibration, unfused, metrics


def _scores(debiased: torch.Tensor):
    """A cached extraction's debiased ``[layer, head, passage]`` scores as the scorer's ``HeadScores``."""
    from ..engine.scorer import HeadScores

    return HeadScores(real=debiased.float(), content_free=None)
