"""BEIR-layout sets: a folder with one qrels split, loaded and checked across its files (each file's
reader, with errors naming file and line, is :mod:`.beir_files`).

A set is a folder in the BEIR layout (see ``shared/data/README.md``)::

    corpus.jsonl       {"_id", "title", "text"} per line
    queries.jsonl      {"_id", "text"} per line
    qrels/<split>.tsv  header ``query-id<TAB>corpus-id<TAB>score``
    candidates.jsonl   optional: {"query_id", "doc_ids", "scores"?} per line

Where candidates come from is read off the files (:class:`CandidateSource`); how the
protocol uses each set is :mod:`.protocol`, and how candidate lists are formed is
:mod:`.candidates`.  A set named without a folder is looked up in the data dir
(:func:`routehead_rag.paths.default_data_dir`), never relative to the current directory.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ..paths import DATA_ENV_VAR, data_dir_description, default_data_dir
from .beir_files import (
    DataFormatError,
    DataWarning,
    Document,
    build_qrels,
    iter_qrels,
    load_corpus,
    load_queries,
    read_candidates,
)

# --------------------------------------------------------------------------
# the dataset


class CandidateSource(StrEnum):
    """Where a set's candidate lists come from, read off its files."""

    RANKING = "ranking"  # candidates.jsonl with scores: a first-stage run, in order
    POOL = "pool"  # candidates.jsonl without scores: each query's own unordered pool
    CORPUS = "corpus"  # no candidates.jsonl: retrieve with BM25 from the set's corpus


@dataclass(repr=False)
class BeirDataset:
    """One BEIR-layout set loaded with one qrels split."""

    name: str  # the folder name, e.g. "trec-dl-2019"; keys PROTOCOL
    path: Path
    split: str  # which qrels/<split>.tsv filled `qrels`
    corpus: dict[str, Document]
    queries: dict[str, str]  # every query in queries.jsonl, judged or not
    qrels: dict[str, dict[str, int]]  # {qid: {doc_id: grade}}, grade 0 kept
    candidates: dict[str, list[str]] | None = None  # candidates.jsonl, file order
    candidate_scores: dict[str, list[float]] | None = None  # present for a ranking
    extra_files: tuple[str, ...] = field(default=())  # other files, e.g. qrels_full_nist.tsv

    @property
    def candidate_source(self) -> CandidateSource:
        if self.candidates is None:
            return CandidateSource.CORPUS
        if self.candidate_scores is not None:
            return CandidateSource.RANKING
        return CandidateSource.POOL

    def judged_query_ids(self) -> list[str]:
        """Ids of the queries with qrels in this split, sorted as strings."""
        return sorted(self.qrels)

    def passages(self, doc_ids: Iterable[str], max_words: int | None = 100) -> list[str]:
        """``Document.as_passage`` for each id, in order."""
        return [self.corpus[d].as_passage(max_words) for d in doc_ids]

    def __repr__(self) -> str:
        return (
            f"BeirDataset(name={self.name!r}, split={self.split!r}, docs={len(self.corpus)}, "
            f"queries={len(self.queries)}, judged={len(self.qrels)}, "
            f"candidates={self.candidate_source.value})"
        )


def available_sets(data_dir: Path | str | None = None) -> list[str]:
    """Names of the sets (sub-folders holding a ``corpus.jsonl``) under the data folder."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root is None or not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "corpus.jsonl").is_file())


def resolve_data_dir(name_or_path: Path | str, data_dir: Path | str | None = None) -> Path:
    """The folder of a set: ``name_or_path`` itself if it is a folder, else the set of that name
    in ``data_dir`` (default: :func:`routehead_rag.paths.default_data_dir`, i.e. ``$ROUTEHEAD_DATA``).

    A name is never resolved against the current directory or its parent.

    Raises:
        FileNotFoundError: naming where the name was looked up and the sets found there.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve()
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    where = str(root) if data_dir is not None else data_dir_description()
    if root is not None and p.name == str(name_or_path) and (root / p.name).is_dir():
        return (root / p.name).resolve()
    names = available_sets(root)
    if names:
        hint = f"set names are looked up in {where}, which holds: {', '.join(names)}"
    else:
        hint = (
            f"set names are looked up in {where}, which holds no sets; set ${DATA_ENV_VAR} to the folder "
            "that holds trec-dl-2019/, beir-scifact/, ... or pass the set's folder"
        )
    raise FileNotFoundError(f"no data set {str(name_or_path)!r}: it is not a folder; {hint}")


def load_beir(
    path: Path | str, split: str = "test", *, data_dir: Path | str | None = None
) -> BeirDataset:
    """Load a set from its folder (or its name under the data folder).

    ``split`` picks ``qrels/<split>.tsv`` (``"test"`` or, for SciFact,
    ``"train"``). Checks: every qrel's query is in ``queries.jsonl`` (error),
    every qrel's document is in ``corpus.jsonl`` (a :class:`DataWarning`; the
    qrel is kept, so it still counts in the ideal ranking), every candidate's
    query and documents exist (error).
    """
    root = resolve_data_dir(path, data_dir)
    corpus = load_corpus(root / "corpus.jsonl")
    queries = load_queries(root / "queries.jsonl")

    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        raise FileNotFoundError(
            f"{qrels_path}: file not found; splits of {root.name}: {', '.join(splits) or 'none'}"
        )
    qrels, qrel_lines = build_qrels(qrels_path, iter_qrels(qrels_path))
    for qid in qrels:
        if qid not in queries:
            line = min(n for (q, _), n in qrel_lines.items() if q == qid)
            raise DataFormatError(qrels_path, line, f"query {qid!r} is not in queries.jsonl")
    missing = sorted((n, q, d) for (q, d), n in qrel_lines.items() if d not in corpus)
    if missing:
        n, q, d = missing[0]
        warnings.warn(
            f"{qrels_path}: {len(missing)} qrel(s) point at documents missing from "
            f"corpus.jsonl (first: line {n}, query {q!r}, doc {d!r}); they are kept and "
            "can never be retrieved",
            DataWarning,
            stacklevel=2,
        )

    candidates = candidate_scores = None
    cand_path = root / "candidates.jsonl"
    if cand_path.is_file():
        candidates, candidate_scores, cand_lines = read_candidates(cand_path)
        for qid, doc_ids in candidates.items():
            if qid not in queries:
                raise DataFormatError(
                    cand_path, cand_lines[qid], f"query {qid!r} is not in queries.jsonl"
                )
            absent = [d for d in doc_ids if d not in corpus]
            if absent:
                raise DataFormatError(
                    cand_path,
                    cand_lines[qid],
                    f"{len(absent)} doc_ids not in corpus.jsonl, e.g. {absent[0]!r}",
                )

    known = {"corpus.jsonl", "queries.jsonl", "qrels", "candidates.jsonl"}
    extra = tuple(sorted(p.name for p in root.iterdir() if p.name not in known))
    return BeirDataset(
        name=root.name,
        path=root,
        split=split,
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        candidates=candidates,
        candidate_scores=candidate_scores,
        extra_files=extra,
    )
