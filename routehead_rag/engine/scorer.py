"""Per-head passage scores ``[layer, head, passage]`` and their aggregation.

One query is scored like this (ICR, with a shared prefix):

1. the prefix (header and passages) runs once through the layers up to the
   deepest needed one, filling a KV cache;
2. the real query part and the content-free one ("N/A") each run on top of
   that cache (cropped back to the prefix in between), and the attention rows of
   their tokens are captured for the needed heads, averaged over the query-part
   tokens;
3. a head's score for a passage is the attention mass those rows put on the
   passage's tokens; the calibrated score is real minus content-free.

Which heads are summed (all, a static list, or the heads a router picks per query) is
decided by :mod:`routehead_rag.strategy`; this module computes what it is asked for.

Long candidate lists are scored in windows (see :func:`plan_windows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..heads import Head
from .capture import CaptureRequest, capture_scope, run_capture
from .prompt import PromptBuilder, PromptConfig, PromptLayout
from .query_adapter import QueryAdapter, query_part_switch


class ScoringConfig(BaseModel):
    """How passages are scored from attention."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    prompt: PromptConfig = Field(default_factory=PromptConfig)
    max_prompt_tokens: int = Field(
        4096, ge=64, description="token budget of one prompt; longer candidate lists are split into windows"
    )
    calibrate: bool = Field(True, description="subtract the attention under the content-free query (ICR)")
    mask_outliers: bool = Field(
        False,
        description="ICR token-outlier masking: drop passage tokens whose calibrated score is below "
        "mean - 2 std within the passage (applies to the aggregated score)",
    )

    def with_instruction(self, instruction: str) -> "ScoringConfig":
        """A copy whose prompt is in a named instruction's wording (:meth:`PromptConfig.with_instruction`)."""
        return self.model_copy(update={"prompt": self.prompt.with_instruction(instruction)})


@dataclass
class HeadScores:
    """Per-head passage scores of one query.

    ``real`` and ``content_free`` are ``[layer, head, passage]`` attention masses (mean over
    query-part tokens, summed over each passage's tokens); heads that were not computed
    hold NaN.  Passages are in the caller's order.
    """

    real: torch.Tensor  # [layer, head, passage]
    content_free: torch.Tensor | None  # [layer, head, passage], None without calibration
    aggregated: torch.Tensor | None = None  # [passage], set when outlier masking produced it

    @property
    def calibrated(self) -> torch.Tensor:
        """``real - content_free`` (or ``real`` when calibration is off): ``[layer, head, passage]``."""
        return self.real if self.content_free is None else self.real - self.content_free

    @property
    def num_passages(self) -> int:
        return self.real.shape[-1]


def aggregate(scores: torch.Tensor, heads: Sequence[Head] | None = None) -> torch.Tensor:
    """Sum ``[layer, head, passage]`` scores over ``heads`` (``None``: every head, i.e. ICR) -> ``[passage]``."""
    if heads is None:
        return scores.sum(dim=(0, 1))
    if not heads:
        raise ValueError("cannot aggregate over an empty head list")
    layers = torch.tensor([h.layer for h in heads])
    index = torch.tensor([h.head for h in heads])
    return scores[layers, index].sum(dim=0)


def heads_by_layer(heads: Sequence[Head] | None, num_layers: int) -> dict[int, list[int] | None]:
    """``{layer: [query heads]}`` for a head list; ``None`` means every head of every layer."""
    if heads is None:
        return {layer: None for layer in range(num_layers)}
    grouped: dict[int, list[int]] = {}
    for head in heads:
        grouped.setdefault(head.layer, []).append(head.head)
    return {layer: sorted(hs) for layer, hs in sorted(grouped.items())}


def plan_windows(passage_costs: Sequence[int], fixed_cost: int, budget: int) -> list[list[int]]:
    """Split passages (first-stage order) into the fewest windows that each fit ``budget`` tokens.

    Policy: with ``k`` windows, passage ``i`` goes to window ``i % k`` (round robin by
    first-stage rank), so every window holds a similar mix of strong and weak candidates
    and similar length; each window is scored on its own (with its own calibration)
    and the calibrated scores are compared across windows directly.  ``k`` grows until
    every window fits.  A passage that cannot fit even alone is cut by the caller.
    """
    n = len(passage_costs)
    if n == 0:
        return []
    for k in range(1, n + 1):
        windows = [list(range(j, n, k)) for j in range(k)]
        if all(fixed_cost + sum(passage_costs[i] for i in w) <= budget for w in windows):
            return windows
    raise ValueError("a single passage does not fit the token budget; cut passages first")


def _span_sums(rows: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """Sum ``rows`` ``[..., keys]`` over each passage span -> ``[..., passage]`` (caller's order)."""
    cumulative = torch.nn.functional.pad(rows.cumsum(dim=-1), (1, 0))  # [..., keys + 1]
    starts = torch.tensor([s.start for s in layout.passage_spans])
    ends = torch.tensor([s.end for s in layout.passage_spans])
    return cumulative[..., ends] - cumulative[..., starts]


def _masked_passage_scores(real_tokens: torch.Tensor, free_tokens: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """ICR's token-outlier masking on aggregated token scores ``[keys]`` -> ``[passage]``."""
    scores = []
    for span in layout.passage_spans:
        calibrated = real_tokens[span.start : span.end] - free_tokens[span.start : span.end]
        if calibrated.numel() > 1:
            threshold = calibrated.mean() - 2 * calibrated.std()
            calibrated = calibrated * (calibrated > threshold)
        scores.append(calibrated.sum())
    return torch.stack(scores)


class AttentionScorer:
    """Scores passages for a query from a backbone's attention (one model, shared or owned)."""

    def __init__(self, backbone, config: ScoringConfig | None = None):
        self.backbone = backbone
        self.config = config or ScoringConfig()
        self.prompts = PromptBuilder(backbone.tokenizer, self.config.prompt)
        self._budget = self.config.max_prompt_tokens
        if backbone.max_positions:
            self._budget = min(self._budget, int(backbone.max_positions))

    # -- public ------------------------------------------------------------------------------
    def check_query(self, query: str) -> int:
        """The prompt tokens everything but the passages needs for ``query``; ``ValueError`` if over budget.

        Cheap (tokenising only): callers run it before any model work.
        """
        fixed = self.prompts.fixed_token_count(query)
        if fixed + 8 > self._budget:
            raise ValueError(
                f"the query alone needs {fixed} prompt tokens, over the budget of {self._budget}: "
                "shorten the query or raise max_prompt_tokens"
            )
        return fixed

    def head_scores(
        self,
        query: str,
        passages: Sequence[str],
        heads: Sequence[Head] | None = None,
        adapter: QueryAdapter | None = None,
        differentiable: bool = False,
    ) -> HeadScores:
        """Per-head scores ``[layer, head, passage]`` for ``passages`` (first-stage order, best first).

        Only ``heads`` are computed (``None``: all), and no layer past the deepest of them runs.
        ``heads`` come checked against the backbone (:mod:`routehead_rag.strategy` checks them once).
        ``adapter``: a :class:`~routehead_rag.engine.query_adapter.QueryAdapter` switched on for the query
        parts only (the prefix always runs on the base model). ``differentiable`` (training): the query
        parts keep gradients (to the adapter); the prefix never does.
        """
        backbone = self.backbone
        plan = heads_by_layer(heads, backbone.num_layers)
        passage_ids, windows = self.windows(query, passages)
        real, free, aggregated = self.empty_scores(len(passages))
        for window in windows:
            window_scores = self._score_window(query, [passage_ids[i] for i in window], plan, heads, adapter,
                                               differentiable)
            real[:, :, window] = window_scores.real
            if free is not None:
                free[:, :, window] = window_scores.content_free
            if aggregated is not None:
                aggregated[window] = window_scores.aggregated
        return HeadScores(real=real, content_free=free, aggregated=aggregated)

    def windows(self, query: str, passages: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """The passages' token ids (cut as the prompt says; one that cannot fit alone is cut to fit) and
        the windows they are scored in (:func:`plan_windows`)."""
        fixed = self.check_query(query)
        passage_ids = [self.prompts.cut_passage(text) for text in passages]
        room = self._budget - fixed - self.prompts.passage_cost([], len(passages) or 1)
        passage_ids = [ids[: max(room, 1)] for ids in passage_ids]
        costs = [self.prompts.passage_cost(ids, len(passages)) for ids in passage_ids]
        return passage_ids, plan_windows(costs, fixed, self._budget)

    def empty_scores(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """NaN ``[layer, head, passage]`` tensors (real, content-free) and the outlier-masked aggregate, to fill."""
        shape = (self.backbone.num_layers, self.backbone.num_heads, count)
        real = torch.full(shape, float("nan"))
        free = torch.full(shape, float("nan")) if self.config.calibrate else None
        aggregated = torch.zeros(count) if self.config.mask_outliers else None
        return real, free, aggregated

    def passage_scores(
        self, query: str, passages: Sequence[str], heads: Sequence[Head] | None = None,
        adapter: QueryAdapter | None = None,
    ) -> torch.Tensor:
        """One score per passage ``[passage]``: the calibrated scores summed over ``heads``."""
        return self.aggregate(self.head_scores(query, passages, heads, adapter), heads)

    @staticmethod
    def aggregate(scores: HeadScores, heads: Sequence[Head] | None) -> torch.Tensor:
        """``[passage]`` of per-head scores: the outlier-masked aggregate where computed, else the head sum."""
        if scores.aggregated is not None:
            return scores.aggregated
        return aggregate(scores.calibrated, heads)

    # -- one prompt --------------------------------------------------------------------------
    def _score_window(self, query, passage_ids, plan, heads, adapter=None, differentiable=False) -> HeadScores:
        backbone = self.backbone
        layout = self.prompts.layout([], passage_ids=passage_ids)
        queries = [query] + ([self.config.prompt.calibration_query] if self.config.calibrate else [])
        deepest = max(plan)
        decoder = backbone.decoder
        device = backbone.device
        from transformers import DynamicCache

        shape = (backbone.num_layers, backbone.num_heads, len(passage_ids))
        per_query: list[torch.Tensor] = []
        token_scores: list[torch.Tensor] = []
        grad_mode = torch.enable_grad if differentiable else torch.inference_mode
        with capture_scope(decoder), grad_mode(), backbone.adapter_scope(), query_part_switch(adapter, decoder) as on:
            cache = DynamicCache()
            prefix = torch.tensor([layout.prefix_ids], device=device)
            with torch.no_grad():  # the base model's prefix cache: adapter off, no gradient
                run_capture(decoder, prefix, cache, CaptureRequest(stop_after_layer=deepest))
            for text in queries:
                part = self.prompts.query_part(text, layout.prefix_length)
                request = CaptureRequest(heads_by_layer=plan, mean_rows=True, stop_after_layer=deepest)
                with on():
                    run_capture(decoder, torch.tensor([part.ids], device=device), cache, request)
                surplus = cache.get_seq_length() - layout.prefix_length
                if surplus > 0:
                    cache.crop(-surplus)  # back to the shared prefix
                scores = torch.full(shape, float("nan"))
                tokens = torch.zeros(layout.prefix_length)
                for layer, head_list in plan.items():
                    rows = request.rows[layer][0, ..., : layout.prefix_length].float().cpu()  # [heads, keys]
                    index = slice(None) if head_list is None else head_list
                    scores[layer, index] = _span_sums(rows, layout)
                    tokens += rows.sum(dim=0)
                per_query.append(scores)
                token_scores.append(tokens)
        aggregated = None
        if self.config.mask_outliers:
            free_tokens = token_scores[1] if self.config.calibrate else torch.zeros_like(token_scores[0])
            aggregated = _masked_passage_scores(token_scores[0], free_tokens, layout)
        return HeadScores(
            real=per_query[0], content_free=per_query[1] if self.config.calibrate else None, aggregated=aggregated
        )
