"""What a re-ranker accepts as a query and documents: the one place they are checked and normalised.

* ``documents`` is a sequence in first-stage order (best first) of strings (their id is their
  position), ``(id, text)`` pairs or dicts ``{"text": ..., "id": ..., "meta": {...}}`` (``id`` and
  ``meta`` optional; the meta is carried to the results untouched); ids are unique across all kinds.
  A dict or a set *as* the list, ``None`` or a single string is a ``TypeError`` that says what to
  pass instead.
* Text that cannot be encoded (lone surrogates such as ``"\\ud800"``, which no tokenizer takes)
  is scored as if each invalid code point were U+FFFD (the engine cleans whatever it encodes,
  :func:`routehead_rag.engine.prompt.encodable`); the caller's strings are returned untouched.
* Nothing passed in is modified.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMPTY_PASSAGE_SCORE = -1e9
"""Score of an empty or whitespace-only passage: finite (valid JSON), below any real score, ranked last."""

def check_query(query: Any) -> str:
    """A non-blank string; else ``TypeError``/``ValueError`` saying what to pass. Shared by the adapters."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty: pass the question or search text to rank documents for")
    return query


def check_top_k(value: Any, name: str = "top_k") -> int | None:
    """``None`` or a positive int; else ``ValueError`` naming ``name`` and the value. Shared by the adapters."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer (> 0) or None, got {value!r}")
    return value


def check_score_threshold(value: Any, name: str = "score_threshold") -> float | None:
    """``None`` or a number that is not NaN; else ``ValueError`` naming the value. Shared by the adapters."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    return value


def _is_real(value: Any) -> bool:
    """A real number of any kind (``int``, ``float``, NumPy scalars, 0-d arrays...), not a bool."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    if isinstance(value, numbers.Real):
        return True
    return getattr(value, "ndim", None) == 0 and hasattr(value, "item") and isinstance(value.item(), numbers.Real) \
        and not isinstance(value.item(), bool)


def check_first_stage_scores(scores: Any, count: int, name: str = "first_stage_scores") -> list[float] | None:
    """One finite real number per document (any real type: ``float``, NumPy scalars or an array), or ``None``
    (also when any score is ``None``: then the order is used). Unordered collections are refused."""
    if scores is None:
        return None
    if isinstance(scores, (str, bytes, Mapping, Set)) or not isinstance(scores, Iterable):
        kind = "a set, which has no order" if isinstance(scores, Set) else type(scores).__name__
        raise TypeError(f"{name} must be a list (or array) of numbers, one per document in order, got {kind}")
    if getattr(scores, "ndim", 1) != 1:
        raise ValueError(f"{name} must be one-dimensional (one score per document), got shape {getattr(scores, 'shape', '?')}")
    scores = list(scores)
    if len(scores) != count:
        raise ValueError(f"{name} has {len(scores)} scores for {count} documents: give one per document")
    if any(s is None for s in scores):
        return None
    for index, score in enumerate(scores):
        if not _is_real(score) or not math.isfinite(float(score)):
            raise ValueError(f"{name}[{index}] is {score!r}: scores must be finite numbers (or None)")
    return [float(s) for s in scores]


def retrieval_scores(scores: Iterable[Any]) -> list[float] | None:
    """A framework's retrieval scores if every one is a finite real number (NumPy's included), else ``None``
    (fuse with the order).

    For the integrations: a Haystack ``Document.score`` or LlamaIndex ``NodeWithScore.score`` may be
    missing (``None``) or not a number; then the documents' order is the first-stage signal.
    """
    scores = list(scores)
    usable = all(_is_real(s) and math.isfinite(float(s)) for s in scores)
    return [float(s) for s in scores] if usable else None


@dataclass(frozen=True)
class Candidate:
    """One document as given (``id``, ``text``, ``meta``), at ``index`` in the caller's list."""

    id: Any
    text: str  # the caller's text, untouched
    index: int  # position in the caller's list
    meta: Mapping[str, Any] | None = None  # a dict document's "meta", as given (never copied or changed)

    @property
    def blank(self) -> bool:
        return not self.text.strip()


def normalise_documents(documents: Any) -> list[Candidate]:
    """The caller's documents as :class:`Candidate` s, in order; every id unique. Nothing is modified."""
    if documents is None:
        raise TypeError("documents is None: pass a list of strings or (id, text) pairs (an empty list is fine)")
    if isinstance(documents, (str, bytes)):
        raise TypeError("documents must be a list of strings or (id, text) pairs, not a single string")
    if isinstance(documents, Mapping):
        raise TypeError(
            "documents is a dict: pass its items as (id, text) pairs in first-stage order, e.g. list(docs.items())"
        )
    if isinstance(documents, Set):
        raise TypeError("documents is a set, which has no order: pass a list in first-stage order (best first)")
    if not isinstance(documents, Iterable):
        raise TypeError(f"documents must be a list of strings or (id, text) pairs, got {type(documents).__name__}")
    candidates: list[Candidate] = []
    seen: dict[Any, int] = {}
    for index, document in enumerate(documents):
        meta = None
        if isinstance(document, str):
            doc_id, text = index, document
        elif isinstance(document, Mapping):
            doc_id, text, meta = _dict_document(document, index)
        elif isinstance(document, tuple) and len(document) == 2:
            doc_id, text = document
            if not isinstance(text, str):
                raise TypeError(f"document {index} has text of type {type(text).__name__}; expected str")
        else:
            raise TypeError(
                f"document {index} is of type {type(document).__name__}; expected a string, an (id, text) tuple or "
                "a dict with 'text' (and optionally 'id' and 'meta')"
            )
        try:
            hash(doc_id)
        except TypeError:
            raise TypeError(f"document {index} has an unhashable id {doc_id!r}") from None
        if doc_id in seen:
            first = seen[doc_id]
            raise ValueError(
                f"duplicate document id {doc_id!r} at positions {first} and {index}: ids must be unique "
                "(a string's id is its position in the list; give every document an (id, text) pair to choose ids)"
            )
        seen[doc_id] = index
        candidates.append(Candidate(doc_id, text, index, meta))
    return candidates


_DOCUMENT_KEYS = {"id", "text", "meta"}


def _dict_document(document: Mapping, index: int) -> tuple[Any, str, Mapping | None]:
    """``(id, text, meta)`` of a dict document; its id defaults to its position."""
    unknown = sorted(map(str, set(document) - _DOCUMENT_KEYS))
    if unknown:
        raise TypeError(f"document {index} has unknown keys {unknown}: a dict document takes 'text' and optionally "
                        "'id' and 'meta' (put anything else inside 'meta')")
    if not isinstance(document.get("text"), str):
        raise TypeError(f"document {index} needs a string 'text', got {type(document.get('text')).__name__}")
    meta = document.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"document {index} has 'meta' of type {type(meta).__name__}; expected a dict or None")
    return document.get("id", index), document["text"], meta


def text_lines(path: str | Path):
    """``(line number, line)`` of every non-blank line of a UTF-8 text file; errors name the file (and byte)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def json_line(path: str | Path, number: int, line: str, keys: set[str], required: dict[str, type]) -> dict:
    """One JSONL line as a dict with only ``keys``, each of ``required`` of its type; errors name ``path:number``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: a line must be a JSON object with {sorted(required)}")
    for key, kind in required.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"{path}:{number}: '{key}' must be a {kind.__name__} (a line holds {sorted(keys)})")
    unknown = sorted(set(record) - keys)
    if unknown:
        raise ValueError(f"{path}:{number}: unknown fields {unknown}; a line holds {sorted(keys)}")
    return record


def read_documents(path: str | Path) -> list[Any]:
    """Documents from a file: JSONL lines with ``"text"`` (and optionally ``"id"`` and ``"meta"``), or one passage
    per line."""
    documents: list[Any] = []
    for number, line in text_lines(path):
        if line.lstrip().startswith("{"):
            record = json_line(path, number, line, _DOCUMENT_KEYS, {"text": str})
            documents.append({key: record[key] for key in ("id", "text", "meta") if key in record})
        else:
            documents.append(line)
    return documents
