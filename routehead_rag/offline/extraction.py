"""The extraction cache: every head's passage scores of each labelled query, computed once.

``fit``, ``eval``, ``select-heads`` and the benchmarks all score strategies from one
all-heads pass per query.  Tensors are cached on disk per (backbone fingerprint, dtype,
prompt and scoring settings, source name), one file per query, written atomically: an
interrupted extraction resumes where it stopped.  A file is reused only if its query id,
candidate ids and the sha256 of the exact texts scored (query and passages) match, so an
edited log or corpus is re-extracted even when its size is unchanged, and a data folder
can move without invalidating anything.

Storage precision (``storage_dtype``): each file holds the raw scores and the debiased ones
(raw minus content-free, taken in the scorer's precision first), rounded to ``float16`` (half
the disk, and what ``fit`` keeps in memory; ``benchmarks/results/archive/storage_precision.md`` measured that
fit results do not move beyond noise) or ``float32``. Every extraction, fresh or cached, is
handed out rounded the same way, so a resumed run equals an uninterrupted one; a file is
reused only if it holds at least the precision asked for (a float16 file is recomputed for a
float32 request; a float32 file is rounded for a float16 one).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..engine.scorer import AttentionScorer

EXTRACTION_FORMAT = 2  # 2: passages keep their line breaks (one word cut); files keyed on content
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class QueryExtraction:
    """Per-head scores of one query's candidates (caller's candidate order)."""

    qid: str
    doc_ids: list[str]
    real: torch.Tensor  # [layer, head, passage] float32 (values at the storage precision)
    debiased: torch.Tensor  # [layer, head, passage] real minus content-free, float32 (same)

    @property
    def content_free(self) -> torch.Tensor:
        return self.real - self.debiased


def storage_dtype_of(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a storage precision name (``"float16"`` or ``"float32"``)."""
    if isinstance(name, torch.dtype) and name in STORAGE_DTYPES.values():
        return name
    if isinstance(name, str) and name in STORAGE_DTYPES:
        return STORAGE_DTYPES[name]
    raise ValueError(f"storage_dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}")


def _rounded(real: torch.Tensor, content_free: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, debiased)`` at the storage precision: the difference is taken before rounding."""
    debiased = real.float() - content_free.float()
    return real.to(storage), debiased.to(storage)


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


def content_sha256(query: str, passages: Sequence[str]) -> str:
    """sha256 of the exact texts one extraction scored (query, then passages, in order)."""
    digest = hashlib.sha256()
    for text in (query, *passages):
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _query_file(folder: Path, qid: str) -> Path:
    return folder / f"{hashlib.sha1(qid.encode()).hexdigest()[:20]}.pt"


def _load_query_file(path: Path, qid: str, doc_ids: list[str], content: str,
                     storage: torch.dtype) -> QueryExtraction | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("qid") != qid or data.get("doc_ids") != doc_ids or data.get("content_sha256") != content:
            return None
        real = data["real"]
        if torch.finfo(real.dtype).eps > torch.finfo(storage).eps:
            return None  # stored coarser than asked for
        stored = data.get("debiased", data.get("calibrated"))  # "calibrated": the name before format 3
        if stored is not None:
            real, debiased = real.to(storage), stored.to(storage)
        else:  # files written before the debiased scores were stored (float32, raw and content-free)
            real, debiased = _rounded(real, data["content_free"], storage)
        return QueryExtraction(qid, doc_ids, real.float(), debiased.float())
    except Exception:  # a corrupt or foreign file is recomputed, never trusted
        return None


@dataclass(frozen=True)
class PendingQuery:
    """One query whose extraction is not in the cache yet: what a worker needs to compute it."""

    qid: str
    query: str
    passages: list[str]


class LocalExtractor:
    """Computes pending extractions with the scorer in this process, ``batch_size`` prompts per forward
    pass (:meth:`AttentionScorer.head_scores_batch`); ``lora``: a LoRA switched on where its scope says
    (the cache key must then name it: :func:`extraction_key`'s ``extra``, as
    :func:`routehead_rag.fit.pipeline.extract_sources` does)."""

    def __init__(self, batch_size: int = 1, lora=None):
        self.batch_size = batch_size
        self.lora = lora

    def run(self, scorer: AttentionScorer, pending: Iterable[PendingQuery]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        items = iter(pending)
        while chunk := list(itertools.islice(items, self.batch_size)):
            scored = scorer.head_scores_batch([(i.query, i.passages, None) for i in chunk], self.batch_size, self.lora)
            for item, scores in zip(chunk, scored):
                content_free = scores.content_free if scores.content_free is not None else torch.zeros_like(scores.real)
                yield item.qid, scores.real, content_free


def iter_extractions(
    scorer: AttentionScorer,
    dataset_name: str,
    queries: dict[str, str],
    candidates: dict[str, list[str]],
    passages_of: Callable[[str, list[str]], list[str]],
    cache_dir: Path | None,
    progress: Callable[[int], None] | None = None,
    key_extra: dict | None = None,
    executor=None,
    storage_dtype: str = "float16",
) -> Iterator[QueryExtraction]:
    """Every query's all-head scores, from the cache where present, as each becomes available (cached
    queries first, then computed ones in the order the executor finishes them).

    Streams: passage texts are read when a query is checked against the cache and again when it is
    computed, never held for the whole set; a caller that keeps only what it needs of each
    extraction keeps memory per query to that. See :func:`extract` for the rest."""
    storage = storage_dtype_of(storage_dtype)
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir) / "extractions" / extraction_key(scorer, dataset_name, key_extra)
        folder.mkdir(parents=True, exist_ok=True)
    for qid in candidates:  # every query's token budget first: cheap, and before any model work
        try:
            scorer.check_query(queries[qid])
        except ValueError as err:
            raise ValueError(f"{dataset_name}: query {qid!r}: {err}") from None
    started = time.time()
    contents: dict[str, str] = {}  # qid -> sha256 of the texts, for the queries still to compute
    for qid, doc_ids in candidates.items():
        doc_ids = list(doc_ids)
        content = content_sha256(queries[qid], passages_of(qid, doc_ids))
        cached = _load_query_file(_query_file(folder, qid), qid, doc_ids, content, storage) if folder else None
        if cached is None:
            contents[qid] = content
            continue
        if progress is not None:
            progress(1)
        yield cached

    def pending() -> Iterator[PendingQuery]:
        for qid in contents:
            yield PendingQuery(qid, queries[qid], passages_of(qid, list(candidates[qid])))

    for qid, real, content_free in (executor or LocalExtractor()).run(scorer, pending()):
        doc_ids = list(candidates[qid])
        real, debiased = _rounded(real, content_free, storage)
        if folder is not None:
            atomic_write(_query_file(folder, qid), lambda path: torch.save(
                {"qid": qid, "doc_ids": doc_ids, "content_sha256": contents[qid], "real": real, "debiased": debiased},
                path))
        if progress is not None:
            progress(1)
        yield QueryExtraction(qid, doc_ids, real.float(), debiased.float())
    if folder is not None:
        _remove_stale_temporaries(folder, before=started)


def extract(
    scorer: AttentionScorer,
    dataset_name: str,
    queries: dict[str, str],
    candidates: dict[str, list[str]],
    passages_of: Callable[[str, list[str]], list[str]],
    cache_dir: Path | None,
    progress: Callable[[int], None] | None = None,
    key_extra: dict | None = None,
    executor=None,
    storage_dtype: str = "float16",
) -> dict[str, QueryExtraction]:
    """All-head scores of every query's candidates, from the cache where present.

    ``passages_of(qid, doc_ids)`` returns the passage texts (for a BEIR set already cut as the
    protocol says; the scorer applies the same word cut, which then changes nothing).
    ``progress(n)`` is called after each query. What is not cached is computed by ``executor``
    (default: :class:`LocalExtractor` on ``scorer``; :class:`routehead_rag.offline.distributed.RayExtractor`
    spreads it over a Ray cluster) and written to the cache as each query arrives, so an
    interrupted run resumes, with or without Ray. The result is in ``candidates`` order whatever
    order the queries were computed in (:func:`iter_extractions` streams them instead).
    ``storage_dtype`` is the precision kept (see the module docstring).
    """
    results = {
        item.qid: item
        for item in iter_extractions(scorer, dataset_name, queries, candidates, passages_of, cache_dir, progress,
                                     key_extra, executor, storage_dtype)
    }
    return {qid: results[qid] for qid in candidates}


def _remove_stale_temporaries(folder: Path, before: float) -> None:
    """Temporary files a killed writer left behind (older than this run: never a live writer's)."""
    for path in [*folder.glob(".tmp-*.pt"), *folder.glob(".*.pt.tmp-*")]:
        try:
            if path.stat().st_mtime < before:
                path.unlink()
        except FileNotFoundError:
            pass  # its writer just finished (or another run cleaned it)
