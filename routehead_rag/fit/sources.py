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
    candidates: dict[str, list[str]]
    qrels: dict[str, dict[str, int]]
    passages: Callable[[str, list[str]], list[str]]  # (qid, doc ids) -> passage texts
    origin: str  # where it came from, relative to the data dir or the repository (portable_path)
    key: dict = field(default_factory=dict)  # settings that change its passages (e.g. the word cut)
    instruction: str | None = None  # a named prompt instruction for this source; None: the fit's scoring prompt


def read_query_log(path: str | Path, max_queries: int | None = None) -> FitSource:
    """A JSONL query log as a :class:`FitSource`; a bad line is an error naming the line."""
    path = Path(path)
    queries: dict[str, str] = {}
    candidates: dict[str, list[str]] = {}
    qrels: dict[str, dict[str, int]] = {}
    texts: dict[str, dict[str, str]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not record["query"].strip():
                raise ValueError(f"{where}: each line needs a non-empty string 'query'")
            items = record.get("candidates")
            if not isinstance(items, list) or not items:
                raise ValueError(f"{where}: 'candidates' must be a non-empty list of {{'id': ..., 'text': ...}}")
            relevance = record.get("relevance", {})
            if not isinstance(relevance, dict):
                raise ValueError(f"{where}: 'relevance' must map candidate ids to integer grades")
            qid = str(record.get("id", f"line{number}"))
            if qid in queries:
                raise ValueError(f"{where}: query id {qid!r} repeats an earlier line")
            per_query: dict[str, str] = {}
            for index, item in enumerate(items):
                if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}: candidate {index} needs an 'id' and a string 'text'")
                doc_id = str(item["id"])
                if doc_id in per_query:
                    raise ValueError(f"{where}: candidate id {doc_id!r} repeats within the query")
                per_query[doc_id] = item["text"]
            unknown = [d for d in relevance if str(d) not in per_query]
            if unknown:
                raise ValueError(f"{where}: 'relevance' names ids that are not candidates: {unknown[:3]}")
            try:
                grades = {str(d): int(g) for d, g in relevance.items()}
            except (TypeError, ValueError):
                raise ValueError(f"{where}: relevance grades must be integers (a click counts as 1)") from None
            queries[qid], candidates[qid], qrels[qid], texts[qid] = record["query"], list(per_query), grades, per_query
            if max_queries is not None and len(queries) >= max_queries:
                break
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return FitSource(
        name=path.stem, queries=queries, candidates=candidates, qrels=qrels,
        passages=lambda qid, ids: [texts[qid][d] for d in ids],
        origin=portable_path(path),
    )


def beir_source(name_or_path: str, top_k: int = 20, max_queries: int | None = None,
                data_dir: str | None = None, max_words: int = 100, instruction: str | None = "auto") -> FitSource:
    """A BEIR-layout folder's fit split: the protocol's for a protocol set, else ``qrels/train.tsv``.

    ``instruction="auto"`` takes the protocol's wording for a protocol set (``question`` for
    the multi-hop QA sets) and ``relevance`` otherwise; ``None`` keeps the fit's own prompt.
    """
    from ..eval.beir import load_beir, resolve_data_dir
    from ..eval.candidates import build_candidates
    from ..eval.protocol import PROTOCOL, Role, instruction_for, protocol_queries, select_queries

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
    candidates = build_candidates(dataset, qids, top_k)
    return FitSource(
        name=name, queries={q: dataset.queries[q] for q in qids}, candidates=candidates,
        qrels={q: dataset.qrels.get(q, {}) for q in qids},
        passages=lambda qid, ids: dataset.passages(ids, max_words),
        origin=portable_path(folder), key={"max_words": max_words}, instruction=instruction,
    )


def eval_set_source(eval_set, instruction: str | None = "auto") -> FitSource:
    """A prepared labelled set (:class:`routehead_rag.eval.harness.EvalSet`) as a fit source."""
    from ..eval.protocol import instruction_for

    dataset = eval_set.dataset
    return FitSource(
        name=dataset.name, queries={q: dataset.queries[q] for q in eval_set.qids},
        candidates={q: eval_set.candidates[q] for q in eval_set.qids},
        qrels={q: dataset.qrels.get(q, {}) for q in eval_set.qids},
        passages=lambda qid, ids: eval_set.passages(qid, ids), origin=portable_path(dataset.path),
        key={"max_words": eval_set.max_words},
        instruction=instruction_for(instruction, dataset.name) if instruction is not None else None,
    )
