"""Reading each file of a BEIR-layout set: corpus, queries, qrels and candidates, with errors that
name the file and the line (:class:`DataFormatError`).  A whole set (the folder, its split, where its
candidates come from) is :mod:`.beir`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.prompt import cut_words


class DataFormatError(ValueError):
    """A data file is malformed; the message starts with ``path:line:``."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


class DataWarning(UserWarning):
    """Data that loads but deserves a look (e.g. a qrel whose document is absent)."""


# --------------------------------------------------------------------------
# documents and the 100-word cut


@dataclass(frozen=True, slots=True)
class Document:
    """One corpus entry; ``title`` may be ``""``."""

    id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """``f"{title}\\n{text}"`` when the title is non-blank, else ``text``."""
        return f"{self.title}\n{self.text}" if self.title.strip() else self.text

    def as_passage(self, max_words: int | None = 100) -> str:
        """The passage a re-ranker sees: :attr:`full_text` cut by :func:`cut_words`."""
        return cut_words(self.full_text, max_words)


# --------------------------------------------------------------------------
# streaming readers (no pandas: json.loads per line)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    lineno = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(
                        path, lineno, f"not valid JSON ({e.msg}, column {e.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataFormatError(
                        path, lineno, f"expected a JSON object, got {type(obj).__name__}"
                    )
                yield lineno, obj
    except UnicodeDecodeError as e:
        where = f"; the bad byte is past line {lineno}" if lineno else ""
        raise DataFormatError(path, None, f"not UTF-8 ({e.reason}){where}") from None


def _get_id(obj: Mapping[str, Any], key: str, path: Path, lineno: int) -> str:
    if key not in obj:
        raise DataFormatError(path, lineno, f"missing field {key!r}")
    value = obj[key]
    # BEIR files sometimes store numeric ids as JSON numbers; ids are strings here.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, lineno, f"field {key!r} must be a string id, got {value!r}")
    value = str(value)
    if not value:
        raise DataFormatError(path, lineno, f"field {key!r} is empty")
    return value


def _get_str(
    obj: Mapping[str, Any], key: str, path: Path, lineno: int, *, default: str | None = None
) -> str:
    if key not in obj or obj[key] is None:
        if default is not None:
            return default
        raise DataFormatError(path, lineno, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(
            path, lineno, f"field {key!r} must be a string, got {type(value).__name__}"
        )
    return value


def load_corpus(path: Path | str) -> dict[str, Document]:
    """Read ``corpus.jsonl`` into ``{doc_id: Document}`` (file order kept)."""
    path = Path(path)
    corpus: dict[str, Document] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in _iter_jsonl(path):
        doc_id = _get_id(obj, "_id", path, lineno)
        if doc_id in corpus:
            raise DataFormatError(
                path, lineno, f"duplicate _id {doc_id!r} (first on line {first_line[doc_id]})"
            )
        title = _get_str(obj, "title", path, lineno, default="")
        text = _get_str(obj, "text", path, lineno)
        corpus[doc_id] = Document(doc_id, title, text)
        first_line[doc_id] = lineno
    return corpus


def load_queries(path: Path | str) -> dict[str, str]:
    """Read ``queries.jsonl`` into ``{query_id: text}`` (file order kept)."""
    path = Path(path)
    queries: dict[str, str] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = _get_id(obj, "_id", path, lineno)
        if qid in queries:
            raise DataFormatError(path, lineno, f"duplicate _id {qid!r}")
        text = _get_str(obj, "text", path, lineno)
        if not text.strip():
            raise DataFormatError(path, lineno, f"query {qid!r} has empty text")
        queries[qid] = text
    return queries


def iter_qrels(path: Path) -> Iterator[tuple[int, str, str, int]]:
    """Yield ``(line_number, query_id, doc_id, grade)`` from a qrels file.

    Accepts the BEIR TSV (``query-id, corpus-id, score``; a first line whose
    score column is not an integer is taken as the header) and the TREC form
    (``qid iter docno rel``, tab- or space-separated).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) not in (3, 4):
                parts = line.split()
            if len(parts) == 3:
                qid, doc_id, grade_s = parts
            elif len(parts) == 4:
                qid, _, doc_id, grade_s = parts
            else:
                raise DataFormatError(
                    path, lineno, f"expected 3 tab-separated columns, got {len(parts)}: {line!r}"
                )
            try:
                grade = int(grade_s)
            except ValueError:
                if lineno == 1:  # header
                    continue
                raise DataFormatError(
                    path, lineno, f"relevance grade {grade_s!r} is not an integer"
                ) from None
            qid, doc_id = qid.strip(), doc_id.strip()
            if not qid or not doc_id:
                raise DataFormatError(path, lineno, "empty query or document id")
            yield lineno, qid, doc_id, grade


def load_qrels(path: Path | str) -> dict[str, dict[str, int]]:
    """Read a qrels file into ``{query_id: {doc_id: grade}}``.

    Grade-0 rows are kept (they are judgments). An exact duplicate row is
    ignored; the same pair with two different grades is an error.
    """
    path = Path(path)
    return build_qrels(path, iter_qrels(path))[0]


def build_qrels(
    path: Path, rows: Iterable[tuple[int, str, str, int]]
) -> tuple[dict[str, dict[str, int]], dict[tuple[str, str], int]]:
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    for lineno, qid, doc_id, grade in rows:
        judged = qrels.setdefault(qid, {})
        if doc_id in judged:
            if judged[doc_id] != grade:
                raise DataFormatError(
                    path,
                    lineno,
                    f"({qid!r}, {doc_id!r}) graded {grade} here and {judged[doc_id]} "
                    f"on line {lines[qid, doc_id]}",
                )
            continue
        judged[doc_id] = grade
        lines[qid, doc_id] = lineno
    return qrels, lines


def read_candidates(
    path: Path,
) -> tuple[dict[str, list[str]], dict[str, list[float]] | None, dict[str, int]]:
    """``candidates.jsonl`` as ``({qid: doc_ids}, {qid: scores} | None, {qid: line})``.

    Scores must be on every line or on none (a ranking vs a pool, see :class:`CandidateSource`); given scores
    must be non-increasing, since the list is in first-stage order.
    """
    lines: dict[str, int] = {}
    candidates: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    with_scores: bool | None = None
    for lineno, obj in _iter_jsonl(path):
        qid = _get_id(obj, "query_id", path, lineno)
        if qid in candidates:
            raise DataFormatError(path, lineno, f"duplicate query_id {qid!r}")
        doc_ids = obj.get("doc_ids")
        if not isinstance(doc_ids, list) or not doc_ids:
            raise DataFormatError(path, lineno, "field 'doc_ids' must be a non-empty list")
        ids = [str(d) for d in doc_ids]
        if len(set(ids)) != len(ids):
            raise DataFormatError(path, lineno, f"doc_ids of {qid!r} repeat a document")
        has = obj.get("scores") is not None
        if with_scores is None:
            with_scores = has
        elif has != with_scores:
            raise DataFormatError(
                path, lineno, "'scores' must be on every line or on none (ranking vs pool)"
            )
        if has:
            s = obj["scores"]
            if not isinstance(s, list) or len(s) != len(ids):
                raise DataFormatError(path, lineno, "'scores' must be a list as long as 'doc_ids'")
            try:
                s = [float(x) for x in s]
            except (TypeError, ValueError):
                raise DataFormatError(path, lineno, "'scores' must hold numbers") from None
            if any(a < b for a, b in itertools.pairwise(s)):
                raise DataFormatError(
                    path, lineno, "'scores' increase: the list is not in first-stage order"
                )
            scores[qid] = s
        candidates[qid] = ids
        lines[qid] = lineno
    return candidates, (scores if with_scores else None), lines
