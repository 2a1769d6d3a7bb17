"""What a re-ranker returns: :class:`RankedResults` (best first), one :class:`RankedDocument` each."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RankedDocument:
    """One re-ranked document. ``index`` is its position in the caller's list; ``meta`` a dict document's
    meta, as given; ``chunk`` (chunk mode only) the character span ``(start, end)`` of the caller's text
    whose score the document took (its best chunk), ``None`` when it was scored whole."""

    id: Any
    text: str
    score: float
    rank: int  # 1-based
    index: int
    meta: Mapping[str, Any] | None = None
    chunk: tuple[int, int] | None = None


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

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per document (``rank``, ``id``, ``score``, ``text``, and ``meta``/``chunk`` where set)."""
        records = []
        for r in self._results:
            record: dict[str, Any] = {"rank": r.rank, "id": r.id, "score": r.score, "text": r.text}
            if r.meta is not None:
                record["meta"] = dict(r.meta)
            if r.chunk is not None:
                record["chunk"] = list(r.chunk)
            records.append(record)
        return records
