"""Per-head passage scores ``[layer, head, passage]`` and their aggregation: the one scoring path.

One prompt is scored like this (ICR, with a shared prefix):

1. the prefix (header and passages) runs once through the layers up to the deepest needed
   one, filling a KV cache;
2. the real query part and the content-free one ("N/A") run side by side on top of that cache
   (the cache repeated for them), and the attention rows of their tokens are captured for the
   needed heads, averaged over the query-part tokens;
3. a head's score for a passage is the attention mass those rows put on the passage's tokens;
   the *debiased* score is real minus content-free (ICR's subtraction of the position bias).

Several prompts (queries, or windows of one long candidate list) go through the same code as a
padded batch: their prefixes left-padded so that every prefix ends at the same position (a 2-D
attention mask keeps the pads out; position ids count real tokens only, so each prompt's
positions are what it would have alone), their query parts right-padded, the mean over query-part
rows taken over real rows only. One prompt is a batch of one. Each prompt's captured rows are read
at its own key offset and summed over its own passage spans.

Which heads are summed (all, a static list, or the heads a router picks per query) is decided by
:mod:`routehead_rag.strategy`; this module computes what it is asked for. Long candidate lists are
scored in windows (:func:`plan_windows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..heads import Head
from .capture import CaptureRequest, capture_scope, run_capture
from .lora import Lora, lora_switch
from .prompt import PromptBuilder, PromptConfig, PromptLayout


class ScoringConfig(BaseModel):
    """How passages are scored from attention."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    prompt: PromptConfig = Field(default_factory=PromptConfig)
    max_prompt_tokens: int = Field(
        4096, ge=64, description="token budget of one prompt; longer candidate lists are split into windows"
    )
    subtract_content_free: bool = Field(
        True, description="subtract the attention under the content-free query (ICR's position-bias correction)"
    )
    mask_outliers: bool = Field(
        False,
        description="ICR token-outlier masking: drop passage tokens whose debiased score is below "
        "mean - 2 std within the passage (applies to the aggregated score)",
    )

    def with_instruction(self, instruction: str) -> ScoringConfig:
        """A copy whose prompt is in a named instruction's wording (:meth:`PromptConfig.with_instruction`)."""
        return self.model_copy(update={"prompt": self.prompt.with_instruction(instruction)})


@dataclass
class HeadScores:
    """Per-head passage scores of one query.

    ``real`` and ``content_free`` are ``[layer, head, passage]`` attention masses (mean over
    query-part tokens, summed over each passage's tokens); heads that were not computed hold NaN.
    Passages are in the caller's order.
    """

    real: torch.Tensor  # [layer, head, passage]
    content_free: torch.Tensor | None  # [layer, head, passage], None without the subtraction
    aggregated: torch.Tensor | None = None  # [passage], set when outlier masking produced it
    cut: dict[int, int] = field(default_factory=dict)  # passage index -> its whole length in tokens, where cut
    # with token_weights=True: per passage [passage tokens], the debiased weight of each of the passage's own tokens
    # (its "[i] " label left out) summed over the prompt's heads; they add up to the head sum, less the label's share
    tokens: list[torch.Tensor | None] | None = None

    @property
    def debiased(self) -> torch.Tensor:
        """``real - content_free`` (``real`` when the subtraction is off): ``[layer, head, passage]``."""
        return self.real if self.content_free is None else self.real - self.content_free


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
    and similar length; each window is scored on its own (with its own content-free pass)
    and the debiased scores are compared across windows directly.  ``k`` grows until
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
        debiased = real_tokens[span.start : span.end] - free_tokens[span.start : span.end]
        if debiased.numel() > 1:
            threshold = debiased.mean() - 2 * debiased.std()
            debiased = debiased * (debiased > threshold)
        scores.append(debiased.sum())
    return torch.stack(scores)


@dataclass
class _Prompt:
    """One prompt of a batch: a window of one request's passages."""

    item: int  # which request it belongs to
    window: list[int]  # the request's passage indices in this prompt
    query: str
    passage_ids: list[list[int]]
    heads: Sequence[Head] | None


def _union(prompts: Sequence[_Prompt]) -> list[Head] | None:
    if any(p.heads is None for p in prompts):
        return None
    return sorted({head for p in prompts for head in p.heads})


class AttentionScorer:
    """Scores passages for queries from a backbone's attention (one model, shared or owned)."""

    def __init__(self, backbone, config: ScoringConfig | None = None):
        self.backbone = backbone
        self.config = config or ScoringConfig()
        self.prompts = PromptBuilder(backbone.tokenizer, self.config.prompt)
        self._budget = self.config.max_prompt_tokens
        if backbone.max_positions:
            self._budget = min(self._budget, int(backbone.max_positions))

    # -- checks and planning -----------------------------------------------------------------
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

    def windows(self, query: str, passages: Sequence[str]) -> tuple[list[list[int]], list[list[int]], dict[int, int]]:
        """The passages' token ids (cut as the prompt says; one that cannot fit alone is cut to fit), the
        windows they are scored in (:func:`plan_windows`), and the whole length of each passage that was cut."""
        fixed = self.check_query(query)
        counted = [self.prompts.cut_passage_counted(text) for text in passages]
        room = max(self._budget - fixed - self.prompts.passage_cost([], len(passages) or 1), 1)
        passage_ids = [ids[:room] for ids, _ in counted]
        cut = {i: whole if whole is not None else len(ids) for i, (ids, whole) in enumerate(counted)
               if whole is not None or len(ids) > room}
        costs = [self.prompts.passage_cost(ids, len(passages)) for ids in passage_ids]
        return passage_ids, plan_windows(costs, fixed, self._budget), cut

    def empty_scores(self, count: int) -> HeadScores:
        """NaN ``[layer, head, passage]`` tensors (real, content-free) and the outlier-masked aggregate, to fill."""
        shape = (self.backbone.num_layers, self.backbone.num_heads, count)
        return HeadScores(
            real=torch.full(shape, float("nan")),
            content_free=torch.full(shape, float("nan")) if self.config.subtract_content_free else None,
            aggregated=torch.zeros(count) if self.config.mask_outliers else None,
        )

    # -- scoring -----------------------------------------------------------------------------
    def head_scores(
        self, query: str, passages: Sequence[str], heads: Sequence[Head] | None = None, lora: Lora | None = None,
        differentiable: bool = False, token_weights: bool = False,
    ) -> HeadScores:
        """Per-head scores ``[layer, head, passage]`` for ``passages`` (first-stage order, best first): a batch of one.

        Only ``heads`` are computed (``None``: all), and no layer past the deepest of them runs. ``heads``
        come checked against the backbone (:mod:`routehead_rag.strategy` checks them once). ``lora``: a
        :class:`~routehead_rag.engine.lora.Lora` switched on where its scope says (the query parts, or the
        whole prompt). ``differentiable`` (training): gradients flow to the LoRA factors. ``token_weights``: also
        every passage's per-token debiased weights (:attr:`HeadScores.tokens`).
        """
        return self.head_scores_batch([(query, passages, heads)], 1, lora, differentiable, token_weights)[0]

    def head_scores_batch(
        self,
        items: Sequence[tuple[str, Sequence[str], Sequence[Head] | None]],
        batch_size: int = 8,
        lora: Lora | None = None,
        differentiable: bool = False,
        token_weights: bool = False,
    ) -> list[HeadScores]:
        """:meth:`head_scores` for each ``(query, passages, heads)``, ``batch_size`` prompts a forward pass
        (a ``lora`` for every item, as there). The same scores as one at a time, to float rounding.

        ``token_weights``: also fill :attr:`HeadScores.tokens` (every passage's per-token debiased weights, a slice
        of a sum the pass computes anyway: no extra model work)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        prompts: list[_Prompt] = []
        results: list[HeadScores] = []
        for index, (query, passages, heads) in enumerate(items):
            passage_ids, windows, cut = self.windows(query, passages)
            results.append(self.empty_scores(len(passages)))
            results[-1].cut = cut
            if token_weights:
                results[-1].tokens = [None] * len(passages)  # filled by _fill
            prompts += [_Prompt(index, window, query, [passage_ids[i] for i in window], heads) for window in windows]
        if batch_size > 1:
            prompts.sort(key=lambda p: sum(len(ids) for ids in p.passage_ids))  # similar lengths: less padding
        for start in range(0, len(prompts), batch_size):
            self._score_prompts(prompts[start : start + batch_size], results, lora, differentiable)
        return results

    def passage_scores(self, query: str, passages: Sequence[str], heads: Sequence[Head] | None = None,
                       lora: Lora | None = None) -> torch.Tensor:
        """One score per passage ``[passage]``: the debiased scores summed over ``heads``."""
        return self.aggregate(self.head_scores(query, passages, heads, lora), heads)

    @staticmethod
    def aggregate(scores: HeadScores, heads: Sequence[Head] | None) -> torch.Tensor:
        """``[passage]`` of per-head scores: the outlier-masked aggregate where computed, else the head sum."""
        if scores.aggregated is not None:
            return scores.aggregated
        return aggregate(scores.debiased, heads)

    # -- one padded batch of prompts ---------------------------------------------------------
    def _score_prompts(self, prompts: Sequence[_Prompt], results: list[HeadScores], lora: Lora | None,
                       differentiable: bool) -> None:
        from transformers import DynamicCache

        backbone, builder, config = self.backbone, self.prompts, self.config
        device, decoder = backbone.device, backbone.decoder
        plan = heads_by_layer(_union(prompts), backbone.num_layers)
        deepest = max(plan)
        layouts = [builder.layout([], passage_ids=p.passage_ids) for p in prompts]
        lengths = [layout.prefix_length for layout in layouts]
        width = max(lengths)
        pad = backbone.tokenizer.pad_token_id
        pad = pad if pad is not None else (backbone.tokenizer.eos_token_id or 0)
        prefix = torch.full((len(prompts), width), pad, dtype=torch.long)  # [prompt, prefix]
        prefix_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, layout in enumerate(layouts):  # left padding: every prefix ends at position `width`
            prefix[row, width - layout.prefix_length :] = torch.tensor(layout.prefix_ids)
            prefix_mask[row, width - layout.prefix_length :] = 1
        content_free = [config.prompt.content_free_query] if config.subtract_content_free else []
        per_prompt = 1 + len(content_free)  # each prompt's real query part, then its "N/A" one
        parts = [builder.query_part(text, lengths[row]) for row, p in enumerate(prompts) for text in [p.query, *content_free]]
        suffix_width = max(len(part.ids) for part in parts)
        suffix = torch.full((len(parts), suffix_width), pad, dtype=torch.long)  # [part, suffix]
        suffix_mask = torch.zeros((len(parts), suffix_width), dtype=torch.long)
        for row, part in enumerate(parts):  # right padding: the pads come after every real row
            suffix[row, : len(part.ids)] = torch.tensor(part.ids)
            suffix_mask[row, : len(part.ids)] = 1
        suffix_positions = torch.stack([
            torch.arange(suffix_width) + lengths[row // per_prompt] for row in range(len(parts))
        ])  # [part, suffix]: each prompt continues from its own length
        whole_prompt = lora is not None and lora.config.scope == "prompt"
        grad_mode = torch.enable_grad if differentiable else torch.inference_mode
        with capture_scope(decoder), grad_mode(), backbone.peft_adapter_scope(), lora_switch(lora, decoder) as on:
            cache = DynamicCache()
            prefix_grad = torch.enable_grad() if differentiable and whole_prompt else torch.no_grad()
            with prefix_grad, (on() if whole_prompt else contextlib.nullcontext()):  # query scope: the base prefix
                run_capture(decoder, prefix.to(device), cache, CaptureRequest(stop_after_layer=deepest),
                            attention_mask=prefix_mask.to(device),
                            position_ids=(prefix_mask.cumsum(dim=1) - 1).clamp(min=0).to(device))
            if per_prompt > 1:
                cache.batch_repeat_interleave(per_prompt)  # real and N/A read the same prefix
            request = CaptureRequest(heads_by_layer=plan, mean_rows=True, stop_after_layer=deepest,
                                     row_counts=[len(part.ids) for part in parts])
            full_mask = torch.cat([prefix_mask.repeat_interleave(per_prompt, dim=0), suffix_mask], dim=1)
            with on():
                run_capture(decoder, suffix.to(device), cache, request, attention_mask=full_mask.to(device),
                            position_ids=suffix_positions.to(device))
        self._fill(prompts, layouts, width, per_prompt, plan, request, results)

    def _fill(self, prompts, layouts, width, per_prompt, plan, request, results) -> None:
        """Each prompt's captured rows (at its own key offset) summed over its own passage spans into ``results``.

        Written in place: under gradient mode autograd records the writes, so the LoRA factors get gradients."""
        backbone, config = self.backbone, self.config
        shape = (backbone.num_layers, backbone.num_heads)
        for row, (prompt, layout) in enumerate(zip(prompts, layouts)):
            offset = width - layout.prefix_length  # this prompt's first key position
            own = heads_by_layer(prompt.heads, backbone.num_layers)
            per_query, tokens = [], []
            for text_index in range(per_prompt):
                element = row * per_prompt + text_index
                scores = torch.full((*shape, len(prompt.passage_ids)), float("nan"))  # [layer, head, passage]
                token_sums = torch.zeros(layout.prefix_length)  # [keys] summed over the prompt's heads
                for layer, captured in plan.items():
                    if layer not in own:
                        continue
                    rows = request.rows[layer][element, :, offset:width].float().cpu()  # [captured heads, keys]
                    wanted = own[layer]
                    if wanted is not None:  # this prompt's own heads among those captured
                        rows = rows[wanted if captured is None else [captured.index(h) for h in wanted]]
                    scores[layer, slice(None) if wanted is None else wanted] = _span_sums(rows, layout)
                    token_sums = token_sums + rows.sum(dim=0)
                per_query.append(scores)
                tokens.append(token_sums)
            target = results[prompt.item]
            target.real[:, :, prompt.window] = per_query[0]
            if target.content_free is not None:
                target.content_free[:, :, prompt.window] = per_query[1]
            free_tokens = tokens[1] if config.subtract_content_free else torch.zeros_like(tokens[0])
            if target.aggregated is not None:
                target.aggregated[prompt.window] = _masked_passage_scores(tokens[0], free_tokens, layout)
            if target.tokens is not None:
                debiased = (tokens[0] - free_tokens).detach()  # [keys] summed over the prompt's heads
                for local, index in enumerate(prompt.window):  # a passage's own tokens end its span
                    span, count = layout.passage_spans[local], layout.passage_token_counts[local]
                    target.tokens[index] = debiased[span.end - count : span.end].clone()  # [passage tokens]
