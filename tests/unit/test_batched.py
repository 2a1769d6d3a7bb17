"""Batched scoring equals the one-at-a-time path: several prompts per pass, the real and N/A query parts
side by side on one prefix cache, padded with the right masks (float32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from routehead_rag import RouteHeadReranker
from routehead_rag.engine.scorer import AttentionScorer, ScoringConfig
from routehead_rag.heads import Head
from routehead_rag.offline.extraction import LocalExtractor, PendingQuery
from tests.tiny_models import ARCHS, tiny_backbone

ITEMS = [
    ("what moves the sea", ["the moon pulls the sea", "stock prices fell", "tides follow the moon and the sea every day"], None),
    ("players", ["five players a team", "bread"], [Head(1, 2), Head(0, 0)]),
    ("a longer query about rain clouds and storms", ["rain fell all night", "the bridge was gone", "x",
                                                     "water boils at 100 degrees at sea level"], [Head(0, 1)]),
    ("sea", ["the moon"], None),
]


def assert_same(single, batched):
    known = ~torch.isnan(single.real)
    assert torch.equal(known, ~torch.isnan(batched.real))
    torch.testing.assert_close(batched.real[known], single.real[known], atol=1e-5, rtol=0)
    if single.content_free is not None:
        torch.testing.assert_close(batched.content_free[known], single.content_free[known], atol=1e-5, rtol=0)
    if single.aggregated is not None:
        torch.testing.assert_close(batched.aggregated, single.aggregated, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", [ScoringConfig(), ScoringConfig(max_prompt_tokens=130),  # windows
                                    ScoringConfig(mask_outliers=True), ScoringConfig(subtract_content_free=False)],
                         ids=["plain", "windows", "outlier-mask", "uncalibrated"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_head_scores_equal_one_at_a_time(arch, config, batch_size):
    scorer = AttentionScorer(tiny_backbone(arch), config)
    for (query, passages, heads), batched in zip(ITEMS, scorer.head_scores_batch(ITEMS, batch_size=batch_size)):
        assert_same(scorer.head_scores(query, passages, heads), batched)


def test_rank_batch_equals_rank():
    backbone = tiny_backbone("llama")
    reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=["L1.H2", "L0.H1"])
    queries = [q for q, _, _ in ITEMS] + ["empty list"]
    documents = [p for _, p, _ in ITEMS] + [[]]
    batched = reranker.rank_batch(queries, documents, top_k=3, batch_size=4)
    for query, docs, results in zip(queries, documents, batched):
        single = reranker.rank(query, docs, top_k=3)
        assert [r.index for r in results] == [r.index for r in single]
        assert [r.score for r in results] == pytest.approx([r.score for r in single], abs=1e-5)
    with pytest.raises(ValueError, match="got 1 lists for 2 queries"):
        reranker.rank_batch(["a", "b"], [["x"]])
    with pytest.raises(TypeError, match="got str"):
        reranker.rank_batch(["a"], "x")
    with pytest.raises(ValueError, match="got 2 for 1 queries"):
        reranker.rank_batch(["a"], [["x"]], first_stage_scores=[None, None])
    with pytest.raises(ValueError, match="batch_size must be a positive integer or None \\(automatic\\), got 0"):
        reranker.rank_batch(["a"], [[]], batch_size=0)
    with pytest.raises(ValueError, match="query is empty"):
        reranker.rank_batch(["fine", " "], [["x"], ["y"]])


def test_batched_extraction_equals_one_at_a_time():
    scorer = AttentionScorer(tiny_backbone("qwen2"))
    pending = [PendingQuery(f"q{i}", query, list(passages)) for i, (query, passages, _) in enumerate(ITEMS)]
    single = {qid: (real, free) for qid, real, free in LocalExtractor().run(scorer, pending)}
    for qid, real, free in LocalExtractor(batch_size=3).run(scorer, pending):
        torch.testing.assert_close(real, single[qid][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(free, single[qid][1], atol=1e-5, rtol=0)
