"""routehead-rag: re-rank passages with an LLM's own attention (ICR, static heads, routed heads).

Importing the package is cheap (no torch): the public names below are imported on first
use, and models load lazily too: constructing a re-ranker loads nothing until the first
``rank()``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "Explanation": ".explain",
    "Head": ".heads",
    "PromptConfig": ".engine.prompt",
    "RankedDocument": ".reranker",
    "RankedResults": ".reranker",
    "RouteHeadReranker": ".reranker",
    "ScoringConfig": ".engine.scorer",
    "convert_embedded": ".model.gguf_cache",
    "packaged_minilm_path": ".model.packaged",
}
__all__ = [
    "Explanation",
    "Head",
    "PromptConfig",
    "RankedDocument",
    "RankedResults",
    "RouteHeadReranker",
    "ScoringConfig",
    "__version__",
    "convert_embedded",
    "packaged_minilm_path",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load on first access
    from .engine.prompt import PromptConfig
    from .engine.scorer import ScoringConfig
    from .explain import Explanation
    from .heads import Head
    from .model.gguf_cache import convert_embedded
    from .model.packaged import packaged_minilm_path
    from .reranker import RankedDocument, RankedResults, RouteHeadReranker


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'routehead_rag' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
