"""Head search: the batched nDCG equals ir_measures, and the search finds a planted head set."""

import random

import pytest
import torch

from routehead_rag.eval.metrics import per_query, ranking_to_run
from routehead_rag.fit.labelled import build_labelled_set
from routehead_rag.fit.search import SearchConfig, search_heads
from routehead_rag.heads import Head
from routehead_rag.measures import batched_ndcg


def test_batched_ndcg_equals_ir_measures():
    rng = random.Random(0)
    scores, doc_ids, qrels = {}, {}, {}
    for q in range(40):
        n = rng.choice([5, 10, 20])
        qid = f"q{q}"
        doc_ids[qid] = [f"{qid}-d{i}" for i in range(n)]
        values = torch.tensor([float(rng.choice([0, 1, 1, 2, 3])) for _ in range(n)])  # many ties
        scores[qid] = values.reshape(1, 1, n)
        judged = {d: rng.choice([0, 0, 1, 2, 3]) for d in doc_ids[qid] if rng.random() < 0.5}
        judged[f"{qid}-unretrieved"] = 2  # judged but not a candidate: counts in the ideal ranking
        qrels[qid] = judged
    data = build_labelled_set(scores, doc_ids, qrels)
    ours = batched_ndcg(data.scores[:, 0, :], data.gains, data.valid, data.ideal_dcg)
    run = {}
    for qid in data.qids:
        run.update(ranking_to_run(qid, doc_ids[qid], scores[qid][0, 0].tolist()))
    reference = per_query(run, qrels, "nDCG@10", qids=data.qids)
    for row, qid in enumerate(data.qids):
        assert ours[row].item() == pytest.approx(reference[qid], abs=1e-9), qid


def planted_set(num_queries=30, seed=0):
    """Heads L0.H1 and L1.H2 each half-find the relevant passage; only their sum ranks it first."""
    generator = torch.Generator().manual_seed(seed)
    scores, doc_ids, qrels = {}, {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        tensor = torch.rand(2, 4, 10, generator=generator) * 1e-3  # weak noise everywhere
        relevant, decoy_a, decoy_b = 7, 2, 4
        tensor[0, 1, relevant] += 1.0
        tensor[0, 1, decoy_a] += 1.2
        tensor[1, 2, relevant] += 1.0
        tensor[1, 2, decoy_b] += 1.2
        scores[qid] = tensor
        doc_ids[qid] = [f"d{i}" for i in range(10)]
        qrels[qid] = {f"d{relevant}": 1}
    return scores, doc_ids, qrels


def test_search_finds_the_planted_pair():
    data = build_labelled_set(*planted_set())
    result = search_heads(data, SearchConfig(pool_size=8, max_heads=4, pool_weight=0.1))
    for row in range(len(result.qids)):
        assert set(result.heads_of(row)) == {Head(0, 1), Head(1, 2)}
    assert torch.allclose(result.query_ndcg, torch.ones_like(result.query_ndcg))


def test_without_pool_quality_a_lucky_noise_head_can_win():
    """The robustness term matters: per-query nDCG alone overfits to chance (a noise head
    that happens to rank the relevant passage first); blending in pool-wide quality does not."""
    data = build_labelled_set(*planted_set())
    planted = {Head(0, 1), Head(1, 2)}
    plain = search_heads(data, SearchConfig(pool_size=8, max_heads=4, pool_weight=0.0))
    blended = search_heads(data, SearchConfig(pool_size=8, max_heads=4, pool_weight=0.1))
    plain_hits = sum(set(plain.heads_of(r)) == planted for r in range(len(plain.qids)))
    blended_hits = sum(set(blended.heads_of(r)) == planted for r in range(len(blended.qids)))
    assert blended_hits == len(blended.qids) > plain_hits


def test_queries_without_relevant_documents_are_left_out():
    scores, doc_ids, qrels = planted_set(3)
    qrels["q1"] = {"d0": 0}
    data = build_labelled_set(scores, doc_ids, qrels)
    assert data.qids == ["q0", "q2"]
    with pytest.raises(ValueError, match="no query has a relevant"):
        build_labelled_set(scores, doc_ids, {q: {} for q in scores})


def test_chunked_search_and_quality_equal_one_piece(monkeypatch):
    """Work batched over queries runs in pieces of QUERY_CHUNK queries: the same labels and qualities."""
    import routehead_rag.fit.labelled as labelled

    generator = torch.Generator().manual_seed(3)
    scores = {f"q{q}": torch.rand(2, 4, 10, generator=generator) for q in range(23)}
    doc_ids = {q: [f"d{i}" for i in range(10)] for q in scores}
    qrels = {q: {f"d{i % 10}": 1 + i % 2} for i, q in enumerate(scores)}
    data = build_labelled_set(scores, doc_ids, qrels)
    config = SearchConfig(pool_size=6, max_heads=3)
    whole = search_heads(data, config)
    quality = labelled.single_head_quality(data)
    rows = torch.tensor([5, 1, 17, 8, 22, 0, 3])
    quality_rows = labelled.single_head_quality(data, rows=rows)
    monkeypatch.setattr(labelled, "QUERY_CHUNK", 4)
    assert len(list(data.chunks(4))) == 6
    pieces = search_heads(data, config)
    assert torch.equal(pieces.labels, whole.labels) and pieces.pool == whole.pool
    torch.testing.assert_close(pieces.query_ndcg, whole.query_ndcg, atol=1e-12, rtol=0)
    torch.testing.assert_close(labelled.single_head_quality(data), quality, atol=1e-12, rtol=0)
    torch.testing.assert_close(labelled.single_head_quality(data, rows=rows), quality_rows, atol=1e-12, rtol=0)
    torch.testing.assert_close(quality_rows, labelled.single_head_quality(data.subset(rows)), atol=1e-12, rtol=0)
    # sum_heads copies only the picked heads and equals summing the full rows
    heads = torch.tensor([[0, 3], [7, 7]])
    torch.testing.assert_close(data.sum_heads(heads, torch.tensor([2, 9])),
                               data.scores[[2, 9]].gather(1, heads[:, :, None].expand(-1, -1, 10)).sum(1))
