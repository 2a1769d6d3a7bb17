"""First-stage retrieval and baselines: BM25 (bm25s) and a dense MiniLM re-ranker.

BM25 indexes ``Document.full_text`` (title, newline, text), lower-cased, with
bm25s's English stop-word list and no stemmer by default. Ranking is
deterministic: equal scores keep the corpus (or pool) order.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..extras import require
from ..model.packaged import MINILM_INSTALL, MINILM_PACKAGE, packaged_minilm_path
from .beir_files import Document

bm25s = require("bm25s", "fit")

if TYPE_CHECKING:
    from ..bi_encoder import BiEncoder

__all__ = [
    "DENSE_INSTALL",
    "DENSE_PACKAGE",
    "Bm25Index",
    "DenseRetriever",
    "packaged_minilm_path",
    "rank_pool",
]


def _text_of(doc: Document | str) -> str:
    return doc.full_text if isinstance(doc, Document) else doc


class Bm25Index:
    """BM25 over a fixed corpus, indexed once at construction.

    ``corpus`` maps doc id -> :class:`Document` (indexed as ``full_text``) or
    plain text. ``k1``, ``b`` and ``method`` are bm25s's (defaults: Lucene
    BM25, k1=1.5, b=0.75); ``stopwords`` is passed to ``bm25s.tokenize``;
    ``stemmer`` is an optional callable such as ``Stemmer.Stemmer("english").stemWords``.
    """

    def __init__(
        self,
        corpus: Mapping[str, Document | str],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: str | list[str] | None = "en",
        stemmer: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        if not corpus:
            raise ValueError("Bm25Index needs a non-empty corpus")
        self.doc_ids: list[str] = list(corpus)
        self.k1, self.b, self.method = k1, b, method
        self.stopwords, self.stemmer = stopwords, stemmer
        tokens = self._tokenize([_text_of(d) for d in corpus.values()])
        # bm25s cannot index a corpus without any token; every score is then 0.
        self._model: bm25s.BM25 | None = None
        if any(tokens):
            self._model = bm25s.BM25(k1=k1, b=b, method=method)
            self._model.index(tokens, show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(
            texts,
            stopwords=self.stopwords,
            stemmer=self.stemmer,
            return_ids=False,
            show_progress=False,
        )

    def __len__(self) -> int:
        return len(self.doc_ids)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``, in ``doc_ids`` order. # [doc]"""
        tokens = self._tokenize([query])[0]
        if self._model is None or not tokens:  # bm25s fails on an empty query
            return np.zeros(len(self.doc_ids), dtype=np.float32)
        return self._model.get_scores(tokens)

    def retrieve(
        self, query: str, k: int = 20, *, exclude: Container[str] = ()
    ) -> list[tuple[str, float]]:
        """The ``k`` best ``(doc_id, score)`` pairs, best first.

        Only documents with a positive score (sharing a term with the query)
        are returned, so fewer than ``k`` may come back. Ties keep corpus
        order. Ids in ``exclude`` are skipped before the cut (ArguAna's
        self-match rule).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = self.scores(query)  # [doc]
        order = np.argsort(-scores, kind="stable")  # [doc]
        out: list[tuple[str, float]] = []
        for i in order:
            score = float(scores[i])
            if score <= 0.0 or len(out) == k:
                break
            doc_id = self.doc_ids[i]
            if doc_id not in exclude:
                out.append((doc_id, score))
        return out

    def retrieve_many(
        self, queries: Mapping[str, str], k: int = 20, *, drop_self_match: bool = False
    ) -> dict[str, list[tuple[str, float]]]:
        """:meth:`retrieve` for each ``{qid: text}``; with ``drop_self_match`` the
        document whose id equals the query id is skipped."""
        return {
            qid: self.retrieve(text, k, exclude=(qid,) if drop_self_match else ())
            for qid, text in queries.items()
        }


def rank_pool(
    query: str,
    doc_ids: Sequence[str],
    corpus: Mapping[str, Document | str],
    **bm25_kwargs: Any,
) -> list[tuple[str, float]]:
    """BM25-rank a query's own small pool; every pool document comes back.

    The index (and so the IDF) is built over the pool alone, which keeps the
    ranking of one question independent of which other questions share the
    file. Ties, zero scores included, keep pool order.
    """
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("rank_pool: doc_ids repeat a document")
    if not doc_ids:
        return []
    index = Bm25Index({d: corpus[d] for d in doc_ids}, **bm25_kwargs)
    scores = index.scores(query)  # [doc]
    order = np.argsort(-scores, kind="stable")  # [doc]
    return [(index.doc_ids[i], float(scores[i])) for i in order]


# --------------------------------------------------------------------------
# dense baseline

# the packaged model's folder and install hint live with the other packaged model (model/packaged.py)
DENSE_PACKAGE, DENSE_INSTALL = MINILM_PACKAGE, MINILM_INSTALL


class DenseRetriever:
    """Cosine-similarity baseline with all-MiniLM-L6-v2, loaded from a local folder only.

    ``__init__`` only stores settings; the model loads on :meth:`warm_up` (or
    the first call). ``model_path`` defaults to :func:`packaged_minilm_path`;
    the hub is never contacted (``local_files_only=True``). ``device=None``
    lets sentence-transformers pick.
    """

    def __init__(
        self,
        model_path: Path | str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path = Path(model_path) if model_path is not None else None
        self.device = device
        self.batch_size = batch_size
        self._model: BiEncoder | None = None
        self._corpora: dict[tuple[int, int], tuple[Mapping, list[str], np.ndarray]] = {}  # encoded corpora

    def warm_up(self) -> None:
        if self._model is not None:
            return
        from ..bi_encoder import BiEncoder

        path = self.model_path if self.model_path is not None else packaged_minilm_path()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no model folder here")
        self._model = BiEncoder(str(path), self.device, self.batch_size, dtype="float32")  # the re-ranker's bi-encoder
        # code, in float32 as sentence-transformers runs it by default: the dense baseline is what a user would pick

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings. # [text, dim]"""
        self.warm_up()
        assert self._model is not None
        return self._model.encode(texts).numpy()

    def rerank(self, query: str, passages: Sequence[str]) -> list[float]:
        """Cosine similarity of each passage to the query, in passage order."""
        if not passages:
            return []
        q = self.encode([query])  # [1, dim]
        p = self.encode(passages)  # [passage, dim]
        return [float(x) for x in (p @ q[0])]

    def rank(self, query: str, doc_ids: Sequence[str], corpus: Mapping[str, Document | str]) -> list[tuple[str, float]]:
        """``doc_ids`` (a query's own pool) as ``(doc_id, cosine)`` pairs, best first; ties keep pool order."""
        scores = self.rerank(query, [_text_of(corpus[d]) for d in doc_ids])
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        return [(doc_ids[i], scores[i]) for i in order]

    def retrieve_many(
        self, queries: Sequence[str], corpus: Mapping[str, Document | str], k: int
    ) -> list[list[tuple[str, float]]]:
        """The ``k`` best ``(doc_id, cosine)`` pairs of ``corpus`` for each query, best first (ties: corpus order).

        The corpus is encoded once per retriever and corpus (kept in memory: 384 floats per document)."""
        ids, matrix = self._corpus_matrix(corpus)  # [doc, dim]
        encoded = self.encode(list(queries))  # [query, dim]
        out = []
        for row in encoded @ matrix.T:  # [doc]
            order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
            out.append([(ids[i], float(row[i])) for i in order])
        return out

    def _corpus_matrix(self, corpus: Mapping[str, Document | str]) -> tuple[list[str], np.ndarray]:
        key = id(corpus), len(corpus)
        cached = self._corpora.get(key)
        if cached is None or cached[0] is not corpus:
            ids = list(corpus)
            cached = (corpus, ids, self.encode([_text_of(corpus[d]) for d in ids]))
            self._corpora[key] = cached
        return cached[1], cached[2]
