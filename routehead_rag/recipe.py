"""The one place a query's final score is composed: heads -> aggregate -> fuse -> calibrate.

A :class:`ScoringRecipe` is how one query is scored: the heads to sum (from the head choice,
:mod:`routehead_rag.strategy`), and what a fitted router adds for it: the first-stage weight, the
calibration to probabilities and the LoRA the scorer switches on. :func:`final_scores` is the
formula; everything that turns attention into a score a user sees calls it, batched or not:
:class:`~routehead_rag.RouteHeadReranker`, ``routehead-rag eval`` (it ranks through the re-ranker),
``fit`` (fusion fitting, calibration, dev metrics and LoRA training) and the benchmarks::

    attention = recipe.attention(head_scores)                 # [passage] debiased mass of the heads
    final = recipe.final_scores(attention, first_stage)       # [passage] fused, then calibrated

The formula, over the passages of one list (``z`` standardises over the list's valid passages)::

    fused = z(attention) + w * z(first stage)     # w: the router's first-stage weight (no fusion: attention)
    p     = sigmoid(slope * fused + intercept)    # the calibration (none: the fused score itself)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .fusion import CalibrationConfig, calibrate, standardise
from .heads import Head

if TYPE_CHECKING:
    from .engine.lora import Lora
    from .engine.scorer import HeadScores


def final_scores(
    attention: torch.Tensor,  # [..., passage] debiased attention mass of the chosen heads
    first_stage: torch.Tensor | None = None,  # [..., passage] first-stage signal (raw: standardised here)
    weight: float | torch.Tensor | None = None,  # first-stage weight: a float, or [...] one per list
    calibration: CalibrationConfig | None = None,
    valid: torch.Tensor | None = None,  # [..., passage] bool; None: every passage is real
) -> torch.Tensor:
    """The final score of every passage ``[..., passage]`` (float64; padding, where ``valid`` is False, is 0).

    ``weight`` ``None`` (or no ``first_stage``): no fusion, the attention mass itself is the score
    before calibration. ``calibration`` ``None``: no probabilities."""
    scores = attention.double()
    if weight is not None and first_stage is not None:
        weight = torch.as_tensor(weight, dtype=torch.float64)
        if weight.dim():
            weight = weight.unsqueeze(-1)  # [..., 1]: one weight per list
        scores = standardise(scores, valid) + weight * standardise(first_stage.double(), valid)
    if calibration is not None:
        scores = calibrate(scores, calibration)
    return scores if valid is None else scores.masked_fill(~valid, 0.0)


@dataclass(frozen=True)
class ScoringRecipe:
    """How one query is scored: its heads (``None``: every head), and, from a fitted router, the
    first-stage weight (``None``: no fusion), the calibration (``None``: raw scores) and the LoRA
    (``None``: the base model reads everything)."""

    heads: tuple[Head, ...] | None
    fusion_weight: float | None = None
    calibration: CalibrationConfig | None = None
    lora: Lora | None = None

    @property
    def head_list(self) -> list[Head] | None:
        return None if self.heads is None else list(self.heads)

    def attention(self, scores: HeadScores) -> torch.Tensor:
        """``[passage]``: the debiased scores summed over the recipe's heads (ICR's outlier-masked
        aggregate where the scorer computed one)."""
        from .engine.scorer import AttentionScorer

        return AttentionScorer.aggregate(scores, self.head_list)

    def final_scores(
        self, attention: torch.Tensor, first_stage: torch.Tensor | Sequence[float] | None = None, *,
        fuse: bool = True, scale: bool = True,
    ) -> torch.Tensor:
        """:func:`final_scores` with this recipe's weight and calibration; ``fuse``/``scale`` ``False`` leave
        fusion or calibration out (a user's ``fuse_first_stage`` / ``scale_score``)."""
        if first_stage is not None and not isinstance(first_stage, torch.Tensor):
            first_stage = torch.tensor(list(first_stage), dtype=torch.float64)
        return final_scores(
            attention, first_stage if fuse else None, self.fusion_weight if fuse else None,
            self.calibration if scale else None,
        )
