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

    fused = z(attention) + w * z(first stage) + u * attention * n + v * cosine   # w: the first-stage weight;
    p     = sigmoid(a * fused + d * log(n) + b)        # u: the level's; v: the bi-encoder's; the calibration

``w`` and ``v`` are one number for every query, or the router's prediction for this one (per-query modes).

``z(first stage)`` standardises minus the first-stage rank; ``n`` is the list's size; ``attention * n`` is the
heads' mass against an even split, which means the same in a list of one and a list of twenty; ``cosine`` is the
bi-encoder's (:mod:`routehead_rag.bi_encoder`), absolute too. A router fitted without fusion, level term or
bi-encoder ranks by the attention mass itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .bi_encoder import BiEncoderConfig
from .fusion import CalibrationConfig, calibrate, standardise
from .heads import Head

if TYPE_CHECKING:
    from .engine.lora import Lora
    from .engine.scorer import HeadScores


def final_scores(
    attention: torch.Tensor,  # [..., passage] debiased attention mass of the chosen heads
    first_stage: torch.Tensor | None = None,  # [..., passage] first-stage signal (minus the rank; standardised here)
    weight: float | torch.Tensor | None = None,  # first-stage weight: a float, or [...] one per list
    calibration: CalibrationConfig | None = None,
    valid: torch.Tensor | None = None,  # [..., passage] bool; None: every passage is real
    level_weight: float = 0.0,  # weight of the attention level (mass x list size)
    cosine: torch.Tensor | None = None,  # [..., passage] the bi-encoder's cosine of each passage with the query
    cosine_weight: float | torch.Tensor = 0.0,  # what one unit of cosine adds: a float, or [...] one per list
) -> torch.Tensor:
    """The final score of every passage ``[..., passage]`` (float64; padding, where ``valid`` is False, is 0).

    With neither a first-stage ``weight`` nor a ``level_weight`` the score is the attention mass itself (ICR,
    static heads, a router fitted without fusion); else ``z(attention) + weight * z(first stage) +
    level_weight * attention * n + cosine_weight * cosine`` with ``n`` the list's size. ``calibration`` maps it to
    probabilities."""
    scores = attention.double()
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    count = valid.sum(dim=-1).double()  # [...] passages per list
    fuses = weight is not None and first_stage is not None
    adds_cosine = cosine is not None and (isinstance(cosine_weight, torch.Tensor) or cosine_weight != 0.0)
    if fuses or level_weight or adds_cosine:
        base = standardise(scores, valid)
        if fuses:
            weight = torch.as_tensor(weight, dtype=torch.float64)
            base = base + (weight.unsqueeze(-1) if weight.dim() else weight) * standardise(first_stage.double(), valid)
        if level_weight:
            base = base + level_weight * scores * count.unsqueeze(-1)
        if adds_cosine:
            cosine_weight = torch.as_tensor(cosine_weight, dtype=torch.float64)
            base = base + (cosine_weight.unsqueeze(-1) if cosine_weight.dim() else cosine_weight) * cosine.double()
        scores = base
    if calibration is not None:
        scores = calibrate(scores, calibration, count)
    return scores.masked_fill(~valid, 0.0)


@dataclass(frozen=True)
class ScoringRecipe:
    """How one query is scored: its heads (``None``: every head), and, from a fitted router, the
    first-stage weight (``None``: no fusion), the calibration (``None``: raw scores), the LoRA
    (``None``: the base model reads everything) and the bi-encoder (``None``: attention alone) with this
    query's weight for it (``bi_encoder_weight``: the router's per-query weight; ``None``: the bi-encoder's own)."""

    heads: tuple[Head, ...] | None
    fusion_weight: float | None = None
    calibration: CalibrationConfig | None = None  # for the fused score
    lora: Lora | None = None
    level_weight: float = 0.0
    calibration_unfused: CalibrationConfig | None = None  # for the score without the first stage
    bi_encoder: BiEncoderConfig | None = None  # both calibrations were fitted with its term
    bi_encoder_weight: float | None = None

    @property
    def cosine_weight(self) -> float:
        """What one unit of the bi-encoder's cosine adds to this query's score (0: no bi-encoder)."""
        if self.bi_encoder is None:
            return 0.0
        return self.bi_encoder.weight if self.bi_encoder_weight is None else self.bi_encoder_weight

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
        fuse: bool = True, scale: bool = True, cosine: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`final_scores` with this recipe's weights and calibration; ``fuse``/``scale`` ``False`` leave
        fusion or calibration out (a user's ``fuse_first_stage`` / ``scale_score``). Each configuration has its
        own calibration, fitted on its own scores; a router without fusion has one, used either way.
        ``cosine`` ``[passage]``: the bi-encoder's, added where the recipe has one (``None``: left out, which
        only an unscaled score may be: the calibrations were fitted with it)."""
        if scale and self.bi_encoder is not None and cosine is None and self.can_scale(fuse):
            raise ValueError("this router's probabilities were fitted with its bi-encoder term: pass the cosines, "
                             "or scale=False")
        if first_stage is not None and not isinstance(first_stage, torch.Tensor):
            first_stage = torch.tensor(list(first_stage), dtype=torch.float64)
        fused = fuse and self.fusion_weight is not None
        calibration = self.calibration if fused or self.fusion_weight is None else self.calibration_unfused
        return final_scores(attention, first_stage if fused else None, self.fusion_weight if fused else None,
                            calibration if scale else None, level_weight=self.level_weight, cosine=cosine,
                            cosine_weight=self.cosine_weight)

    def can_scale(self, fuse: bool) -> bool:
        """Whether probabilities exist for this configuration (``scale_score=True`` is refused otherwise)."""
        if self.fusion_weight is None or fuse:
            return self.calibration is not None
        return self.calibration_unfused is not None
