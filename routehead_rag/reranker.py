"""The user-facing re-ranker: ``RouteHeadReranker(...).rank(query, documents) -> RankedResults``."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .heads import Head, as_heads, load_heads_file, validate_heads
from .prompt import PromptConfig
from .scoring import AttentionScorer, ScoringConfig

logger = logging.getLogger(__name__)

EMPTY_PASSAGE_SCORE = float("-inf")
"""Score given to empty or whitespace-only passages: they are kept, ranked last, in input order."""


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


def _normalise_documents(documents: Iterable[Any]) -> list[tuple[Any, str]]:
    """``(id, text)`` pairs from strings (id = list index) or ``(id, text)`` pairs; inputs untouched."""
    if isinstance(documents, (str, bytes)):
        raise TypeError("documents must be a list of strings or (id, text) pairs, not a single string")
    pairs: list[tuple[Any, str]] = []
    seen: dict[Any, int] = {}
    for index, document in enumerate(documents):
        if isinstance(document, str):
            doc_id, text = index, document
        elif isinstance(document, tuple) and len(document) == 2:
            doc_id, text = document
            if not isinstance(text, str):
                raise TypeError(f"document {index} has text of type {type(text).__name__}; expected str")
            try:
                hash(doc_id)
            except TypeError:
                raise TypeError(f"document {index} has an unhashable id {doc_id!r}") from None
            if doc_id in seen:
                raise ValueError(
                    f"duplicate document id {doc_id!r} at positions {seen[doc_id]} and {index}: ids must be unique"
                )
            seen[doc_id] = index
        else:
            raise TypeError(
                f"document {index} is of type {type(document).__name__}; expected a string or an (id, text) tuple"
            )
        pairs.append((doc_id, text))
    return pairs


class RouteHeadReranker:
    """Re-rank passages for a query with a causal LM's attention.

    Args:
        model: ``"smollm2-135m"`` (embedded default), a Hugging Face id or folder, or a loaded
            model object shared with your generator (then pass ``tokenizer`` too).
        heads: ``"auto"`` (default: route with the router shipped for this backbone, found by
            its fingerprint, else every head), ``"all"`` (ICR: every head), a list of heads
            (``["L12.H5", ...]`` or ``Head``), the path of a heads file (JSON list or one
            ``L12.H5`` per line), or a router directory written by ``routehead-rag fit``
            (routed heads per query; its prompt is used unless you pass ``prompt``, and its
            backbone fingerprint must match).
        tokenizer: required with a model object.
        prompt: prompt layout (:class:`PromptConfig`).
        max_prompt_tokens: token budget of one prompt; longer candidate lists go in windows.
        calibrate: subtract the content-free ("N/A") attention (ICR); on by default.
        mask_outliers: ICR token-outlier masking of the aggregated score.
        dtype, device: for models we load (``None``: float32, CUDA when available else CPU).
        use_adapters: with a ``peft.PeftModel``, score with adapters on (default) or off.

    The model is loaded lazily on the first :meth:`rank` (or :meth:`warm_up`).
    """

    def __init__(
        self,
        model: Any = "smollm2-135m",
        heads: str | Path | Sequence[Head | str | tuple[int, int]] = "auto",
        *,
        tokenizer: Any = None,
        prompt: PromptConfig | None = None,
        max_prompt_tokens: int = 4096,
        calibrate: bool = True,
        mask_outliers: bool = False,
        dtype: Any = None,
        device: Any = None,
        use_adapters: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.device = device
        self.use_adapters = use_adapters
        self.router_dir: Path | None = None
        self.router_config = None
        self.auto_heads = isinstance(heads, str) and heads == "auto"  # resolved when the backbone loads
        self.heads: list[Head] | None = None
        if isinstance(heads, (str, Path)) and not self.auto_heads and Path(heads).is_dir():
            from .artifact import read_artifact_config

            self.router_dir = Path(heads)
            self.router_config = read_artifact_config(self.router_dir)  # validated now; weights load lazily
        elif not self.auto_heads:
            self.heads = self._resolve_heads(heads)
        self._prompt = prompt
        self.config = self._scoring_config(max_prompt_tokens, calibrate, mask_outliers)
        self._router = None
        self._scorer: AttentionScorer | None = None
        self._lock = threading.Lock()

    def _scoring_config(self, max_prompt_tokens: int, calibrate: bool, mask_outliers: bool) -> ScoringConfig:
        """The caller's settings; with a router and no ``prompt``, the prompt the router was fitted with."""
        prompt = self._prompt
        if prompt is None:
            prompt = self.router_config.scoring.prompt if self.router_config is not None else PromptConfig()
        return ScoringConfig(
            prompt=prompt, max_prompt_tokens=max_prompt_tokens, calibrate=calibrate, mask_outliers=mask_outliers
        )

    @staticmethod
    def _resolve_heads(heads) -> list[Head] | None:
        if isinstance(heads, str) and heads == "all":
            return None
        if isinstance(heads, (str, Path)):
            path = Path(heads)
            if not path.exists():
                raise ValueError(
                    f"heads={str(heads)!r} is neither 'all' nor an existing heads file; pass 'all', "
                    "a list like ['L12.H5', 'L3.H1'], or the path of a heads file"
                )
            return load_heads_file(path)
        resolved = as_heads(heads)
        if not resolved:
            raise ValueError("heads is an empty list: pass 'all' or at least one head like 'L12.H5'")
        return resolved

    # -- lifecycle ---------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the backbone (once; thread-safe)."""
        if self._scorer is not None:
            return
        with self._lock:
            if self._scorer is not None:
                return
            from .backbone import load_backbone

            backbone = load_backbone(
                self.model,
                tokenizer=self.tokenizer,
                dtype=self.dtype,
                device=self.device,
                use_adapters=self.use_adapters,
            )
            if self.heads is not None:
                validate_heads(self.heads, backbone.num_layers, backbone.num_heads)
            if self.auto_heads:
                self._use_shipped_router(backbone)
            if self.router_dir is not None:
                from .artifact import load_artifact

                self._router, _ = load_artifact(self.router_dir, backbone.fingerprint())
            self._scorer = AttentionScorer(backbone, self.config)

    def _use_shipped_router(self, backbone) -> None:
        """``heads="auto"``: the router shipped for this backbone (by fingerprint), else every head."""
        from .artifact import read_artifact_config, shipped_router_for

        folder = shipped_router_for(backbone.fingerprint())
        if folder is None:
            logger.info("no router ships for %s: scoring with all heads (ICR)", backbone.name)
            return
        self.router_dir = folder
        self.router_config = read_artifact_config(folder)
        self.config = self._scoring_config(self.config.max_prompt_tokens, self.config.calibrate, self.config.mask_outliers)

    def heads_for(self, query: str) -> list[Head] | None:
        """The heads ``query`` is scored with: routed per query with a router, else the fixed choice."""
        scorer = self.scorer  # loads the backbone; with heads="auto" this decides on the shipped router
        if self.router_dir is None:
            return self.heads
        from .query_embedding import embed_query

        embedding = embed_query(scorer.backbone, query, self.router_config.query_embedding)
        return self._router.select(embedding, self.router_config.selection)

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
    def rank(self, query: str, documents: Iterable[Any], top_k: int | None = None) -> RankedResults:
        """Re-rank ``documents`` (first-stage order, best first) for ``query``, best first.

        ``documents`` are strings (their id is their list index) or ``(id, text)`` pairs.
        Empty or whitespace-only passages are kept and ranked last with score
        ``-inf`` (:data:`EMPTY_PASSAGE_SCORE`), in input order.  Nothing passed in is modified.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if not query.strip():
            raise ValueError("query is empty: pass the question or search text to rank documents for")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        pairs = _normalise_documents(documents)
        if not pairs:
            return RankedResults(query, [])
        scores = [EMPTY_PASSAGE_SCORE] * len(pairs)
        live = [i for i, (_, text) in enumerate(pairs) if text.strip()]
        if live:
            computed = self.scorer.passage_scores(query, [pairs[i][1] for i in live], self.heads_for(query))
            for i, score in zip(live, computed.tolist()):
                scores[i] = float(score) if math.isfinite(score) else EMPTY_PASSAGE_SCORE
        # Stable: ties keep first-stage order.
        order = sorted(range(len(pairs)), key=lambda i: -scores[i] if scores[i] != EMPTY_PASSAGE_SCORE else math.inf)
        if top_k is not None:
            order = order[:top_k]
        results = [
            RankedDocument(id=pairs[i][0], text=pairs[i][1], score=scores[i], rank=rank, index=i)
            for rank, i in enumerate(order, start=1)
        ]
        return RankedResults(query, results)
