"""Haystack ranker component backed by routehead-rag: ``RouteHeadRanker``."""

from .ranker import RouteHeadRanker

__all__ = ["RouteHeadRanker"]
