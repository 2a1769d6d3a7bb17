"""The user-facing re-ranker: ``RouteHeadReranker(...).rank(query, documents) -> RankedResults``."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .documents import (
    EMPTY_PASSAGE_SCORE,
    check_first_stage_scores,
    check_query,
    check_score_threshold,
    check_top_k,
    normalise_documents,
)
from .engine.prompt import PromptConfig
from .engine.scorer import AttentionScorer, ScoringConfig
from .fusion import calibrate, first_stage_signal, fuse
from .heads import Head
from .strategy import AutoHeads, HeadStrategy, RoutedHeads, StaticHeads, check_against_model, parse_strategy

logger = logging.getLogger(__name__)

__all__ = ["EMPTY_PASSAGE_SCORE", "RankedDocument", "RankedResults", "RouteHeadReranker"]


@dataclass(frozen=True)
class RankedDocument:
    """One re-ranked document. ``index`` is its position in the caller's list."""

    id: Any
    text: str
    score: float
    rank: int  # 1-based
    index: int


class RankedResults(Sequence[RankedDocument]):
    """Documents best first; iterable, indexable, with ``top_k()`` and score look-up by id."""

    def __init__(self, query: str, results: list[RankedDocument]):
        self.query = query
        self._results = results
        self._by_id = {r.id: r for r in results}

    def __getitem__(self, item):  # type: ignore[override]
        return self._results[item]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[RankedDocument]:
        return iter(self._results)

    def __repr__(self) -> str:
        lines = [f"RankedResults(query={self.query!r}, {len(self)} documents)"]
        lines += [f"  {r.rank:>3}. [{r.id}] {r.score:+.4f}  {r.text[:70]!r}" for r in self._results[:10]]
        return "\n".join(lines)

    def top_k(self, k: int) -> list[RankedDocument]:
        return self._results[:k]

    def get_score_by_docid(self, doc_id: Any) -> float:
        if doc_id not in self._by_id:
            raise KeyError(f"no document with id {doc_id!r} in these results")
        return self._by_id[doc_id].score

    def ids(self) -> list[Any]:
        return [r.id for r in self._results]


@dataclass
class _Request:
    """One query's checked inputs and route, between :meth:`RouteHeadReranker._prepare` and ``_finish``."""

    query: str
    candidates: list
    live: list
    first_stage: list[float] | None
    route: Any
    top_k: int | None
    score_threshold: float | None


class RouteHeadReranker:
    """Re-rank passages for a query with a causal LM's attention.

    Args:
        model: ``"smollm2-135m"`` (embedded default), a Hugging Face id or folder, a loaded
            model object shared with your generator (then pass ``tokenizer`` too), or a
            zero-argument callable returning ``(model, tokenizer)``, called once at warm-up
            (to share a generator's model that loads lazily).
        heads: ``"auto"`` (default: route with the router shipped for this backbone, found by
            its fingerprint, else every head), ``"all"`` (ICR: every head), a list of heads
            (``["L12.H5", ...]`` or ``Head``), the path of a heads file (JSON list or one
            ``L12.H5`` per line), or a router directory written by ``routehead-rag fit``
            (routed heads per query; its prompt is used unless you pass ``prompt``, and its
            backbone fingerprint must match). See :mod:`routehead_rag.strategy`.
        tokenizer: required with a model object.
        prompt: prompt layout (:class:`PromptConfig`); default: a router's own, else ICR's.
        instruction: a named wording after the passages, ``"relevance"`` (search queries) or
            ``"question"`` (questions the passages answer); replaces the prompt's (or the
            router's) wording. ``None``: keep it.
        max_prompt_tokens: token budget of one prompt; longer candidate lists go in windows.
        calibrate: subtract the content-free ("N/A") attention (ICR); on by default.
        mask_outliers: ICR token-outlier masking of the aggregated score.
        dtype: for models we load: ``"auto"`` (default: bfloat16 on CUDA and on CPUs with native
            bfloat16, float32 otherwise), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch.dtype.
        device: for models we load (``None``: CUDA when available, else CPU).
        use_adapters: with a ``peft.PeftModel``, score with adapters on (default) or off.
        fuse_first_stage: with a router fitted with first-stage fusion, combine the attention score
            with the first stage (the ``first_stage_scores`` given to :meth:`rank`, else the input
            order); ``False`` for callers whose order means nothing. No effect otherwise.
        scale_score: with a router fitted with a calibration, return probabilities of relevance
            (so ``score_threshold`` means the same for every query); ``False``: the raw scores.
            No effect otherwise (every head, static heads: raw attention scores).
        query_adapter: with a router fitted with ``--adapter``, switch its query-side LoRA adapter on
            for the query part of each prompt (default); ``False`` scores with the base model only.
            The adapter never changes the passages' pass, nor a shared generator's outputs.

    Every argument is checked here, before any model work (fixed heads and a router's shape
    against the model's config too, when that is readable without loading the model); the
    model is loaded lazily on the first :meth:`rank` (or :meth:`warm_up`).
    """

    def __init__(
        self,
        model: Any = "smollm2-135m",
        heads: str | Path | Sequence[Head | str | tuple[int, int]] | HeadStrategy = "auto",
        *,
        tokenizer: Any = None,
        prompt: PromptConfig | None = None,
        instruction: str | None = None,
        max_prompt_tokens: int = 4096,
        calibrate: bool = True,
        mask_outliers: bool = False,
        dtype: Any = "auto",
        device: Any = None,
        use_adapters: bool = True,
        fuse_first_stage: bool = True,
        scale_score: bool = True,
        query_adapter: bool = True,
    ):
        from .model.devices import parse_device, parse_dtype

        if not isinstance(model, (str, os.PathLike, torch.nn.Module)) and not callable(model):
            raise TypeError(
                f"model must be a model name or folder, a loaded transformers model (with tokenizer=...), or a "
                f"callable returning (model, tokenizer), got {type(model).__name__}"
            )
        if isinstance(model, torch.nn.Module) and tokenizer is None:
            raise TypeError(
                f"model is a loaded {type(model).__name__} but tokenizer is None: pass the tokenizer it was trained "
                "with (tokenizer=...)"
            )
        for name, flag in (("use_adapters", use_adapters), ("fuse_first_stage", fuse_first_stage),
                           ("scale_score", scale_score), ("query_adapter", query_adapter)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 64:
            raise ValueError(
                f"max_prompt_tokens must be an integer of at least 64, got {max_prompt_tokens!r} (the prompt's own "
                "text needs some of the budget)"
            )
        if prompt is not None and not isinstance(prompt, PromptConfig):
            raise TypeError(f"prompt must be a PromptConfig or None, got {type(prompt).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = parse_dtype(dtype)
        self.device = parse_device(device)
        self.use_adapters = use_adapters
        self.fuse_first_stage = fuse_first_stage
        self.scale_score = scale_score
        self.query_adapter = query_adapter
        self.strategy: HeadStrategy = parse_strategy(heads)
        base_prompt = prompt or self.strategy.prompt or PromptConfig()
        self.config = ScoringConfig(
            prompt=base_prompt if instruction is None else base_prompt.with_instruction(instruction),
            max_prompt_tokens=max_prompt_tokens,
            calibrate=calibrate,
            mask_outliers=mask_outliers,
        )
        self._prompt_given = prompt is not None
        self._instruction = instruction
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
            if callable(model) and not isinstance(model, torch.nn.Module):
                model, tokenizer = model()  # a lazily loading generator's model, shared
            backbone = load_backbone(
                model,
                tokenizer=tokenizer,
                dtype=self.dtype,
                device=self.device,
                use_adapters=self.use_adapters,
            )
            resolved = self.strategy.resolve(backbone)
            if not self.query_adapter and isinstance(resolved, RoutedHeads):
                resolved = resolved.without_adapter()
            config = self.config
            if isinstance(self.strategy, AutoHeads) and resolved.prompt is not None and not self._prompt_given:
                # "auto" found a shipped router: score in the prompt it was fitted with
                prompt = resolved.prompt if self._instruction is None else resolved.prompt.with_instruction(self._instruction)
                config = config.model_copy(update={"prompt": prompt})
            self._resolved = resolved
            self._scorer = AttentionScorer(backbone, config)

    def check_model(self) -> None:
        """Check the head choice against the model's layers x heads, read from its config without loading
        weights (the embedded GGUF is converted first if its conversion is not cached); loads nothing else.

        Raises ``ValueError`` naming the head (or the router's shape) that does not fit.
        """
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
    def rank(
        self,
        query: str,
        documents: Iterable[Any],
        top_k: int | None = None,
        score_threshold: float | None = None,
        first_stage_scores: Sequence[float | None] | None = None,
    ) -> RankedResults:
        """Re-rank ``documents`` (first-stage order, best first) for ``query``, best first.

        ``documents`` are strings (their id is their list index) or ``(id, text)`` pairs, ids unique
        (:mod:`routehead_rag.documents`). Empty or whitespace-only passages are kept and ranked last
        with score :data:`EMPTY_PASSAGE_SCORE` (finite, so results serialise as JSON), in input order.
        Text no tokenizer can encode (lone surrogates) is scored from a cleaned copy; the results
        carry the caller's text. ``top_k`` keeps the best K, ``score_threshold`` only those scoring
        at least that. ``first_stage_scores`` (one per document, e.g. the retriever's) feed
        first-stage fusion when the router has it; missing, or with a ``None`` among them, the
        input order does. Nothing passed in is modified.
        """
        request = self._prepare(query, documents, top_k, score_threshold, first_stage_scores)
        attention = None
        if request.live:
            attention = self.scorer.passage_scores(query, [c.text for c in request.live], request.route.heads,
                                                   request.route.adapter)
        return self._finish(request, attention)

    def rank_batch(
        self,
        queries: Sequence[str],
        documents_lists: Sequence[Iterable[Any]],
        top_k: int | None = None,
        score_threshold: float | None = None,
        first_stage_scores: Sequence[Sequence[float | None] | None] | None = None,
        batch_size: int | None = None,
    ) -> list[RankedResults]:
        """:meth:`rank` for many queries at once: ``batch_size`` prompts per forward pass
        (:mod:`routehead_rag.engine.batched`); the same results as one at a time, to float rounding.

        ``batch_size=None`` picks 1 on a CPU, where padded batches measured slower than one prompt at
        a time (``benchmarks/results/throughput.md``), and 8 on an accelerator."""
        from .engine.batched import head_scores_batch

        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError("queries must be a list of strings (use rank() for one query)")
        if isinstance(documents_lists, (str, bytes)) or not isinstance(documents_lists, Sequence):
            raise TypeError(f"documents_lists must be a list holding one list of documents per query, got {type(documents_lists).__name__}")
        if len(documents_lists) != len(queries):
            raise ValueError(
                f"documents_lists must hold one list of documents per query: got {len(documents_lists)} lists for {len(queries)} queries"
            )
        stages = first_stage_scores if first_stage_scores is not None else [None] * len(queries)
        if len(stages) != len(queries):
            raise ValueError(
                f"first_stage_scores must hold one list (or None) per query: got {len(stages)} for {len(queries)} queries"
            )
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None (automatic), got {batch_size!r}")
        requests = [self._prepare(q, d, top_k, score_threshold, f) for q, d, f in zip(queries, documents_lists, stages)]
        pending = [r for r in requests if r.live]
        if batch_size is None:
            batch_size = 1 if self.scorer.backbone.device.type == "cpu" else 8
        scored = head_scores_batch(
            self.scorer, [(r.query, [c.text for c in r.live], r.route.heads) for r in pending], batch_size=batch_size,
            adapter=pending[0].route.adapter,  # one strategy, one adapter for the whole batch
        ) if pending else []
        attention = {id(r): self.scorer.aggregate(s, r.route.heads) for r, s in zip(pending, scored)}
        return [self._finish(r, attention.get(id(r))) for r in requests]

    def _prepare(self, query, documents, top_k, score_threshold, first_stage_scores) -> _Request:
        """Every check, then the query's route (its heads; the routing pass if any): before the scoring pass."""
        check_query(query)
        check_top_k(top_k)
        check_score_threshold(score_threshold)
        candidates = normalise_documents(documents)
        first_stage = check_first_stage_scores(first_stage_scores, len(candidates))
        live = [c for c in candidates if not c.blank]
        route = None
        if live:
            scorer = self.scorer
            scorer.check_query(query)  # the token budget, before any model work (the routing pass included)
            route = self.resolved_strategy.route(scorer.backbone, query)
        return _Request(query, candidates, live, first_stage, route, top_k, score_threshold)

    def _finish(self, request: _Request, attention) -> RankedResults:
        """Fusion and calibration where the route has them, then the order, the threshold and the cut."""
        scores = {c.index: EMPTY_PASSAGE_SCORE for c in request.candidates}
        if request.live:
            final, route, live = attention, request.route, request.live
            if self.fuse_first_stage and route.fusion_weight is not None:
                given = None if request.first_stage is None else [request.first_stage[c.index] for c in live]
                signal = first_stage_signal(len(live), given if given is not None else [-float(c.index) for c in live])
                final = fuse(final, signal, route.fusion_weight)
            if self.scale_score and route.calibration is not None:
                final = calibrate(final, route.calibration)
            for candidate, score in zip(live, final.tolist()):
                scores[candidate.index] = float(score) if math.isfinite(score) else EMPTY_PASSAGE_SCORE
        # Stable: ties keep first-stage order; blank (or unscorable) passages last.
        order = sorted(request.candidates, key=lambda c: (scores[c.index] == EMPTY_PASSAGE_SCORE, -scores[c.index]))
        if request.score_threshold is not None:
            order = [c for c in order if scores[c.index] >= request.score_threshold]
        if request.top_k is not None:
            order = order[: request.top_k]
        results = [
            RankedDocument(id=c.id, text=c.text, score=scores[c.index], rank=rank, index=c.index)
            for rank, c in enumerate(order, start=1)
        ]
        return RankedResults(request.query, results)
