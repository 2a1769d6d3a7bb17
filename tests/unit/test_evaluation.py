"""Extraction cache: one pass per query, reused by every strategy, resumable, never trusting a bad file."""

import pytest
import torch

from routehead_rag.engine.scorer import AttentionScorer, aggregate
from routehead_rag.eval.harness import strategy_run
from routehead_rag.fit.extraction import extract
from routehead_rag.heads import Head
from routehead_rag.strategy import AllHeads, StaticHeads
from tests.tiny_models import tiny_backbone

QUERIES = {"q1": "moon and sea", "q2": "stock prices", "q3": "five players"}
CORPUS = {f"d{i}": text for i, text in enumerate(["the moon pulls the sea", "stock prices fell", "two teams of five players", "bread recipe"])}
CANDIDATES = {q: ["d0", "d1", "d2", "d3"] for q in QUERIES}


class CountingScorer(AttentionScorer):
    calls = 0

    def head_scores(self, query, passages, heads=None, adapter=None, differentiable=False):
        CountingScorer.calls += 1
        return super().head_scores(query, passages, heads, adapter, differentiable)


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


def test_strategy_runs_rank_by_the_head_sums(scorer, tmp_path):
    extractions = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, None)
    heads = [Head(1, 0), Head(0, 2)]
    run = strategy_run(extractions, StaticHeads(tuple(heads)), None, QUERIES)
    for qid, extraction in extractions.items():
        scores = aggregate(extraction.calibrated, heads)
        best = extraction.doc_ids[int(scores.argmax())]
        assert max(run[qid], key=run[qid].get) == best
    icr = strategy_run(extractions, AllHeads(), None, QUERIES)
    assert set(icr) == set(QUERIES)
