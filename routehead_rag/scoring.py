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

Aggregations: ``all`` sums every head (ICR), ``static`` sums a fixed head list
(QRHead-style, see :func:`rank_heads_by_ndcg`), and ``routed`` sums the heads a
router picks for the query (the list is handed in the same way).

Long candidate lists are scored in windows (see :func:`plan_windows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from .attention import CaptureRequest, capture_scope, run_capture
from .heads import Head, validate_heads
from .prompt import PromptBuilder, PromptConfig, PromptLayout


class ScoringConfig(BaseModel):
    """How passages are scored from attention."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
        """A copy with a named instruction's wording (``"relevance"`` or ``"question"``), all else kept."""
        from .prompt import INSTRUCTIONS

        if instruction not in INSTRUCTIONS:
            raise ValueError(f"instruction must be one of {sorted(INSTRUCTIONS)}, got {instruction!r}")
        prompt = self.prompt.model_copy(update={"task_instruction": INSTRUCTIONS[instruction]})
        return self.model_copy(update={"prompt": prompt})


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
    def head_scores(self, query: str, passages: Sequence[str], heads: Sequence[Head] | None = None) -> HeadScores:
        """Per-head scores ``[layer, head, passage]`` for ``passages`` (first-stage order, best first).

        Only ``heads`` are computed (``None``: all), and no layer past the deepest of them runs.
        """
        backbone = self.backbone
        if heads is not None:
            validate_heads(heads, backbone.num_layers, backbone.num_heads)
        plan = heads_by_layer(heads, backbone.num_layers)
        passage_ids = [self.prompts.cut_passage(text) for text in passages]
        fixed = self.prompts.fixed_token_count(query)
        if fixed + 8 > self._budget:
            raise ValueError(
                f"the query alone needs {fixed} prompt tokens, over the budget of {self._budget}: "
                "shorten the query or raise max_prompt_tokens"
            )
        # A passage that cannot fit alone is cut to fit (documented policy).
        room = self._budget - fixed - self.prompts.passage_cost([], len(passages) or 1)
        passage_ids = [ids[: max(room, 1)] for ids in passage_ids]
        costs = [self.prompts.passage_cost(ids, len(passages)) for ids in passage_ids]
        shape = (backbone.num_layers, backbone.num_heads, len(passages))
        real = torch.full(shape, float("nan"))
        free = torch.full(shape, float("nan")) if self.config.calibrate else None
        aggregated = torch.zeros(len(passages)) if self.config.mask_outliers else None
        for window in plan_windows(costs, fixed, self._budget):
            window_scores = self._score_window(query, [passage_ids[i] for i in window], plan, heads)
            real[:, :, window] = window_scores.real
            if free is not None:
                free[:, :, window] = window_scores.content_free
            if aggregated is not None:
                aggregated[window] = window_scores.aggregated
        return HeadScores(real=real, content_free=free, aggregated=aggregated)

    def passage_scores(self, query: str, passages: Sequence[str], heads: Sequence[Head] | None = None) -> torch.Tensor:
        """One score per passage ``[passage]``: the calibrated scores summed over ``heads``."""
        scores = self.head_scores(query, passages, heads)
        if scores.aggregated is not None:
            return scores.aggregated
        return aggregate(scores.calibrated, heads)

    # -- one prompt --------------------------------------------------------------------------
    def _score_window(self, query, passage_ids, plan, heads) -> HeadScores:
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
        with capture_scope(decoder), torch.inference_mode(), backbone.adapter_scope():
            cache = DynamicCache()
            prefix = torch.tensor([layout.prefix_ids], device=device)
            run_capture(decoder, prefix, cache, CaptureRequest(stop_after_layer=deepest))
            for text in queries:
                part = self.prompts.query_part(text, layout.prefix_length)
                request = CaptureRequest(heads_by_layer=plan, mean_rows=True, stop_after_layer=deepest)
                run_capture(decoder, torch.tensor([part.ids], device=device), cache, request)
                surplus = cache.get_seq_length() - layout.prefix_length
                if surplus > 0:
                    cache.crop(-surplus)  # back to the shared prefix
                scores = torch.full(shape, float("nan"))
                tokens = torch.zeros(layout.prefix_length)
                for layer, head_list in plan.items():
                    rows = request.rows[layer][..., : layout.prefix_length].float().cpu()  # [heads, keys]
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


def rank_heads_by_ndcg(
    per_query_scores: dict[str, torch.Tensor],
    doc_ids: dict[str, Sequence[str]],
    qrels: dict[str, dict[str, int]],
    measure: str = "nDCG@10",
) -> list[tuple[Head, float]]:
    """QRHead-style static head detection: every head's mean single-head ``measure`` over a labelled set.

    ``per_query_scores[qid]`` is ``[layer, head, passage]`` (calibrated), ``doc_ids[qid]`` names the
    passages.  Returns ``(head, mean measure)`` best first (ties: lower layer, then lower head).
    Metrics come from ir_measures, evaluated for all heads in one call.
    """
    from .metrics import per_query, ranking_to_run

    labelled = [qid for qid in per_query_scores if qrels.get(qid)]
    if not labelled:
        raise ValueError("none of the scored queries has relevance judgements to rank heads on")
    first = per_query_scores[labelled[0]]
    num_layers, num_heads = first.shape[:2]
    run: dict[str, dict[str, float]] = {}
    expanded_qrels: dict[str, dict[str, int]] = {}
    for qid in labelled:
        scores = per_query_scores[qid]
        ids = list(doc_ids[qid])
        for layer in range(num_layers):
            for head in range(num_heads):
                key = f"{qid}\x1f{layer}.{head}"
                run.update(ranking_to_run(key, ids, scores[layer, head].tolist()))
                expanded_qrels[key] = qrels[qid]
    values = per_query(run, expanded_qrels, measure)
    totals = torch.zeros(num_layers, num_heads)
    for key, value in values.items():
        layer, head = key.split("\x1f")[1].split(".")
        totals[int(layer), int(head)] += value
    means = totals / len(labelled)
    ranked = [(Head(layer, head), float(means[layer, head])) for layer in range(num_layers) for head in range(num_heads)]
    ranked.sort(key=lambda item: (-item[1], item[0].layer, item[0].head))
    return ranked


