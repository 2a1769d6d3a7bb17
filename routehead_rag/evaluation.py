"""Evaluation harness: extract per-head scores once, score every strategy from them.

Per-head score tensors are cached on disk per (backbone fingerprint, dataset,
prompt and scoring settings), one file per query and candidate list, written
atomically: an interrupted extraction resumes where it stopped, and every
strategy (``all``, ``static``, later ``routed``) is scored from the same pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .heads import Head
from .scoring import AttentionScorer, aggregate

EXTRACTION_FORMAT = 1


@dataclass
class QueryExtraction:
    """Per-head scores of one query's candidates (caller's candidate order)."""

    qid: str
    doc_ids: list[str]
    real: torch.Tensor  # [layer, head, passage]
    content_free: torch.Tensor  # [layer, head, passage]

    @property
    def calibrated(self) -> torch.Tensor:
        return self.real - self.content_free


def extraction_key(scorer: AttentionScorer, dataset_name: str, extra: dict | None = None) -> str:
    """A stable hash of the settings that change the extracted tensors.

    The candidate list is not part of it: each query's file records its own doc ids and is
    recomputed when they differ, so a run over more queries resumes from a smaller one.
    """
    digest = hashlib.sha256()
    payload = {
        "format": EXTRACTION_FORMAT,
        "backbone": scorer.backbone.fingerprint(),
        "backbone_name": str(scorer.backbone.name),
        "dtype": str(scorer.backbone.dtype),
        "scoring": scorer.config.model_dump(mode="json"),
        "dataset": dataset_name,
        "extra": extra or {},
    }
    digest.update(json.dumps(payload, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def dataset_key(path: str | Path, max_words: int) -> dict:
    """The ``key_extra`` of a BEIR-layout set's extraction: shared by ``eval``, ``fit`` and the benchmarks."""
    return {"max_words": max_words, "path": str(Path(path).resolve())}


def _query_file(folder: Path, qid: str) -> Path:
    return folder / f"{hashlib.sha1(qid.encode()).hexdigest()[:20]}.pt"


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_query_file(path: Path, qid: str, doc_ids: list[str]) -> QueryExtraction | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt file is recomputed, never trusted
        return None
    if data.get("qid") != qid or data.get("doc_ids") != doc_ids:
        return None
    return QueryExtraction(qid, doc_ids, data["real"], data["content_free"])


def extract(
    scorer: AttentionScorer,
    dataset_name: str,
    queries: dict[str, str],
    candidates: dict[str, list[str]],
    passages_of: Callable[[str, list[str]], list[str]],
    cache_dir: Path | None,
    progress: Callable[[int], None] | None = None,
    key_extra: dict | None = None,
) -> dict[str, QueryExtraction]:
    """All-head scores of every query's candidates, from the cache where present.

    ``passages_of(qid, doc_ids)`` returns the passage texts (already cut as the protocol says;
    the scorer's own word cut then changes nothing).  ``progress(n)`` is called after
    each query.
    """
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / "extractions" / extraction_key(scorer, dataset_name, key_extra)
        folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, QueryExtraction] = {}
    for qid, doc_ids in candidates.items():
        cached = _load_query_file(_query_file(folder, qid), qid, doc_ids) if folder else None
        if cached is None:
            scores = scorer.head_scores(queries[qid], passages_of(qid, doc_ids), heads=None)
            content_free = scores.content_free if scores.content_free is not None else torch.zeros_like(scores.real)
            cached = QueryExtraction(qid, list(doc_ids), scores.real, content_free)
            if folder is not None:
                _atomic_torch_save(
                    {"qid": qid, "doc_ids": list(doc_ids), "real": scores.real, "content_free": content_free},
                    _query_file(folder, qid),
                )
        results[qid] = cached
        if progress is not None:
            progress(1)
    return results


def strategy_run(
    extractions: dict[str, QueryExtraction], heads: Sequence[Head] | None, calibrate: bool = True
) -> dict[str, dict[str, float]]:
    """``{qid: {doc_id: score}}`` summing ``heads`` (``None``: all heads, i.e. ICR)."""
    from .metrics import ranking_to_run

    run: dict[str, dict[str, float]] = {}
    for qid, extraction in extractions.items():
        tensor = extraction.calibrated if calibrate else extraction.real
        scores = aggregate(tensor, heads).tolist()
        run.update(ranking_to_run(qid, extraction.doc_ids, scores))
    return run


def routed_run(
    extractions: dict[str, QueryExtraction], heads_of: dict[str, Sequence[Head]]
) -> dict[str, dict[str, float]]:
    """``{qid: {doc_id: score}}`` summing each query's own heads (``heads_of[qid]``, e.g. routed)."""
    from .metrics import ranking_to_run

    run: dict[str, dict[str, float]] = {}
    for qid, extraction in extractions.items():
        run.update(ranking_to_run(qid, extraction.doc_ids, aggregate(extraction.calibrated, heads_of[qid]).tolist()))
    return run


def order_run(rankings: dict[str, Iterable[str]]) -> dict[str, dict[str, float]]:
    """A run from ordered doc-id lists (a first-stage baseline)."""
    from .metrics import ranking_to_run

    run: dict[str, dict[str, float]] = {}
    for qid, doc_ids in rankings.items():
        run.update(ranking_to_run(qid, list(doc_ids)))
    return run
