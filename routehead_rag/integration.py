"""What the framework integrations (Haystack, LlamaIndex) need from the core, in one small public module.

An integration is a thin shell: it stores its framework's own settings, hands the re-ranker's options
(:class:`RerankerOptions`, the same names everywhere) to :class:`RouteHeadReranker`, and turns its
documents into ``(text, retrieval score)`` pairs. Everything it imports from the core comes from here.
"""

from __future__ import annotations

from .documents import EMPTY_PASSAGE_SCORE, check_query, check_score_threshold, check_top_k, retrieval_scores
from .model import SHARED_MODEL_NAME
from .model.gguf_cache import EMBEDDED_DEFAULT
from .options import RerankerOptions
from .reranker import RouteHeadReranker

__all__ = [
    "EMBEDDED_DEFAULT", "EMPTY_PASSAGE_SCORE", "SHARED_MODEL_NAME", "RerankerOptions", "RouteHeadReranker",
    "check_query", "check_score_threshold", "check_top_k", "retrieval_scores",
]
