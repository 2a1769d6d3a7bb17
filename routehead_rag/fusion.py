"""From a passage's attention score to the score a user sees: first-stage fusion, then calibration.

* **Fusion.** The first stage knows things attention misses, and the reverse. With fusion on,
  a passage's score is ``z(attention) + w * z(first stage)``, ``z`` standardising over the
  query's passages (blank ones left out).  The first-stage signal is the passage's first-stage
  rank: by the retrieval scores where one is given for every passage (Haystack ``Document.score``,
  LlamaIndex ``NodeWithScore.score``), else by the input order (rank 1 highest). A rank means the
  same for every retriever, so the fitted weight applies to BM25, dense or any first stage.  ``w`` is fitted by
  ``routehead-rag fit`` on dev: one global weight (0 allowed), or a weight the router predicts
  per query from the query embedding, whichever wins on dev.
* **Calibration.** ``p = sigmoid(slope * score + intercept)`` with ``slope > 0`` (monotone, so the
  ranking is unchanged), fitted on dev relevance labels, makes ``score_threshold`` mean the same
  for every query: a probability of relevance.

Both live in the router artifact; a head choice without one (``"all"``, static heads) scores raw.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class FusionConfig(BaseModel):
    """How attention and the first stage combine; fitted on dev, recorded with a router."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    mode: Literal["off", "global", "per_query"] = Field(
        "off", description="off: attention alone; global: one weight; per_query: the router predicts the weight"
    )
    weight: float = Field(
        0.0, ge=0.0, le=1000.0, allow_inf_nan=False,
        description="the global first-stage weight (mode 'global'); past 1000 the first stage alone decides any list",
    )
    level_weight: float = Field(
        0.0, ge=0.0, le=1000.0, allow_inf_nan=False,
        description="weight of the attention level: the heads' debiased mass times the list size (its share against "
        "an even split), which carries across lists where the within-list z-score cannot (a single candidate)",
    )
    first_stages: tuple[str, ...] = Field(
        ("bm25",), description="the first stages the weight was fitted with; the signal is the rank, so any other "
        "first stage's ranks are used the same way",
    )


class CalibrationConfig(BaseModel):
    """``p = sigmoid(slope * score + count_slope * log(list size) + intercept)``: within a list a monotone map of
    the score (the ranking is unchanged) to a probability of relevance."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    slope: float = Field(..., gt=0.0, allow_inf_nan=False, description="positive: the ranking is unchanged")
    intercept: float = Field(..., allow_inf_nan=False)
    count_slope: float = Field(0.0, allow_inf_nan=False, description="coefficient of log(number of passages in the list)")
    target: str = Field("grade >= 1", description="what 'relevant' meant in the dev labels")


def standardise(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(x - mean) / std`` over the last dimension ``[..., passage]`` (float64), over the ``valid`` passages
    only (padding comes back 0); a constant row becomes zeros.

    Overflow-safe: each row is first divided by its largest magnitude (standardising is scale-free), so
    finite scores as large as ``1e308`` standardise like any others."""
    scores = scores.double()
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    scale = scores.abs().masked_fill(~valid, 0.0).amax(dim=-1, keepdim=True)
    scaled = torch.where(valid, scores / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(scores))
    count = valid.sum(dim=-1, keepdim=True).clamp_min(1)
    mean = scaled.sum(dim=-1, keepdim=True) / count
    centred = torch.where(valid, scaled - mean, torch.zeros_like(scaled))
    std = (centred.square().sum(dim=-1, keepdim=True) / count).sqrt()
    return torch.where((std > 1e-12) & valid, centred / std.clamp_min(1e-12), torch.zeros_like(scores))


def order_signal(count: int) -> torch.Tensor:
    """The first-stage signal of passages given in first-stage order: minus the rank (rank 1 highest), ``[passage]``."""
    return -torch.arange(count, dtype=torch.float64)


def first_stage_signal(count: int, scores: list[float] | None = None) -> torch.Tensor:
    """The first-stage signal ``[passage]``: minus each passage's first-stage rank (rank 1 highest).

    The rank, not the score, whatever the first stage (BM25, cosine, a framework's own): so one fitted
    weight means the same for every retriever and every score scale. With ``scores`` (one per passage, in
    the passages' order) the rank is by score, highest first, ties in input order; without, or with a
    non-finite score among them, the input order is the rank. :func:`routehead_rag.recipe.final_scores`
    standardises it over the list."""
    if scores is None:
        return order_signal(count)
    values = torch.tensor(scores, dtype=torch.float64)
    if values.numel() != count:
        raise ValueError(f"{values.numel()} first-stage scores for {count} passages")
    if not bool(torch.isfinite(values).all()):
        return order_signal(count)  # a framework's NaN or infinite score carries no usable order
    order = torch.argsort(-values, stable=True)  # [passage] best first
    signal = torch.empty(count, dtype=torch.float64)
    signal[order] = order_signal(count)
    return signal


def calibrate(scores: torch.Tensor, calibration: CalibrationConfig, count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Probabilities of relevance ``[..., passage]`` for final scores ``[..., passage]`` of lists of ``count``
    passages (a number, or ``[...]`` one per list; default: the last dimension's size)."""
    scores = scores.double()
    count = torch.as_tensor(scores.shape[-1] if count is None else count, dtype=torch.float64)
    if count.dim():
        count = count.unsqueeze(-1)  # [..., 1]
    offset = calibration.count_slope * torch.log(count.clamp_min(1.0)) + calibration.intercept
    return torch.sigmoid(calibration.slope * scores + offset)
