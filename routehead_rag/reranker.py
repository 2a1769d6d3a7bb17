"""The user-facing re-ranker: ``RouteHeadReranker(...).rank(query, documents) -> RankedResults``.

A walk of one query, each layer crossed once, downward::

    rank(query, documents)                       here: the one input check (documents.py), the route
      -> strategy.route(backbone, query)         the query's ScoringRecipe (heads, fusion weight, calibration, LoRA)
      -> scorer.head_scores(...)                 engine/scorer.py: [layer, head, passage] from the attention rows
      -> recipe.attention(...)                   recipe.py: [passage] the heads' debiased mass
      -> bi_encoder.cosines(...)                 bi_encoder.py: [passage] where the router adds a bi-encoder
      -> recipe.final_scores(...)                recipe.py: fused with the first stage, calibrated: THE formula
      -> order, threshold, top_k                 here
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .documents import (
    EMPTY_PASSAGE_SCORE,
    Candidate,
    check_first_stage_scores,
    check_query,
    check_score_threshold,
    check_top_k,
    normalise_documents,
)
from .engine.scorer import AttentionScorer, HeadScores
from .explain import DEFAULT_ATTENDED, Explanation, check_attended, explain_scored
from .fusion import first_stage_signal
from .heads import Head
from .options import RerankerOptions, scoring_config
from .recipe import ScoringRecipe
from .results import RankedDocument, RankedResults
from .strategy import AutoHeads, HeadStrategy, RoutedHeads, StaticHeads, check_against_model, parse_strategy

logger = logging.getLogger(__name__)

__all__ = ["EMPTY_PASSAGE_SCORE", "RankedDocument", "RankedResults", "RouteHeadReranker"]

DEPRECATED_OPTIONS = {"calibrate": "subtract_content_free", "query_adapter": "lora", "use_adapters": "use_peft_adapters"}


@dataclass
class _Request:
    """One query's checked inputs, route and passages to score, between ``_prepare`` and ``_finish``."""

    query: str
    candidates: list[Candidate]
    first_stage: list[float] | None  # one per candidate, or None (the input order is the signal)
    recipe: ScoringRecipe | None  # None when no candidate has text
    texts: list[str]  # what is scored: one text per live candidate, or per chunk in chunk mode
    owner: list[int]  # for each text, the index of its candidate
    spans: list[tuple[int, int] | None]  # for each text, its character span in the candidate (chunk mode)
    top_k: int | None
    score_threshold: float | None
    scale_score: bool
    head_weights: dict[Head, float] | None = None  # explain(): the router's probability of each chosen head


def _is_backbone(value: Any) -> bool:
    """Whether ``value`` is a loaded :class:`~routehead_rag.model.backbone.Backbone` (without importing transformers)."""
    module = sys.modules.get("routehead_rag.model.backbone")
    return module is not None and isinstance(value, module.Backbone)


def _options(options: RerankerOptions | None, values: dict[str, Any]) -> RerankerOptions:
    for old, new in DEPRECATED_OPTIONS.items():
        if old in values:
            warnings.warn(f"{old}= is deprecated: use {new}= (same meaning)", DeprecationWarning, stacklevel=3)
            if new in values:
                raise TypeError(f"pass {new}= only (its deprecated alias {old}= was given too)")
            values[new] = values.pop(old)
    return RerankerOptions.of(options, **values)


class RouteHeadReranker:
    """Re-rank passages for a query with a causal LM's attention.

    Args:
        model: ``"smollm2-135m"`` (embedded default), a Hugging Face id or folder, a loaded model object
            shared with your generator (then pass ``tokenizer`` too), or a zero-argument callable returning
            ``(model, tokenizer)``, called once at warm-up (to share a generator's model that loads lazily).
        heads: ``"auto"`` (default: the router shipped for this backbone, found by its fingerprint, else every
            head), ``"all"`` (ICR), a list of heads (``["L12.H5", ...]`` or ``Head``), a heads file, a router
            folder written by ``routehead-rag fit``, or a :class:`~routehead_rag.strategy.HeadStrategy`.
        tokenizer: required with a model object; with a name, an optional tokenizer id or folder.
        token: a Hugging Face token for a gated or private model, or a callable returning one (read when the
            model loads); never stored in any serialisation.
        options: a :class:`~routehead_rag.options.RerankerOptions`; keyword options override it. Every option
            (``instruction``, ``max_passage_tokens``, ``chunk_long_documents``, ``fuse_first_stage``,
            ``scale_score``, ``lora``, ``dtype``, ``device``, ``model_kwargs``, ...) is described there.

    Every argument is checked here, before any model work (fixed heads and a router's shape against the
    model's config too, when that is readable without loading the model); the model loads lazily on the
    first :meth:`rank` (or :meth:`warm_up`).
    """

    def __init__(self, model: Any = "smollm2-135m", heads: Any = "auto", *, tokenizer: Any = None,
                 token: str | bool | None = None, options: RerankerOptions | None = None, **option_values: Any):
        if _is_backbone(model):
            model = dataclasses.replace(model, owned=False)  # a loaded Backbone (eval, fit, benchmarks): shared
        elif not isinstance(model, (str, os.PathLike, torch.nn.Module)) and not callable(model):
            raise TypeError(
                f"model must be a model name or folder, a loaded transformers model (with tokenizer=...), or a "
                f"callable returning (model, tokenizer), got {type(model).__name__}"
            )
        if isinstance(model, torch.nn.Module) and tokenizer is None:
            raise TypeError(f"model is a loaded {type(model).__name__} but tokenizer is None: pass the tokenizer it "
                            "was trained with (tokenizer=...)")
        if token is not None and not isinstance(token, (str, bool)) and not callable(token):
            raise TypeError(f"token must be a string, True (the locally saved one) or a callable returning one, got "
                            f"{type(token).__name__}")
        self.strategy: HeadStrategy = parse_strategy(heads)
        if not isinstance(heads, HeadStrategy):
            option_values["heads"] = heads
        self.options = _options(options, option_values)
        self.model, self.tokenizer, self._token = model, tokenizer, token
        self.config = scoring_config(self.strategy.scoring, self.options)  # a router's own settings come here
        self._check_grid(convert=False)  # when the model's shape is readable without loading it
        self._resolved: HeadStrategy | None = None
        self._scorer: AttentionScorer | None = None
        self._lock = threading.Lock()

    @property
    def heads(self) -> list[Head] | None:
        """The fixed head list (static heads), else ``None`` (every head, or routed per query)."""
        return list(self.strategy.heads) if isinstance(self.strategy, StaticHeads) else None

    # -- lifecycle ---------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the backbone (once; thread-safe) and resolve the head choice on it."""
        if self._scorer is not None:
            return
        with self._lock:
            if self._scorer is not None:
                return
            from .model.backbone import load_backbone

            self._check_grid(convert=True)  # before any weights are read
            model, tokenizer = self.model, self.tokenizer
            options = self.options
            if _is_backbone(model):
                backbone = model
            else:
                if callable(model) and not isinstance(model, torch.nn.Module):
                    model, tokenizer = model()  # a lazily loading generator's model, shared
                backbone = load_backbone(
                    model, tokenizer=tokenizer, dtype=options.dtype, device=options.device,
                    use_peft_adapters=options.use_peft_adapters, model_kwargs=options.model_kwargs or None,
                    tokenizer_kwargs=options.tokenizer_kwargs or None,
                    token=self._token() if callable(self._token) else self._token,
                )
            resolved = self.strategy.resolve(backbone)
            if isinstance(resolved, RoutedHeads):
                resolved = resolved.ready(backbone, use_lora=options.lora)
            if (isinstance(resolved, RoutedHeads) and options.scale_score and not options.fuse_first_stage
                    and resolved.config.fusion.mode != "off" and resolved.config.calibration is not None
                    and resolved.config.calibration_unfused is None):
                raise ValueError(
                    f"the router at {resolved.folder} has probabilities for fused scores only: with "
                    "fuse_first_stage=False pass scale_score=False, or refit it (routehead-rag fit calibrates both)")
            if (isinstance(resolved, RoutedHeads) and options.scale_score and not options.bi_encoder
                    and resolved.config.bi_encoder is not None and resolved.config.calibration is not None):
                raise ValueError(
                    f"the router at {resolved.folder} has probabilities for scores with its bi-encoder "
                    f"({resolved.config.bi_encoder.model}) only: with bi_encoder=False pass scale_score=False")
            config = self.config
            if isinstance(self.strategy, AutoHeads) and resolved.scoring is not None:
                config = scoring_config(resolved.scoring, options)  # "auto" found a shipped router: its settings
            self._resolved = resolved
            self._scorer = AttentionScorer(backbone, config)

    def check_model(self) -> None:
        """Check the head choice against the model's layers x heads, read from its config without loading
        weights (the embedded GGUF is converted first if its conversion is not cached); loads nothing else."""
        self._check_grid(convert=True)

    def _check_grid(self, convert: bool) -> None:
        check_against_model(self.strategy, self.model, convert=convert)

    @property
    def resolved_strategy(self) -> HeadStrategy:
        """The head choice as resolved on the loaded backbone (``"auto"`` decided); loads the backbone."""
        self.warm_up()
        assert self._resolved is not None  # set by warm_up
        return self._resolved

    def heads_for(self, query: str) -> list[Head] | None:
        """The heads ``query`` is scored with: routed per query with a router, else the fixed choice."""
        return self.resolved_strategy.heads_for(self.scorer.backbone, query)

    @property
    def is_loaded(self) -> bool:
        """Whether the backbone has been loaded (by :meth:`warm_up` or a first :meth:`rank`)."""
        return self._scorer is not None

    @property
    def scorer(self) -> AttentionScorer:
        self.warm_up()
        assert self._scorer is not None  # set by warm_up
        return self._scorer

    # -- ranking -----------------------------------------------------------------------------
    def rank(self, query: str, documents: Iterable[Any], top_k: int | None = None,
             score_threshold: float | None = None, first_stage_scores: Sequence[float | None] | None = None,
             scale_score: bool | None = None) -> RankedResults:
        """Re-rank ``documents`` (first-stage order, best first) for ``query``, best first.

        ``documents`` are strings (their id is their list index), ``(id, text)`` pairs or dicts
        (``{"text", "id", "meta"}``), ids unique (:mod:`routehead_rag.documents`). Empty or whitespace-only
        passages are kept and ranked last with score :data:`EMPTY_PASSAGE_SCORE` (finite, so results
        serialise as JSON), in input order. ``top_k`` keeps the best K, ``score_threshold`` only those
        scoring at least that. ``first_stage_scores`` (one per document, e.g. the retriever's; any real
        numbers, NumPy's included) feed first-stage fusion when the router has it; missing, or with a
        ``None`` among them, the input order does. ``scale_score`` overrides the option for this call.
        Nothing passed in is modified.
        """
        request = self._prepare(query, documents, top_k, score_threshold, first_stage_scores, scale_score=scale_score)
        scores = None
        if request.texts:
            scores = self.scorer.head_scores(query, request.texts, request.recipe.head_list, request.recipe.lora)
        return self._finish(request, scores)

    def explain(self, query: str, documents: Iterable[Any], top_k: int | None = None,
                score_threshold: float | None = None, first_stage_scores: Sequence[float | None] | None = None,
                scale_score: bool | None = None, *, attended: int | str = DEFAULT_ATTENDED) -> Explanation:
        """:meth:`rank` (the same arguments, checks and ranking, as ``.ranking``), and why: the heads with the
        router's weight for each, every ranked document's score taken apart (per-head contributions, fusion,
        calibration) and, for the ``attended`` best documents (``"all"``: every one), the words the query attended
        to as character offsets into your text (:mod:`routehead_rag.explain`)."""
        count = check_attended(attended)
        request = self._prepare(query, documents, top_k, score_threshold, first_stage_scores, scale_score=scale_score,
                                explain=True)
        scores = None
        if request.texts:
            scores = self.scorer.head_scores(query, request.texts, request.recipe.head_list, request.recipe.lora,
                                             token_weights=True)
        return explain_scored(self, request, scores, count)

    def rank_batch(self, queries: Sequence[str], documents_lists: Sequence[Iterable[Any]], top_k: int | None = None,
                   score_threshold: float | None = None,
                   first_stage_scores: Sequence[Sequence[float | None] | None] | None = None,
                   batch_size: int | None = None, scale_score: bool | None = None) -> list[RankedResults]:
        """:meth:`rank` for many queries at once: ``batch_size`` prompts per forward pass; the same results
        as one at a time, to float rounding.

        ``batch_size=None`` picks 1 on a CPU, where padded batches measured slower than one prompt at a time
        (``benchmarks/results/throughput.md``), and 8 on an accelerator."""
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"queries must be a list of strings (use rank() for one query), got {type(queries).__name__}")
        if isinstance(documents_lists, (str, bytes)) or not isinstance(documents_lists, Sequence):
            raise TypeError("documents_lists must be a list holding one list of documents per query, got "
                            f"{type(documents_lists).__name__}")
        if len(documents_lists) != len(queries):
            raise ValueError(f"documents_lists must hold one list of documents per query: got {len(documents_lists)} "
                             f"lists for {len(queries)} queries")
        if first_stage_scores is not None and not isinstance(first_stage_scores, Sequence):
            raise TypeError(f"first_stage_scores must be a list holding one list of scores (or None) per query, got "
                            f"{type(first_stage_scores).__name__}")
        stages = first_stage_scores if first_stage_scores is not None else [None] * len(queries)
        if len(stages) != len(queries):
            raise ValueError(f"first_stage_scores must hold one list (or None) per query: got {len(stages)} for "
                             f"{len(queries)} queries")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None (automatic), got {batch_size!r}")
        requests = [self._prepare(q, d, top_k, score_threshold, f, f"first_stage_scores[{i}]", scale_score=scale_score)
                    for i, (q, d, f) in enumerate(zip(queries, documents_lists, stages))]
        pending = [r for r in requests if r.texts]
        if batch_size is None:
            batch_size = 1 if self.scorer.backbone.device.type == "cpu" else 8
        loras = {id(r.recipe.lora) for r in pending}
        if len(loras) > 1:
            raise RuntimeError("rank_batch got recipes with different LoRAs: score them with rank()")
        scored = self.scorer.head_scores_batch(
            [(r.query, r.texts, r.recipe.head_list) for r in pending], batch_size=batch_size,
            lora=pending[0].recipe.lora if pending else None,
        )
        by_request = {id(r): s for r, s in zip(pending, scored)}
        self._warn_cut([(s, r) for r, s in zip(pending, scored)])  # one warning for the whole call
        return [self._finish(r, by_request.get(id(r)), warn=False) for r in requests]

    def rank_scored(self, query: str, documents: Iterable[Any], head_scores: HeadScores, top_k: int | None = None,
                    score_threshold: float | None = None, first_stage_scores: Sequence[float | None] | None = None,
                    recipe: ScoringRecipe | None = None) -> RankedResults:
        """:meth:`rank` from per-head scores computed elsewhere (an evaluation's cached extraction of the same
        prompt: ``head_scores`` over the documents with text, in order; ``recipe`` the query's route if known).
        Everything after the scoring pass is :meth:`rank`'s own code."""
        request = self._prepare(query, documents, top_k, score_threshold, first_stage_scores, recipe=recipe)
        if request.owner != [c.index for c in request.candidates if not c.blank]:
            raise ValueError("rank_scored takes head scores of whole documents: chunk mode needs rank()")
        return self._finish(request, head_scores if request.texts else None)

    # -- the steps ---------------------------------------------------------------------------
    def _prepare(self, query, documents, top_k, score_threshold, first_stage_scores, scores_name="first_stage_scores",
                 recipe: ScoringRecipe | None = None, scale_score: bool | None = None, explain: bool = False) -> _Request:
        """Every check, then the query's route (its heads; the routing pass if any): before the scoring pass."""
        check_query(query)
        if scale_score is not None and not isinstance(scale_score, bool):
            raise TypeError(f"scale_score must be True, False or None (the option), got {scale_score!r}")
        check_top_k(top_k)
        check_score_threshold(score_threshold)
        candidates = normalise_documents(documents)
        first_stage = check_first_stage_scores(first_stage_scores, len(candidates), scores_name)
        live = [c for c in candidates if not c.blank]
        texts, owner, spans, weights = [], [], [], None
        if live:
            scorer = self.scorer
            scorer.check_query(query)  # the token budget, before any model work (the routing pass included)
            budget = scorer.config.prompt.max_passage_tokens if self.options.chunk_long_documents else None
            if self.options.chunk_long_documents and budget is None:
                raise ValueError("chunk_long_documents=True needs a passage budget in tokens: set max_passage_tokens")
            for candidate in live:
                pieces = scorer.prompts.split_passage(candidate.text, budget) if budget else [None]
                for span in pieces:
                    whole = span is None or span == (0, len(candidate.text))
                    texts.append(candidate.text if whole else candidate.text[span[0] : span[1]])
                    owner.append(candidate.index)
                    spans.append(None if whole else span)
            if recipe is None and explain:  # the same route, and the router's weight of each head
                recipe, weights = self.resolved_strategy.route_explained(scorer.backbone, query)
            elif recipe is None:
                recipe = self.resolved_strategy.route(scorer.backbone, query)
        scale = self.options.scale_score if scale_score is None else scale_score
        fuse = self.options.fuse_first_stage
        if (scale and recipe is not None and not recipe.can_scale(fuse)
                and (recipe.calibration is not None or recipe.calibration_unfused is not None)):
            raise ValueError(  # a per-call scale_score=True the option check at warm-up did not see
                f"the router has probabilities for {'unfused' if fuse else 'fused'} scores only: with "
                f"fuse_first_stage={fuse} pass scale_score=False, or refit it (routehead-rag fit calibrates both)")
        if scale and recipe is not None and recipe.bi_encoder is not None and not self.options.bi_encoder:
            raise ValueError(f"the router has probabilities for scores with its bi-encoder ({recipe.bi_encoder.model}) "
                             "only: with bi_encoder=False pass scale_score=False")
        return _Request(query, candidates, first_stage, recipe, texts, owner, spans, top_k, score_threshold, scale,
                        weights)

    def _finish(self, request: _Request, head_scores: HeadScores | None, warn: bool = True,
                final: torch.Tensor | None = None) -> RankedResults:
        """The recipe's final scores (a document in chunks scores as its best chunk; ``final``: ``_final``'s,
        already computed), then the order, the threshold and the cut."""
        scores = {c.index: EMPTY_PASSAGE_SCORE for c in request.candidates}
        best_span: dict[int, tuple[int, int] | None] = {}
        if head_scores is not None:
            if warn:
                self._warn_cut([(head_scores, request)])
            final = self._final(request, head_scores)[3] if final is None else final
            for index, span, score in zip(request.owner, request.spans, final.tolist()):
                score = float(score) if math.isfinite(score) else EMPTY_PASSAGE_SCORE
                if index not in best_span or score > scores[index]:
                    scores[index], best_span[index] = score, span
        # Stable: ties keep first-stage order; blank (or unscorable) passages last.
        order = sorted(request.candidates, key=lambda c: (scores[c.index] == EMPTY_PASSAGE_SCORE, -scores[c.index]))
        if request.score_threshold is not None:
            order = [c for c in order if scores[c.index] >= request.score_threshold]
        if request.top_k is not None:
            order = order[: request.top_k]
        results = [
            RankedDocument(id=c.id, text=c.text, score=scores[c.index], rank=rank, index=c.index, meta=c.meta,
                           chunk=best_span.get(c.index))
            for rank, c in enumerate(order, start=1)
        ]
        return RankedResults(request.query, results)

    def _final(self, request: _Request, head_scores: HeadScores
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(attention, first-stage signal, bi-encoder cosine or None, final score)``, each ``[text]``: the query's
        recipe on its scored texts (the bi-encoder reads the same texts, up to its own length limit)."""
        recipe = request.recipe
        owners = list(dict.fromkeys(request.owner))  # the documents scored, in order (a document's chunks: one rank)
        given = None if request.first_stage is None else [request.first_stage[i] for i in owners]
        ranked = first_stage_signal(len(owners), given if given is not None else [-float(i) for i in owners])
        position = {owner: k for k, owner in enumerate(owners)}
        signal = ranked[[position[owner] for owner in request.owner]]  # [text] each chunk its document's signal
        attention = recipe.attention(head_scores)  # [text]
        cosine = None
        if recipe.bi_encoder is not None and self.options.bi_encoder:
            from .bi_encoder import load_bi_encoder

            encoder = load_bi_encoder(recipe.bi_encoder.model, self.options.device, self.options.dtype)
            cosine = encoder.cosines(request.query, request.texts)
        return attention, signal, cosine, recipe.final_scores(attention, signal, fuse=self.options.fuse_first_stage,
                                                              scale=request.scale_score, cosine=cosine)

    def _warn_cut(self, scored: list[tuple[HeadScores, _Request]]) -> None:
        """One WARNING per call (``rank``, ``explain`` or a whole ``rank_batch``) when passages were longer than
        the passage budget (through ``logging``)."""
        lengths = [length for head_scores, _ in scored for length in head_scores.cut.values()]
        if not lengths:
            return
        prompt = self.scorer.config.prompt
        budget = (f"{prompt.max_passage_tokens} tokens" if prompt.max_passage_tokens is not None
                  else f"{prompt.max_passage_words} words")
        logger.warning(
            "%d of %d passages%s were longer than the passage budget (%s; the longest had %d tokens) and were cut to "
            "it: raise max_passage_tokens, or set chunk_long_documents=True to score every part",
            len(lengths), sum(len(request.texts) for _, request in scored),
            f" of {len(scored)} queries" if len(scored) > 1 else "", budget, max(lengths),
        )

