"""Where ``fit`` learns from: BEIR-layout folders (their fit split) and JSONL query logs.

A query log has one query per line::

    {"query": "...", "candidates": [{"id": "d1", "text": "..."}, ...], "relevance": {"d1": 2}}

(``"id"`` optional; clicks count as grade 1).  A bad line is an error naming the line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import portable_path


@dataclass
class FitSource:
    """One source of labelled queries, with the passages of each query's candidates."""

    name: str
    queries: dict[str, str]
    candidates: dict[str, list[str]]  # each query's candidates in first-stage order (best first)
    qrels: dict[str, dict[str, int]]
    passages: Callable[[str, list[str]], list[str]]  # (qid, doc ids) -> passage texts
    origin: str  # where it came from, relative to the data dir or the repository (portable_path)
    key: dict = field(default_factory=dict)  # settings that change its passages' texts beyond the scoring prompt
    instruction: str | None = None  # a named prompt instruction for this source; None: the fit's scoring prompt
    first_stage_scores: dict[str, list[float]] | None = None  # per query, one per candidate; None: the order only
    first_stage_kind: str | None = None  # which first stage scored them ("bm25", "dense"); None: a log's own order
    groups: dict[str, str] | None = None  # query id -> its group (kept on one side of train/dev); None: each its own


@dataclass(frozen=True)
class LoggedQuery:
    """One line of a query log, checked."""

    qid: str
    query: str
    texts: dict[str, str]  # candidate id -> text, in first-stage order
    grades: dict[str, int]


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a grade can be")


def _text_id(value, where: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{where}: {what} must be a string or an integer, got {value!r}")
    text = str(value)
    if not text or _has_surrogates(text):
        raise ValueError(f"{where}: {what} {text!r} is empty or holds an invalid character (a lone surrogate)")
    return text


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _grade(value, where: str, doc_id: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()
    ):
        raise ValueError(f"{where}: the grade of {doc_id!r} is {value!r}; grades are integers (a click counts as 1)")
    return int(value)


def _log_lines(path: Path):
    """``(byte offset, line number, raw bytes)`` of every line of a log, read as a stream."""
    with path.open("rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            yield offset, number, raw
            offset += len(raw)


def _parse_log_line(raw: bytes, where: str, number: int) -> LoggedQuery | None:
    """One checked log line (``None`` for a blank one); a bad line is an error naming ``where``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not record["query"].strip():
        raise ValueError(f"{where}: each line needs a non-empty string 'query'")
    items = record.get("candidates")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{where}: 'candidates' must be a non-empty list of {{'id': ..., 'text': ...}}")
    relevance = record.get("relevance", {})
    if not isinstance(relevance, dict):
        raise ValueError(f"{where}: 'relevance' must map candidate ids to integer grades")
    qid = _text_id(record.get("id", f"line{number}"), where, "the query id")
    texts: dict[str, str] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("text"), str):
            raise ValueError(f"{where}: candidate {index} needs an 'id' and a string 'text'")
        doc_id = _text_id(item["id"], where, f"candidate {index}'s id")
        if doc_id in texts:
            raise ValueError(f"{where}: candidate id {doc_id!r} repeats within the query")
        texts[doc_id] = item["text"]
    unknown = [d for d in relevance if d not in texts]
    if unknown:
        raise ValueError(f"{where}: 'relevance' names ids that are not candidates: {unknown[:3]}")
    grades = {d: _grade(g, where, d) for d, g in relevance.items()}
    return LoggedQuery(qid, record["query"], texts, grades)


def _iter_log(path: Path):
    """``(byte offset, line number, LoggedQuery)`` per non-blank line; a repeated query id is an error."""
    seen: set[str] = set()
    for offset, number, raw in _log_lines(path):
        logged = _parse_log_line(raw, f"{path}:{number}", number)
        if logged is None:
            continue
        if logged.qid in seen:
            raise ValueError(f"{path}:{number}: query id {logged.qid!r} repeats an earlier line")
        seen.add(logged.qid)
        yield offset, number, logged


def iter_query_log(path: str | Path):
    """Each line of a JSONL query log as a :class:`LoggedQuery`, read as a stream; a bad line is an error
    naming the line (invalid JSON or UTF-8, ``Infinity``/``NaN``, a non-integer grade, a repeated id...)."""
    for _, _, logged in _iter_log(Path(path)):
        yield logged


class _LogPassages:
    """``(qid, doc ids) -> texts`` that re-reads the query's line from the log, so a fit holds no passage
    texts in memory (only each line's byte offset); a log changed under a running fit is an error."""

    def __init__(self, path: Path, lines: dict[str, tuple[int, int]]):
        self.path, self.lines = path, lines

    def __call__(self, qid: str, doc_ids: list[str]) -> list[str]:
        offset, number = self.lines[qid]
        with self.path.open("rb") as handle:
            handle.seek(offset)
            raw = handle.readline()
        try:
            logged = _parse_log_line(raw, f"{self.path}:{number}", number)
        except ValueError:
            logged = None
        if logged is None or logged.qid != qid or any(d not in logged.texts for d in doc_ids):
            raise ValueError(
                f"{self.path} changed while it was being read: line {number} no longer holds query {qid!r}; "
                "leave the log unchanged during a fit and run it again"
            )
        return [logged.texts[d] for d in doc_ids]


def read_query_log(path: str | Path, max_queries: int | None = None) -> FitSource:
    """A JSONL query log as a :class:`FitSource` (see :func:`iter_query_log` for what is checked).

    Read as a stream: the source keeps each query's text, candidate ids and grades, and the byte
    offset of its line; the passage texts are read again from the file when they are scored."""
    path = Path(path)
    queries: dict[str, str] = {}
    candidates: dict[str, list[str]] = {}
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[str, tuple[int, int]] = {}
    for offset, number, logged in _iter_log(path):
        queries[logged.qid], qrels[logged.qid] = logged.query, logged.grades
        candidates[logged.qid], lines[logged.qid] = list(logged.texts), (offset, number)
        if max_queries is not None and len(queries) >= max_queries:
            break
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return FitSource(
        name=path.stem, queries=queries, candidates=candidates, qrels=qrels,
        passages=_LogPassages(path, lines), origin=portable_path(path),
    )


def beir_source(name_or_path: str, top_k: int = 20, max_queries: int | None = None,
                data_dir: str | None = None, instruction: str | None = "auto") -> FitSource:
    """A BEIR-layout folder's fit split: the protocol's for a protocol set, else ``qrels/train.tsv``.

    Candidates are the first stage's top ``top_k`` in its order, with its scores
    (:func:`routehead_rag.data.candidates.first_stage_lists`: what eval and users see), passages whole
    (the scoring prompt's passage budget cuts them, as in ranking). ``instruction="auto"`` takes the
    protocol's wording for a protocol set (``question`` for the QA sets) and ``relevance`` otherwise;
    ``None`` keeps the fit's own prompt.
    """
    from ..data.beir import load_beir, resolve_data_dir
    from ..data.candidates import first_stage_lists
    from ..data.protocol import PROTOCOL, Role, instruction_for, protocol_queries, select_queries

    folder = resolve_data_dir(name_or_path, data_dir)
    name = folder.name
    try:
        entry = PROTOCOL.entry(name, Role.FIT)
    except KeyError:
        entry = None
    if entry is not None:
        dataset = load_beir(folder, split=entry.split)
        qids = protocol_queries(dataset, Role.FIT)
    else:
        if not (folder / "qrels" / "train.tsv").is_file():
            raise ValueError(
                f"{folder} has no qrels/train.tsv: `fit` learns only from a fit split; add one, "
                "or pass a JSONL query log"
            )
        dataset = load_beir(folder, split="train")
        qids = select_queries(dataset)
    if max_queries is not None:
        qids = qids[:max_queries]
    if instruction is not None:
        instruction = instruction_for(instruction, name)
    lists = first_stage_lists(dataset, qids, top_k)
    return FitSource(
        name=name, queries={q: dataset.queries[q] for q in qids},
        candidates={q: lists[q].doc_ids for q in qids}, qrels={q: dataset.qrels.get(q, {}) for q in qids},
        passages=lambda qid, ids: [dataset.corpus[d].full_text for d in ids],
        origin=portable_path(folder), instruction=instruction,
        first_stage_scores={q: lists[q].scores for q in qids}, first_stage_kind="bm25",
        groups={q: PROTOCOL.spec(name).group(q) for q in qids},
    )


def eval_set_source(eval_set, instruction: str | None = "auto") -> FitSource:
    """A prepared labelled set (:class:`routehead_rag.eval.harness.EvalSet`) as a fit source."""
    from ..data.protocol import instruction_for

    dataset = eval_set.dataset
    return FitSource(
        name=dataset.name, queries={q: dataset.queries[q] for q in eval_set.qids},
        candidates={q: eval_set.candidates[q].doc_ids for q in eval_set.qids},
        qrels={q: dataset.qrels.get(q, {}) for q in eval_set.qids},
        passages=lambda qid, ids: eval_set.passages(ids), origin=portable_path(dataset.path),
        instruction=instruction_for(instruction, dataset.name) if instruction is not None else None,
        first_stage_scores={q: eval_set.candidates[q].scores for q in eval_set.qids},
        first_stage_kind=eval_set.first_stage,
    )


def sources_from_arguments(data: list[str], top_k: int, max_queries: int | None, instruction: str = "auto") -> list[FitSource]:
    """What ``routehead-rag fit DATA...`` learns from: each item a JSONL query log (``.jsonl``/``.json``) or a
    BEIR-layout folder or set name (its fit split); ``instruction`` as the CLI takes it (``auto``: the
    protocol's wording per known set; a log keeps the fit's own prompt)."""
    sources = []
    for item in data:
        path = Path(item)
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            source = read_query_log(path, max_queries)
            source.instruction = None if instruction == "auto" else instruction
        else:
            source = beir_source(item, top_k, max_queries, instruction=instruction)
        sources.append(source)
    return sources
