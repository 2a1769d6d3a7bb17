"""Several prompts per forward pass: the batched path of :class:`~routehead_rag.engine.scorer.AttentionScorer`.

Every (query, window) of a batch is one prompt.  Their prefixes run as one batch, left-padded so
that every prefix ends at the same position (a 2-D attention mask keeps the pads out, and the
position ids count real tokens only, so each prompt's positions are what it would have alone).
Then all the query parts run as a second batch on that prefix cache, the real query and the
content-free "N/A" of each prompt side by side (the cache repeated for them), right-padded, with
the mean over query-part rows taken over real rows only.  Each prompt's captured rows are read at
its own key offset and summed over its own passage spans, so the result is the one-at-a-time
scorer's (to float rounding: tests compare at 1e-5 in float32).

The heads captured are the union of the batch's; each prompt keeps its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..heads import Head
from .capture import CaptureRequest, capture_scope, run_capture
from .prompt import PromptLayout
from .query_adapter import QueryAdapter, query_part_switch
from .scorer import AttentionScorer, HeadScores, _masked_passage_scores, _span_sums, heads_by_layer


@dataclass
class _Job:
    item: int  # which request it belongs to
    window: list[int]  # the request's passage indices in this prompt
    query: str
    passage_ids: list[list[int]]
    heads: Sequence[Head] | None


def head_scores_batch(
    scorer: AttentionScorer,
    items: Sequence[tuple[str, Sequence[str], Sequence[Head] | None]],
    batch_size: int = 8,
    adapter: QueryAdapter | None = None,
) -> list[HeadScores]:
    """:meth:`AttentionScorer.head_scores` for each ``(query, passages, heads)``, ``batch_size`` prompts a pass
    (``adapter``: a query-side adapter for every item's query parts, as there)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    jobs: list[_Job] = []
    results: list[HeadScores] = []
    for index, (query, passages, heads) in enumerate(items):
        passage_ids, windows = scorer.windows(query, passages)
        real, free, aggregated = scorer.empty_scores(len(passages))
        results.append(HeadScores(real=real, content_free=free, aggregated=aggregated))
        jobs += [_Job(index, window, query, [passage_ids[i] for i in window], heads) for window in windows]
    jobs.sort(key=lambda job: sum(len(ids) for ids in job.passage_ids))  # similar lengths: less padding
    for start in range(0, len(jobs), batch_size):
        _score_jobs(scorer, jobs[start : start + batch_size], results, adapter)
    return results


def _union(jobs: Sequence[_Job]) -> list[Head] | None:
    if any(job.heads is None for job in jobs):
        return None
    return sorted({head for job in jobs for head in job.heads})


def _score_jobs(scorer: AttentionScorer, jobs: Sequence[_Job], results: list[HeadScores],
                adapter: QueryAdapter | None = None) -> None:
    from transformers import DynamicCache

    backbone, prompts, config = scorer.backbone, scorer.prompts, scorer.config
    device, decoder = backbone.device, backbone.decoder
    plan = heads_by_layer(_union(jobs), backbone.num_layers)
    deepest = max(plan)
    layouts: list[PromptLayout] = [prompts.layout([], passage_ids=job.passage_ids) for job in jobs]
    lengths = [layout.prefix_length for layout in layouts]
    width = max(lengths)
    pad = backbone.tokenizer.pad_token_id
    pad = pad if pad is not None else (backbone.tokenizer.eos_token_id or 0)
    prefix = torch.full((len(jobs), width), pad, dtype=torch.long)
    prefix_mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for row, layout in enumerate(layouts):  # left padding: every prefix ends at position `width`
        prefix[row, width - layout.prefix_length :] = torch.tensor(layout.prefix_ids)
        prefix_mask[row, width - layout.prefix_length :] = 1
    content_free = [config.prompt.calibration_query] if config.calibrate else []
    per_prompt = 1 + len(content_free)  # each prompt's real query part, then its "N/A" one
    parts = [prompts.query_part(text, lengths[row]) for row, job in enumerate(jobs) for text in [job.query, *content_free]]
    suffix_width = max(len(part.ids) for part in parts)
    suffix = torch.full((len(parts), suffix_width), pad, dtype=torch.long)
    suffix_mask = torch.zeros((len(parts), suffix_width), dtype=torch.long)
    for row, part in enumerate(parts):  # right padding: the pads come after every real row
        suffix[row, : len(part.ids)] = torch.tensor(part.ids)
        suffix_mask[row, : len(part.ids)] = 1
    suffix_positions = torch.stack([
        torch.arange(suffix_width) + lengths[row // per_prompt] for row in range(len(parts))
    ])  # [parts, suffix] each prompt continues from its own length
    with capture_scope(decoder), torch.inference_mode(), backbone.adapter_scope(), \
            query_part_switch(adapter, decoder) as on:
        cache = DynamicCache()
        run_capture(decoder, prefix.to(device), cache, CaptureRequest(stop_after_layer=deepest),
                    attention_mask=prefix_mask.to(device),
                    position_ids=(prefix_mask.cumsum(dim=1) - 1).clamp(min=0).to(device))
        if per_prompt > 1:
            cache.batch_repeat_interleave(per_prompt)  # real and N/A read the same prefix
        request = CaptureRequest(heads_by_layer=plan, mean_rows=True, stop_after_layer=deepest,
                                 row_counts=[len(part.ids) for part in parts])
        full_mask = torch.cat([prefix_mask.repeat_interleave(per_prompt, dim=0), suffix_mask], dim=1)
        with on():  # the query parts only: the prefix cache above is the base model's
            run_capture(decoder, suffix.to(device), cache, request, attention_mask=full_mask.to(device),
                        position_ids=suffix_positions.to(device))
    shape = (backbone.num_layers, backbone.num_heads)
    for row, (job, layout) in enumerate(zip(jobs, layouts)):
        offset = width - layout.prefix_length  # this prompt's first key position
        own = heads_by_layer(job.heads, backbone.num_layers)
        per_query, tokens = [], []
        for text_index in range(per_prompt):
            element = row * per_prompt + text_index
            scores = torch.full((*shape, len(job.passage_ids)), float("nan"))
            token_sums = torch.zeros(layout.prefix_length)
            for layer, captured in plan.items():
                if layer not in own:
                    continue
                rows = request.rows[layer][element, :, offset:width].float().cpu()  # [captured heads, keys]
                wanted = own[layer]
                if wanted is not None:  # this prompt's own heads among those captured
                    rows = rows[wanted if captured is None else [captured.index(h) for h in wanted]]
                scores[layer, slice(None) if wanted is None else wanted] = _span_sums(rows, layout)
                token_sums += rows.sum(dim=0)
            per_query.append(scores)
            tokens.append(token_sums)
        target = results[job.item]
        target.real[:, :, job.window] = per_query[0]
        if target.content_free is not None:
            target.content_free[:, :, job.window] = per_query[1]
        if target.aggregated is not None:
            free_tokens = tokens[1] if config.calibrate else torch.zeros_like(tokens[0])
            target.aggregated[job.window] = _masked_passage_scores(tokens[0], free_tokens, layout)
