"""Every fit query's per-head scores, pooled across its sources (training side): one cached all-heads
extraction per query (:mod:`routehead_rag.offline.extraction`), in each source's prompt wording, with what the
fit needs beside them (candidates, grades, first-stage signal, train/dev groups) and, for a router with a
bi-encoder, its cosines (:func:`passage_cosines`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..engine.lora import Lora, lora_digest
from ..engine.scorer import AttentionScorer, ScoringConfig
from ..fusion import first_stage_signal
from ..offline.extraction import LocalExtractor, content_sha256, iter_extractions, storage_dtype_of
from .labelled import LabelledSet, build_labelled_set
from .sources import FitSource


@dataclass
class PooledExtractions:
    """Every fit query's debiased per-head scores, across sources, keyed ``"<source>/<qid>"``."""

    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # [layer, head, passage]
    doc_ids: dict[str, list[str]] = field(default_factory=dict)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    first_stage: dict[str, list[float]] = field(default_factory=dict)  # per candidate: the first-stage signal
    groups: dict[str, str] = field(default_factory=dict)  # the query's train/dev group, "<source>/<group>"

    @classmethod
    def of_sources(cls, sources: Sequence[FitSource]) -> PooledExtractions:
        """Every query's candidates, grades, text and first-stage order (no scores yet): known before extraction."""
        pooled = cls()
        for source in sources:
            for qid in source.candidates:
                key = f"{source.name}/{qid}"
                # the source's own objects, not copies (nothing here changes them): per-query memory stays what
                # the source already holds
                pooled.doc_ids[key] = source.candidates[qid]
                pooled.qrels[key] = source.qrels.get(qid, {})
                pooled.texts[key] = source.queries[qid]
                scores = source.first_stage_scores.get(qid) if source.first_stage_scores else None
                pooled.first_stage[key] = first_stage_signal(len(source.candidates[qid]), scores).tolist()
                pooled.groups[key] = f"{source.name}/{source.groups.get(qid, qid) if source.groups else qid}"
        return pooled

    def labelled_set(self, depth: int = 10, release: bool = False) -> LabelledSet:
        """The padded labelled set; ``release`` hands each query's scores over as it is copied in
        (``scores`` is empty afterwards), so the two copies never coexist."""
        return build_labelled_set(self.scores, self.doc_ids, self.qrels, depth=depth, consume=release)

    def first_stage_signal(self, data: LabelledSet) -> torch.Tensor:
        """``[query, passage]`` raw first-stage signal of each row of ``data`` (the scores, else minus the rank)."""
        signal = torch.zeros(data.gains.shape, dtype=torch.float64)
        for row, key in enumerate(data.qids):
            values = self.first_stage[key]
            signal[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
        return signal


def extract_sources(
    backbone,
    sources: Sequence[FitSource],
    scoring: ScoringConfig,
    cache_dir: str | Path | None,
    progress: Callable[[str, int, int], None] | None = None,
    executor=None,
    storage_dtype: str = "float16",
    pooled: PooledExtractions | None = None,
    sink: Callable[[str, torch.Tensor], None] | None = None,
    lora: Lora | None = None,
) -> PooledExtractions:
    """One cached all-heads extraction per query of every source, in each source's prompt wording.

    ``executor`` computes what is not cached (default: in this process; see
    :mod:`routehead_rag.offline.distributed` for Ray); ``storage_dtype`` is the precision the cache and
    the pooled scores keep (:mod:`routehead_rag.offline.extraction`). Each query's debiased scores go to
    ``sink(key, scores)`` as they arrive (e.g. :meth:`LabelledSetBuilder.put`, so no more than one
    query's scores is held), else into the result's ``scores`` (in candidates order). ``pooled``: the
    sources' :meth:`PooledExtractions.of_sources`, if the caller made it already. ``lora``: score with
    this LoRA on where its scope says (cached apart, keyed on its weights' sha256; computed in this
    process)."""
    report = progress or (lambda stage, done, total: None)
    lora_key: dict = {}
    if lora is not None:
        if executor is not None and not isinstance(executor, LocalExtractor):
            raise ValueError(f"extraction with a LoRA runs in this process, not on {type(executor).__name__}: "
                             "pass executor=None (or a LocalExtractor)")
        executor = LocalExtractor(executor.batch_size if executor is not None else 1, lora)
        lora_key = {"lora": lora_digest(lora), "lora_scope": lora.config.scope}
    scorers: dict[str | None, AttentionScorer] = {}
    pooled = pooled if pooled is not None else PooledExtractions.of_sources(sources)
    arrived: dict[str, torch.Tensor] = {}
    keep = sink or arrived.__setitem__
    storage = storage_dtype_of(storage_dtype)
    total, done = sum(len(s.candidates) for s in sources), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        report("extract", done, total)

    for source in sources:
        if source.instruction not in scorers:
            scorers[source.instruction] = AttentionScorer(
                backbone, scoring if source.instruction is None else scoring.with_instruction(source.instruction)
            )
        for extraction in iter_extractions(
            scorers[source.instruction], source.name, source.queries, source.candidates, source.passages,
            Path(cache_dir) if cache_dir is not None else None, progress=tick,
            key_extra={**source.key, **lora_key}, executor=executor,
            storage_dtype=storage_dtype,
        ):  # only the debiased scores of each query are kept, at the storage precision (exact: already rounded)
            keep(f"{source.name}/{extraction.qid}", extraction.debiased.to(storage))
    if sink is None:  # candidates order, whatever order the extractions arrived in
        pooled.scores = {key: arrived.pop(key) for key in pooled.doc_ids}
    return pooled


COSINE_FORMAT = 1


def cosine_cache_folder(encoder, cache_dir: str | Path) -> Path:
    """Where ``encoder``'s cosines are cached under ``cache_dir``: one folder per model and the dtype it runs in
    (loading it if it is not loaded yet, to know that dtype)."""
    payload = {"format": COSINE_FORMAT, "model": encoder.model, "dtype": str(encoder.run_dtype())}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / "cosines" / digest


def cached_cosines(encoder, query: str, passages: Sequence[str], folder: Path | None) -> torch.Tensor:
    """``encoder.cosines(query, passages)`` ``[passage]`` float64, read from (or written to) ``folder``, one file
    per exact query and passage texts (:func:`~routehead_rag.offline.extraction.content_sha256`); ``None``: no
    cache. A file that does not load, or holds the wrong number of cosines, is recomputed."""
    if folder is None:
        return encoder.cosines(query, passages)
    path = folder / f"{content_sha256(query, passages)}.pt"
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.dtype == torch.float64 and tuple(stored.shape) == (len(passages),):
                return stored
        except Exception:  # a corrupt or foreign file is recomputed, never trusted
            pass
    cosines = encoder.cosines(query, passages)
    atomic_write(path, lambda temporary: torch.save(cosines, temporary))
    return cosines


def passage_cosines(bi_encoder, sources: Sequence[FitSource], pooled: PooledExtractions, data: LabelledSet,
                    rows: Sequence[int], progress=None, cache_dir: str | Path | None = None) -> torch.Tensor:
    """``[query, passage]`` float64: the bi-encoder's cosine of each candidate with its query, for the ``rows`` of
    ``data`` (0 elsewhere and in padding). ``bi_encoder``: a :class:`~routehead_rag.bi_encoder.BiEncoderConfig`;
    ``cache_dir``: cache them there (:func:`cached_cosines`), so a refit or a second fit on the same queries
    reads them instead of running the bi-encoder again."""
    from ..bi_encoder import load_bi_encoder

    encoder = load_bi_encoder(bi_encoder.model)
    folder = None if cache_dir is None else cosine_cache_folder(encoder, cache_dir)
    source_of = {source.name: source for source in sources}
    out = torch.zeros(data.gains.shape, dtype=torch.float64)
    for done, row in enumerate(rows, start=1):
        key = data.qids[row]
        name, qid = key.split("/", 1)
        ids = pooled.doc_ids[key]
        out[row, : len(ids)] = cached_cosines(encoder, pooled.texts[key], source_of[name].passages(qid, ids), folder)
        if progress is not None:
            progress("bi-encoder", done, len(rows))
    return out
