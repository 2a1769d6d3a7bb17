"""Why a passage ranked where it did: :meth:`RouteHeadReranker.explain` returns an :class:`Explanation`.

The scoring pass already holds the explanation; ``explain`` keeps it instead of throwing it away::

    explanation = reranker.explain(query, documents)   # the same arguments and checks as rank()
    explanation.ranking                                # == reranker.rank(query, documents)
    explanation.heads                                  # the heads summed, with the router's weight for each
    passage = explanation.passages[0]                  # best first, one per ranked document
    passage.contributions                              # {Head: its debiased mass}: they add up to passage.attention
    passage.attention_part, passage.first_stage_part   # fusion: fused = attention_part + first_stage_part
    passage.bi_encoder_part                            #   + bi_encoder_part (the bi-encoder's v * cosine)
    passage.probability                                # calibration: the probability the fused score maps to
    passage.top_spans(5)                               # the words attended most: offsets into the caller's text
    explanation.to_html()                              # a page (rendered in Jupyter): passages, words, heads

A passage's score is built in three steps (:mod:`routehead_rag.recipe`), each shown apart:

1. **attention** (before fusion and calibration): the heads' debiased attention mass on the passage, the sum of
   one ``contribution`` per chosen head (``head_scores.debiased[layer, head, passage]``; with ICR's outlier
   masking on, the masking's own share is ``outlier_masking``). The same mass, per token, lies on the
   passage's words (``spans``: after the content-free subtraction, summed over the chosen heads), and a little
   on its ``[i]`` label (``label_weight``).
2. **fusion**: ``fused = attention_part + first_stage_part + bi_encoder_part``: what the attention brings after
   standardising over the list, what the first stage brings (``w * z(first-stage rank)``; 0 without fusion) and
   what the router's bi-encoder brings (``v * cosine``; 0 without one).
3. **calibration**: ``probability``, the fused score mapped to a probability of relevance (``None`` without).

The cost over :meth:`~RouteHeadReranker.rank` is a slice of a sum the scoring pass makes anyway and, for the
``attended`` best passages only, one tokenisation with offsets (``benchmarks/explain_cost.py``).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine.offsets import join_spans, scored_tokens
from .heads import Head
from .results import RankedDocument, RankedResults

META_KEY = "routehead_explanation"
"""The key the framework integrations put a document's explanation under (``Document.meta``, ``node.metadata``)."""

DEFAULT_ATTENDED = 5


@dataclass(frozen=True)
class AttendedSpan:
    """A word (or character, or token) of a passage and the attention it drew."""

    start: int  # [start, end): character offsets into the caller's text of the document
    end: int
    weight: float  # debiased attention of its tokens, summed over the chosen heads (can be negative)


@dataclass(frozen=True)
class ChosenHead:
    head: Head
    router_weight: float | None  # the router's probability for the head (sigmoid of its logit); None: no router


@dataclass(frozen=True)
class PassageExplanation:
    """One ranked document: its score taken apart. ``None`` values: a blank document (nothing was scored)."""

    document: RankedDocument  # as in the ranking
    attention: float | None  # the score before fusion and calibration: the heads' debiased mass
    contributions: dict[Head, float]  # per chosen head; sum + outlier_masking == attention
    outlier_masking: float  # ICR's token-outlier masking's share of attention (0 when it is off)
    label_weight: float | None  # the share of the passage's "[i]" label in the head sum (the words hold the rest)
    attention_part: float | None  # the attention's part of the fused score (the attention itself without fusion)
    first_stage_part: float | None  # w * z(first-stage rank): the first stage's part (0 without fusion)
    fused: float | None  # attention_part + first_stage_part + bi_encoder_part: the score before calibration
    probability: float | None  # the calibrated probability (the final score), None without calibration
    first_stage_rank: int | None  # the document's rank in the first stage (1: its best)
    spans: tuple[AttendedSpan, ...] | None = None  # the passage's words in text order; None: not computed
    scored_end: int | None = None  # where reading stopped in the text when the passage was cut; None: read whole
    bi_encoder_part: float | None = None  # v * cosine: the router's bi-encoder's part (0 without one)

    @property
    def text(self) -> str:
        return self.document.text

    def top_spans(self, n: int = 5) -> list[AttendedSpan]:
        """The ``n`` spans that drew the most attention, strongest first (empty when spans were not computed)."""
        return sorted(self.spans or (), key=lambda s: -s.weight)[:n]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (heads as ``"L12.H5"``; each span with its text)."""
        document = self.document
        return {
            "rank": document.rank, "id": document.id, "index": document.index, "score": document.score,
            "chunk": None if document.chunk is None else list(document.chunk),
            "attention": self.attention, "contributions": {str(h): v for h, v in self.contributions.items()},
            "outlier_masking": self.outlier_masking, "label_weight": self.label_weight,
            "attention_part": self.attention_part, "first_stage_part": self.first_stage_part, "fused": self.fused,
            "probability": self.probability, "first_stage_rank": self.first_stage_rank,
            "bi_encoder_part": self.bi_encoder_part,
            "spans": None if self.spans is None else [
                {"start": s.start, "end": s.end, "weight": s.weight, "text": document.text[s.start : s.end]}
                for s in self.spans],
            "scored_end": self.scored_end,
        }


@dataclass(frozen=True)
class Explanation:
    """A ranking and why: the query's heads, and each ranked document's score taken apart (best first)."""

    query: str
    ranking: RankedResults  # exactly what rank() returns for the same call
    strategy: str  # "routed", "static" or "all"
    description: str  # the head choice in words (the router's folder, k, LoRA)
    heads: tuple[ChosenHead, ...]  # the heads summed (every head for "all"), the strongest router weight first
    fusion_weight: float | None  # the first-stage weight applied (None: no fusion)
    calibrated: bool  # whether the final scores are probabilities
    passages: tuple[PassageExplanation, ...] = field(default=())

    def __iter__(self) -> Iterator[PassageExplanation]:
        return iter(self.passages)

    def __len__(self) -> int:
        return len(self.passages)

    def passage(self, doc_id: Any) -> PassageExplanation:
        """The explanation of the ranked document with id ``doc_id``."""
        for passage in self.passages:
            if passage.document.id == doc_id:
                return passage
        raise KeyError(f"no document with id {doc_id!r} in this ranking (top_k or score_threshold may have cut it)")

    def summary(self) -> dict[str, Any]:
        """The query-level part as plain data: query, head choice, heads, fusion weight, calibration."""
        return {"query": self.query, "strategy": self.strategy, "description": self.description,
                "heads": [{"head": str(c.head), "router_weight": c.router_weight} for c in self.heads],
                "fusion_weight": self.fusion_weight, "calibrated": self.calibrated}

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready data: :meth:`summary` and one :meth:`PassageExplanation.to_dict` each."""
        return {**self.summary(), "passages": [p.to_dict() for p in self.passages]}

    def for_document(self, index: int) -> dict[str, Any]:
        """What an integration puts in one document's metadata: :meth:`summary` and that document's part, by its
        index in the caller's list."""
        for passage in self.passages:
            if passage.document.index == index:
                return {**self.summary(), **passage.to_dict()}
        raise KeyError(f"document {index} is not in this ranking")

    def to_html(self, top_spans: int = 5) -> str:
        """A self-contained HTML page: passages best first with their words highlighted by weight, the score's
        parts, and the heads as a bar chart (``top_spans`` words listed per passage)."""
        from .explain_html import render

        return render(self, top_spans)

    def _repr_html_(self) -> str:  # Jupyter
        return self.to_html()


def check_attended(attended: Any) -> int | None:
    """``attended`` as a count (``None``: every passage); ``ValueError`` naming the value otherwise."""
    if attended == "all":
        return None
    if isinstance(attended, bool) or not isinstance(attended, int) or attended < 0:
        raise ValueError(f"attended must be a number of passages >= 0 or 'all', got {attended!r}")
    return attended


def explain_scored(reranker: Any, request: Any, head_scores: Any, attended: int | None) -> Explanation:
    """The :class:`Explanation` of one prepared and scored request (``RouteHeadReranker._prepare`` and its
    scoring pass with ``token_weights=True``): the ranking is ``_finish``'s, the scores ``_final``'s."""
    parts = None if head_scores is None else reranker._final(request, head_scores)  # one bi-encoder pass, not two
    ranking = reranker._finish(request, head_scores, final=None if parts is None else parts[3])
    recipe = request.recipe
    if head_scores is None:  # no document had text: nothing was loaded or routed
        strategy = reranker.strategy
        return Explanation(request.query, ranking, strategy.name, strategy.describe(), (), None, False,
                           tuple(_blank(r) for r in ranking))
    strategy = reranker.resolved_strategy  # "auto" decided
    attention, signal, cosine, final = parts  # [text] each (cosine: or None)
    fuse = reranker.options.fuse_first_stage
    fused = recipe.final_scores(attention, signal, fuse=fuse, scale=False, cosine=cosine)  # [text] before calibration
    # a constant first stage standardises to 0 and a zero cosine adds nothing: what is left is the attention's part
    own = recipe.final_scores(attention, torch.zeros_like(signal), fuse=fuse, scale=False,
                              cosine=None if cosine is None else torch.zeros_like(cosine))  # [text]
    with_cosine = recipe.final_scores(attention, torch.zeros_like(signal), fuse=fuse, scale=False, cosine=cosine)
    calibrated = request.scale_score and not torch.equal(final, fused)  # calibration applied: it moved the scores
    fusion_weight = recipe.fusion_weight if fuse and not torch.equal(fused, attention.double()) else None
    debiased = head_scores.debiased  # [layer, head, text]
    heads = recipe.head_list or [Head(layer, head) for layer, head in itertools.product(*map(range, debiased.shape[:2]))]
    per_head = debiased[[h.layer for h in heads], [h.head for h in heads]].T.tolist()  # [text][head]
    weights = request.head_weights or {}
    chosen = tuple(sorted((ChosenHead(h, weights.get(h)) for h in heads),
                          key=lambda c: -(c.router_weight or 0.0)))
    text_of = {(owner, span): i for i, (owner, span) in enumerate(zip(request.owner, request.spans))}
    by_owner = dict(zip(request.owner, signal.tolist()))  # a document's chunks share its first-stage signal
    descending = sorted(-value for value in by_owner.values())
    first_stage_rank = {owner: 1 + bisect.bisect_left(descending, -value) for owner, value in by_owner.items()}
    builder = reranker.scorer.prompts
    passages = []
    for position, document in enumerate(ranking):
        i = text_of.get((document.index, document.chunk))
        if i is None:
            passages.append(_blank(document))
            continue
        contributions = dict(zip(heads, per_head[i]))
        head_sum = sum(contributions.values())
        masking = float(attention[i]) - head_sum if head_scores.aggregated is not None else 0.0
        tokens = head_scores.tokens[i]  # [passage tokens]
        spans = scored_end = None
        if attended is None or position < attended:
            spans, scored_end = _spans(builder, request.texts[i], tokens, document.chunk)
        probability = float(final[i]) if calibrated else None
        passages.append(PassageExplanation(
            document, float(attention[i]), contributions, masking,
            head_sum - float(tokens.sum()), float(own[i]), float(fused[i] - with_cosine[i]), float(fused[i]),
            probability, first_stage_rank[document.index], spans, scored_end, float(with_cosine[i] - own[i])))
    return Explanation(request.query, ranking, strategy.name, strategy.describe(), chosen, fusion_weight, calibrated,
                       tuple(passages))


def _blank(document: RankedDocument) -> PassageExplanation:
    return PassageExplanation(document, None, {}, 0.0, None, None, None, None, None, None)


def _spans(builder: Any, text: str, tokens: torch.Tensor,
           chunk: tuple[int, int] | None) -> tuple[tuple[AttendedSpan, ...], int | None]:
    """The attended spans of one scored text (a whole document, or its chunk at ``chunk``), in document offsets."""
    scored = scored_tokens(builder, text, len(tokens))
    shift = 0 if chunk is None else chunk[0]
    spans = tuple(AttendedSpan(start + shift, end + shift, weight)
                  for start, end, weight in join_spans(text, scored.tokens, tokens.tolist()))
    return spans, None if scored.scored_end is None else scored.scored_end + shift


def in_content(record: dict[str, Any], ranked_text: str, content: str, doc_id: Any) -> dict[str, Any]:
    """A :meth:`Explanation.for_document` record as an integration stores it: the framework's own document id, and
    the spans moved from the text ranked (embedded metadata, then the content) into ``content``. Spans in the
    embedded metadata leave ``spans``; their weight is kept as ``metadata_weight``. ``record`` is not modified."""
    start = _content_start(ranked_text, content)
    spans, outside = [], 0.0
    for span in record["spans"] or ():
        begin, end = span["start"] - (start or 0), span["end"] - (start or 0)
        if start is not None and 0 <= begin and end <= len(content) and content[begin:end] == span["text"]:
            spans.append({**span, "start": begin, "end": end})
        else:
            outside += span["weight"]
    scored_end = record["scored_end"]
    if scored_end is not None and start is not None:
        scored_end = min(max(scored_end - start, 0), len(content))
    return {**record, "id": doc_id, "spans": None if record["spans"] is None else spans, "metadata_weight": outside,
            "scored_end": scored_end}


def _content_start(ranked_text: str, content: str) -> int | None:
    """Where ``content`` lies in the text ranked: its end (Haystack joins metadata values before it), else the
    last place its stripped text occurs (LlamaIndex's templates strip the whole); ``None`` when nowhere."""
    if ranked_text.endswith(content):
        return len(ranked_text) - len(content)
    stripped = content.strip()
    found = ranked_text.rfind(stripped) if stripped else -1
    return None if found < 0 else found - (len(content) - len(content.lstrip()))
