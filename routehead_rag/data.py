"""BEIR-layout loading, the evaluation protocol as code, and candidate lists.

A set is a folder in the BEIR layout (see ``shared/data/README.md``)::

    corpus.jsonl       {"_id", "title", "text"} per line
    queries.jsonl      {"_id", "text"} per line
    qrels/<split>.tsv  header ``query-id<TAB>corpus-id<TAB>score``
    candidates.jsonl   optional: {"query_id", "doc_ids", "scores"?} per line

Where candidates come from is read off the files (:class:`CandidateSource`):

* ``candidates.jsonl`` whose lines carry ``scores`` -> a first-stage *ranking*
  (trec-dl: Pyserini BM25 top-100); the protocol takes its first ``top_k``.
* ``candidates.jsonl`` without scores -> each query's own paragraph *pool*
  (hotpotqa, musique); its source order is not a ranking, so the BM25 baseline
  is BM25 over the pool (:func:`bm25_order`).
* no ``candidates.jsonl`` -> BM25 top-``top_k`` over the set's own *corpus*.

What the files cannot tell (the TREC DL relevance level for binary measures,
ArguAna's self-match rule, which queries each role uses) is fixed in
:data:`PROTOCOL`, the protocol table of ``shared/data/README.md`` as code.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # first_stage imports this module; import it lazily at run time
    from routehead_rag.first_stage import Bm25Index

__all__ = [
    "DATA_ENV_VAR",
    "DEFAULT_DATA_DIR",
    "PROTOCOL",
    "BeirDataset",
    "CandidateSource",
    "DataFormatError",
    "DataWarning",
    "Document",
    "Protocol",
    "ProtocolEntry",
    "Role",
    "SetSpec",
    "available_sets",
    "bm25_order",
    "build_candidates",
    "cut_words",
    "default_data_dir",
    "load_beir",
    "load_candidates",
    "load_corpus",
    "load_protocol_set",
    "load_qrels",
    "load_queries",
    "protocol_queries",
    "resolve_data_dir",
    "select_queries",
]

DATA_ENV_VAR = "ROUTEHEAD_DATA"


def default_data_dir() -> Path:
    """The data folder: ``$ROUTEHEAD_DATA`` if set, else ``../shared/data``.

    The fallback is resolved against the current working directory, so running
    from the repository root (``/work/main``) finds ``/work/shared/data``.
    Read at each call, so setting the variable after import takes effect.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / ".." / "shared" / "data").resolve()


# The data folder as seen at import time (for messages and CLI defaults); the
# functions below call default_data_dir() again so later changes count.
DEFAULT_DATA_DIR = default_data_dir()


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


def cut_words(text: str, max_words: int | None) -> str:
    """Keep the first ``max_words`` whitespace-separated words of ``text``.

    The exact rule: a word is a maximal run of non-whitespace (what
    ``str.split()`` yields). Words are counted across lines; the first
    ``max_words`` are kept in order. Kept words on one line are joined by a
    single space, lines by a single ``"\\n"``, and a line left without a kept
    word is dropped. So ``cut_words("Title\\nA  b c", 2) == "Title\\nA"`` and,
    always, ``cut_words(t, n).split() == t.split()[:n]``. ``max_words=None``
    keeps every word (whitespace normalised the same way).
    """
    if max_words is not None and max_words < 0:
        raise ValueError(f"max_words must be >= 0 or None, got {max_words}")
    budget = max_words
    lines: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if budget is not None:
            words = words[:budget]
            budget -= len(words)
        if words:
            lines.append(" ".join(words))
        if budget == 0:
            break
    return "\n".join(lines)


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


def _iter_qrels(path: Path) -> Iterator[tuple[int, str, str, int]]:
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
    return _build_qrels(path, _iter_qrels(path))[0]


def _build_qrels(
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


def load_candidates(
    path: Path | str,
) -> tuple[dict[str, list[str]], dict[str, list[float]] | None]:
    """Read ``candidates.jsonl`` into ``({qid: doc_ids}, {qid: scores} | None)``.

    Scores must be on every line or on none (a ranking vs a pool, see
    :class:`CandidateSource`); given scores must be non-increasing, since the
    list is in first-stage order.
    """
    candidates, scores, _ = _read_candidates(Path(path))
    return candidates, scores


def _read_candidates(
    path: Path,
) -> tuple[dict[str, list[str]], dict[str, list[float]] | None, dict[str, int]]:
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
            if any(a < b for a, b in zip(s, s[1:])):
                raise DataFormatError(
                    path, lineno, "'scores' increase: the list is not in first-stage order"
                )
            scores[qid] = s
        candidates[qid] = ids
        lines[qid] = lineno
    return candidates, (scores if with_scores else None), lines


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
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "corpus.jsonl").is_file())


def resolve_data_dir(name_or_path: Path | str, data_dir: Path | str | None = None) -> Path:
    """The folder of a set: ``name_or_path`` itself if it is a folder, else the
    set of that name under ``data_dir`` (default :func:`default_data_dir`)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve()
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    candidate = root / str(name_or_path)
    if candidate.is_dir():
        return candidate.resolve()
    names = available_sets(root)
    if names:
        hint = f"available sets under {root}: {', '.join(names)}"
    else:
        hint = (
            f"the data folder {root} holds no sets; set ${DATA_ENV_VAR} to the folder "
            "that holds trec-dl-2019/, beir-scifact/, ..."
        )
    raise FileNotFoundError(f"no data set {str(name_or_path)!r}: not a folder; {hint}")


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
    qrels, qrel_lines = _build_qrels(qrels_path, _iter_qrels(qrels_path))
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
        candidates, candidate_scores, cand_lines = _read_candidates(cand_path)
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


# --------------------------------------------------------------------------
# the evaluation protocol (shared/data/README.md, "How the project uses these sets")


class Role(StrEnum):
    FIT = "fit"  # router training and head search
    IN_DOMAIN_TEST = "in-domain-test"  # scored after fitting on the same domain's fit split
    CROSS_DOMAIN_TEST = "cross-domain-test"  # never fitted on


@dataclass(frozen=True)
class SetSpec:
    """What the protocol fixes about a set that its files cannot tell."""

    name: str
    binary_rel: int = 1  # lowest grade that counts as relevant in binary measures (recall)
    drop_self_match: bool = False  # drop a retrieved doc whose id equals the query id
    instruction: str = "relevance"  # prompt wording: "question" for QA sets, as ICR's code does


@dataclass(frozen=True)
class ProtocolEntry:
    """One (set, role): which qrels split and which of its judged queries."""

    name: str
    role: Role
    n_queries: int  # the count data/README.md states; checked on selection
    split: str = "test"  # qrels/<split>.tsv
    first: int | None = None  # keep the first N judged ids (sorted as strings)
    last: int | None = None  # keep the last N judged ids (sorted as strings)

    def select(self, judged_ids: Iterable[str]) -> list[str]:
        ids = sorted(judged_ids)
        if self.first is not None:
            ids = ids[: self.first]
        if self.last is not None:
            ids = ids[-self.last :] if self.last else []
        return ids


@dataclass(frozen=True)
class Protocol:
    """The fixed splits, candidate depth, passage cut and measures of every reported number."""

    entries: tuple[ProtocolEntry, ...]
    sets: Mapping[str, SetSpec]
    top_k: int = 20  # candidates per query handed to the re-ranker
    max_words: int = 100  # passages cut to their first 100 words, title included
    measure: str = "nDCG@10"  # graded, linear gain, ideal over every judged doc (ir_measures)
    recall_depth: int = 20  # recall@20 of the candidate list

    def spec(self, name: str) -> SetSpec:
        """The set's spec; a set outside the protocol gets the defaults."""
        return self.sets.get(name, SetSpec(name))

    def entries_for(self, role: Role | str) -> list[ProtocolEntry]:
        role = Role(role)
        return [e for e in self.entries if e.role is role]

    def entry(self, name: str, role: Role | str) -> ProtocolEntry:
        role = Role(role)
        for e in self.entries:
            if e.name == name and e.role is role:
                return e
        roles = [e.role.value for e in self.entries if e.name == name]
        raise KeyError(
            f"{name!r} has no {role.value!r} split in the protocol"
            + (f"; its roles: {', '.join(roles)}" if roles else "; it is not a protocol set")
        )

    def recall_measure(self, name: str) -> str:
        """The ir_measures spelling of recall@``recall_depth`` at the set's relevance level."""
        rel = self.spec(name).binary_rel
        return f"R@{self.recall_depth}" if rel == 1 else f"R(rel={rel})@{self.recall_depth}"


PROTOCOL = Protocol(
    entries=(
        ProtocolEntry("beir-scifact", Role.FIT, 809, split="train"),
        ProtocolEntry("musique-ans-train100", Role.FIT, 100),
        ProtocolEntry("hotpotqa-distractor-dev500", Role.FIT, 400, first=400),
        ProtocolEntry("trec-dl-2019", Role.FIT, 43),
        ProtocolEntry("beir-scifact", Role.IN_DOMAIN_TEST, 300),
        ProtocolEntry("hotpotqa-distractor-dev500", Role.IN_DOMAIN_TEST, 100, last=100),
        ProtocolEntry("trec-dl-2020", Role.CROSS_DOMAIN_TEST, 54),
        ProtocolEntry("beir-arguana", Role.CROSS_DOMAIN_TEST, 200, first=200),
        ProtocolEntry("musique-ans-migres200", Role.CROSS_DOMAIN_TEST, 200),
        ProtocolEntry("cacm", Role.CROSS_DOMAIN_TEST, 52),
        ProtocolEntry("npl", Role.CROSS_DOMAIN_TEST, 93),
    ),
    sets={
        s.name: s
        for s in (
            SetSpec("trec-dl-2019", binary_rel=2),  # TREC DL: grade >= 2 is relevant
            SetSpec("trec-dl-2020", binary_rel=2),
            SetSpec("beir-arguana", drop_self_match=True),  # as MTEB does
            SetSpec("beir-scifact"),
            SetSpec("hotpotqa-distractor-dev500", instruction="question"),  # multi-hop QA
            SetSpec("musique-ans-migres200", instruction="question"),
            SetSpec("musique-ans-train100", instruction="question"),
            SetSpec("cacm"),
            SetSpec("npl"),
        )
    },
)


def protocol_queries(dataset: BeirDataset, role: Role | str) -> list[str]:
    """The protocol's ordered query ids of ``dataset`` for ``role``.

    Only queries with qrels in the dataset's split count; ids are sorted as
    strings before any first/last-N cut. Raises if the dataset was loaded with
    another split than the protocol's, or if the count differs from the one
    ``data/README.md`` states.
    """
    entry = PROTOCOL.entry(dataset.name, role)
    if dataset.split != entry.split:
        raise ValueError(
            f"{dataset.name} {entry.role.value} uses qrels/{entry.split}.tsv but the dataset "
            f"was loaded with split={dataset.split!r}; use load_beir(..., split={entry.split!r})"
        )
    ids = entry.select(dataset.qrels)
    if len(ids) != entry.n_queries:
        raise ValueError(
            f"{dataset.name} {entry.role.value}: {len(ids)} queries, the protocol expects "
            f"{entry.n_queries}; is {dataset.path} the set data/README.md describes?"
        )
    return ids


def load_protocol_set(
    name: str, role: Role | str, data_dir: Path | str | None = None
) -> tuple[BeirDataset, list[str]]:
    """Load a protocol set with the split its role uses; return it with its query ids."""
    entry = PROTOCOL.entry(name, role)
    dataset = load_beir(name, split=entry.split, data_dir=data_dir)
    return dataset, protocol_queries(dataset, role)


def select_queries(
    dataset: BeirDataset, max_queries: int | None = None, *, last: bool = False
) -> list[str]:
    """Judged query ids sorted as strings; the first (or, with ``last``, the last)
    ``max_queries`` of them. For ad-hoc runs; reported numbers use :func:`protocol_queries`."""
    ids = dataset.judged_query_ids()
    if max_queries is None:
        return ids
    if max_queries < 0:
        raise ValueError(f"max_queries must be >= 0, got {max_queries}")
    if last:
        return ids[len(ids) - max_queries :] if max_queries else []
    return ids[:max_queries]


# --------------------------------------------------------------------------
# candidates


def build_candidates(
    dataset: BeirDataset,
    qids: Iterable[str],
    top_k: int = 20,
    bm25_index: Bm25Index | None = None,
    *,
    pool_order: Literal["source", "bm25"] = "source",
    drop_self_match: bool | None = None,
) -> dict[str, list[str]]:
    """Each query's candidate list as the protocol forms it, best first.

    By :attr:`BeirDataset.candidate_source`:

    * ``RANKING``: the first ``top_k`` of ``candidates.jsonl``.
    * ``POOL``: the query's own paragraphs, in source order (``pool_order=
      "source"``, not a ranking) or BM25-ranked over the pool alone
      (``"bm25"``, the baseline to report), then the first ``top_k``.
    * ``CORPUS``: BM25 top-``top_k`` over the set's corpus; pass ``bm25_index``
      to reuse an index across calls (else one is built here). With
      ``drop_self_match`` (default: the set's :data:`PROTOCOL` spec, True for
      ArguAna) a document whose id equals the query id is dropped before the cut.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if pool_order not in ("source", "bm25"):
        raise ValueError(f"pool_order must be 'source' or 'bm25', got {pool_order!r}")
    qids = list(qids)
    unknown = [q for q in qids if q not in dataset.queries]
    if unknown:
        raise KeyError(
            f"{dataset.name}: {len(unknown)} query ids not in queries.jsonl, e.g. {unknown[0]!r}"
        )
    source = dataset.candidate_source

    if source is CandidateSource.CORPUS:
        from routehead_rag.first_stage import Bm25Index

        if drop_self_match is None:
            drop_self_match = PROTOCOL.spec(dataset.name).drop_self_match
        index = bm25_index if bm25_index is not None else Bm25Index(dataset.corpus)
        return {
            q: [
                d
                for d, _ in index.retrieve(
                    dataset.queries[q], top_k, exclude=(q,) if drop_self_match else ()
                )
            ]
            for q in qids
        }

    assert dataset.candidates is not None  # RANKING or POOL
    lacking = [q for q in qids if q not in dataset.candidates]
    if lacking:
        raise KeyError(
            f"{dataset.path / 'candidates.jsonl'} has no line for {len(lacking)} queries, "
            f"e.g. {lacking[0]!r}"
        )
    if source is CandidateSource.POOL and pool_order == "bm25":
        from routehead_rag.first_stage import rank_pool

        return {
            q: [d for d, _ in rank_pool(dataset.queries[q], dataset.candidates[q], dataset.corpus)][
                :top_k
            ]
            for q in qids
        }
    return {q: list(dataset.candidates[q][:top_k]) for q in qids}


def bm25_order(
    dataset: BeirDataset,
    qids: Iterable[str],
    top_k: int = 20,
    bm25_index: Bm25Index | None = None,
) -> dict[str, list[str]]:
    """The BM25 baseline ranking of every set: BM25 over the pool for a pool set,
    otherwise the same lists as :func:`build_candidates`."""
    return build_candidates(dataset, qids, top_k, bm25_index, pool_order="bm25")

