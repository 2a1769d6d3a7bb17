"""From a passage's attention score to the score a user sees: first-stage fusion, then calibration.

* **Fusion.** The first stage knows things attention misses, and the reverse. With fusion on,
  a passage's score is ``z(attention) + w * z(first stage)``, ``z`` standardising over the
  query's passages (blank ones left out).  The first-stage signal is the framework's retrieval
  score where one is given for every passage (Haystack ``Document.score``, LlamaIndex
  ``NodeWithScore.score``), else the input order (rank 1 highest).  ``w`` is fitted by
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
    weight: float = Field(0.0, ge=0.0, description="the global first-stage weight (mode 'global')")


class CalibrationConfig(BaseModel):
    """``p = sigmoid(slope * score + intercept)``: a monotone map to a probability of relevance."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    slope: float = Field(..., gt=0.0, description="positive: the ranking is unchanged")
    intercept: float
    target: str = Field("grade >= 1", description="what 'relevant' meant in the dev labels")


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the last dimension ``[..., passage]``; a constant row becomes zeros."""
    scores = scores.double()
    mean = scores.mean(dim=-1, keepdim=True)
    std = scores.std(dim=-1, keepdim=True, unbiased=False)
    return torch.where(std > 1e-12, (scores - mean) / std.clamp_min(1e-12), torch.zeros_like(scores))


def order_signal(count: int) -> torch.Tensor:
    """The first-stage signal of passages given in first-stage order: rank 1 highest, ``[passage]``."""
    return -torch.arange(count, dtype=torch.float64)


def first_stage_signal(count: int, scores: list[float] | None = None) -> torch.Tensor:
    """Standardised first-stage signal ``[passage]``: the retrieval scores when given, else the input order."""
    signal = torch.tensor(scores, dtype=torch.float64) if scores is not None else order_signal(count)
    if signal.numel() != count:
        raise ValueError(f"{signal.numel()} first-stage scores for {count} passages")
    if not bool(torch.isfinite(signal).all()):
        signal = order_signal(count)  # a framework's NaN or infinite score carries no usable scale
    return standardise(signal)


def fuse(attention: torch.Tensor, first_stage: torch.Tensor, weight: float) -> torch.Tensor:
    """``z(attention) + weight * first_stage`` over ``[..., passage]`` (``first_stage`` already standardised)."""
    return standardise(attention) + weight * first_stage.double()


def calibrate(scores: torch.Tensor, calibration: CalibrationConfig) -> torch.Tensor:
    """Probabilities of relevance ``[...]`` for final scores ``[...]``."""
    return torch.sigmoid(calibration.slope * scores.double() + calibration.intercept)
