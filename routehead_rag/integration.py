"""What the framework integrations (Haystack, LlamaIndex) need from the core, in one small public module.

An integration is a thin shell: it stores its framework's own settings, hands the re-ranker's options
(:class:`RerankerOptions`, the same names everywhere) to :class:`RouteHeadReranker`, and turns its
documents into ``(text, retrieval score)`` pairs; with ``explain=True`` it stores each document's
explanation (plain data, spans in the document's own content: :func:`in_content`) under :data:`META_KEY`. Everything it imports from the core comes from here.
"""

from __future__ import annotations

from .documents import EMPTY_PASSAGE_SCORE, check_query, check_score_threshold, check_top_k, retrieval_scores
from .explain import META_KEY, in_content
from .model import SHARED_MODEL_NAME
from .model.gguf_cache import EMBEDDED_DEFAULT
from .options import RerankerOptions
from .reranker import RouteHeadReranker

__all__ = [
    "EMBEDDED_DEFAULT", "EMPTY_PASSAGE_SCORE", "META_KEY", "SHARED_MODEL_NAME", "RerankerOptions", "RouteHeadReranker",
    "check_explain", "check_query", "check_score_threshold", "check_top_k", "in_content", "retrieval_scores",
]


def check_explain(explain: object) -> bool:
    """An integration's ``explain`` setting: ``True`` or ``False`` (a ``ValueError`` naming the value otherwise)."""
    if not isinstance(explain, bool):
        raise ValueError(f"explain must be True or False, got {explain!r}")
    return explain
