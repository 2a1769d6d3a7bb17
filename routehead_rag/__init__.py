"""routehead-rag: re-rank passages with an LLM's own attention (ICR, static heads, routed heads).

Models load lazily: constructing a re-ranker loads nothing until the first `rank()`.
"""

from .heads import Head
from .prompt import PromptConfig
from .reranker import RankedDocument, RankedResults, RouteHeadReranker
from .scoring import ScoringConfig

__all__ = ["Head", "PromptConfig", "RankedDocument", "RankedResults", "RouteHeadReranker", "ScoringConfig"]
__version__ = "0.1.0"
