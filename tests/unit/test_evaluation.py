"""Extraction cache: one pass per query, reused by every strategy, resumable, never trusting a bad file."""

import pytest
import torch

from routehead_rag.engine.scorer import AttentionScorer
from routehead_rag.offline.extraction import extract
from tests.tiny_models import tiny_backbone

QUERIES = {"q1": "moon and sea", "q2": "stock prices", "q3": "five players"}
CORPUS = {f"d{i}": text for i, text in enumerate(["the moon pulls the sea", "stock prices fell", "two teams of five players", "bread recipe"])}
CANDIDATES = {q: ["d0", "d1", "d2", "d3"] for q in QUERIES}


class CountingScorer(AttentionScorer):
    calls = 0

    def head_scores_batch(self, items, batch_size=8, lora=None, differentiable=False):
        CountingScorer.calls += len(items)
        return super().head_scores_batch(items, batch_size, lora, differentiable)


@pytest.fixture
def scorer():
    CountingScorer.calls = 0
    return CountingScorer(tiny_backbone("llama"))


def passages_of(qid, ids):
    return [CORPUS[i] for i in ids]


def test_cache_is_reused_and_resumes(scorer, tmp_path):
    first = extract(scorer, "tiny", QUERIES, {"q1": CANDIDATES["q1"]}, passages_of, tmp_path)
    assert scorer.calls == 1
    everything = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path)  # resumes: q1 cached
    assert scorer.calls == 3
    torch.testing.assert_close(everything["q1"].real, first["q1"].real)
    extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path)
    assert scorer.calls == 3  # all cached


def test_changed_candidates_or_settings_are_not_served_from_cache(scorer, tmp_path):
    extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path)
    reordered = {q: list(reversed(ids)) for q, ids in CANDIDATES.items()}
    extract(scorer, "tiny", QUERIES, reordered, passages_of, tmp_path)
    assert scorer.calls == 6
    extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, key_extra={"max_words": 5})
    assert scorer.calls == 9


def test_corrupt_cache_file_is_recomputed(scorer, tmp_path):
    extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path)
    for path in (tmp_path / "extractions").rglob("*.pt"):
        path.write_bytes(b"not a tensor file")
    again = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path)
    assert scorer.calls == 6
    assert set(again) == set(QUERIES)
