"""Haystack ``Document`` handling shared with Haystack's own rankers: de-duplication and the text ranked.

Both rules are restated from Haystack (their helpers are private there) and tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from haystack import Document


def deduplicate(documents: Sequence[Document]) -> list[Document]:
    """One document per id: the one with the highest score (``None`` counts as ``-inf``; the first wins ties).

    The order is that in which each id is first seen. This is Haystack's rule:
    ``haystack.utils.misc._deduplicate_documents``, which ``SentenceTransformersSimilarityRanker.run``,
    ``LLMRanker.run`` and ``MetaFieldRanker.run`` call before ranking ("documents are deduplicated by
    their id, retaining only the document with the highest score if a score is present").
    """
    best: dict[str, Document] = {}
    for document in documents:
        kept = best.get(document.id)
        if kept is None or _score(document) > _score(kept):
            best[document.id] = document
    return list(best.values())


def _score(document: Document) -> float:
    return document.score if document.score is not None else -math.inf


def text_to_rank(document: Document, meta_fields_to_embed: Sequence[str], separator: str) -> str:
    """The passage text the model reads: the listed meta values, then the content, joined by ``separator``.

    As ``SentenceTransformersSimilarityRanker`` (and ``TransformersSimilarityRanker``) build it: a meta
    field is used when it is present and truthy, as ``str(value)``; ``content=None`` counts as ``""``.
    """
    meta = document.meta
    meta_values = [str(meta[key]) for key in meta_fields_to_embed if meta.get(key)]
    return separator.join([*meta_values, document.content or ""])
