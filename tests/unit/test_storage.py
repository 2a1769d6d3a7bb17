"""Storage precision of the extraction cache and an on-disk labelled set.

The reference is the scorer itself: a float16 extraction is the scorer's float32 scores rounded
once (the debiased difference taken before rounding), whether fresh or from the cache."""

import pytest
import torch

from routehead_rag.engine.scorer import AttentionScorer
from routehead_rag.fit.labelled import build_labelled_set, rank_heads, single_head_quality
from routehead_rag.fit.search import SearchConfig, search_heads
from routehead_rag.offline.extraction import _query_file, extract, extraction_key
from tests.tiny_models import tiny_backbone
from tests.unit.test_evaluation import CANDIDATES, QUERIES, CountingScorer, passages_of


@pytest.fixture
def scorer():
    CountingScorer.calls = 0
    return CountingScorer(tiny_backbone("llama"))


def stored_file(scorer, tmp_path, qid):
    return torch.load(_query_file(tmp_path / "extractions" / extraction_key(scorer, "tiny"), qid), weights_only=True)


def test_float16_cache_holds_the_scorers_scores_rounded_once(scorer, tmp_path):
    fresh = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path)
    cached = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path)
    assert CountingScorer.calls == len(QUERIES)  # the second run is all cache
    for qid in QUERIES:
        reference = AttentionScorer(scorer.backbone).head_scores(QUERIES[qid], passages_of(qid, CANDIDATES[qid]))
        assert torch.equal(fresh[qid].real, reference.real.half().float())
        assert torch.equal(fresh[qid].debiased, (reference.real - reference.content_free).half().float())
        assert torch.equal(cached[qid].real, fresh[qid].real) and torch.equal(cached[qid].debiased, fresh[qid].debiased)
        assert fresh[qid].real.dtype == torch.float32
        on_disk = stored_file(scorer, tmp_path, qid)
        assert on_disk["real"].dtype == on_disk["debiased"].dtype == torch.float16


def test_a_coarser_file_is_recomputed_and_a_finer_one_rounded(scorer, tmp_path):
    extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, storage_dtype="float16")
    full = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, storage_dtype="float32")
    assert CountingScorer.calls == 2 * len(QUERIES)  # float16 files cannot serve a float32 request
    reference = AttentionScorer(scorer.backbone).head_scores(QUERIES["q1"], passages_of("q1", CANDIDATES["q1"]))
    assert torch.equal(full["q1"].real, reference.real)
    assert torch.equal(full["q1"].debiased, reference.real - reference.content_free)
    assert stored_file(scorer, tmp_path, "q1")["real"].dtype == torch.float32
    half = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, storage_dtype="float16")
    assert CountingScorer.calls == 2 * len(QUERIES)  # a float32 file serves a float16 request, rounded
    assert torch.equal(half["q1"].debiased, full["q1"].debiased.half().float())


def test_files_of_the_earlier_layout_still_load(scorer, tmp_path):
    """Files written before the debiased scores were stored hold raw and content-free float32 scores."""
    full = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, storage_dtype="float32")
    path = _query_file(tmp_path / "extractions" / extraction_key(scorer, "tiny"), "q1")
    data = torch.load(path, weights_only=True)
    data["content_free"] = data["real"] - data.pop("debiased")
    torch.save(data, path)
    again = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, storage_dtype="float32")
    half = extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, storage_dtype="float16")
    assert CountingScorer.calls == len(QUERIES)
    torch.testing.assert_close(again["q1"].debiased, full["q1"].debiased, atol=1e-7, rtol=0)
    assert torch.equal(half["q1"].debiased, again["q1"].debiased.half().float())


def test_an_unknown_storage_precision_is_refused(scorer, tmp_path):
    with pytest.raises(ValueError, match="storage_dtype must be one of .*'bfloat16'"):
        extract(scorer, "tiny", QUERIES, CANDIDATES, passages_of, tmp_path, storage_dtype="bfloat16")


def planted(count=40, seed=5):
    generator = torch.Generator().manual_seed(seed)
    scores = {f"q{q}": torch.rand(3, 4, 7, generator=generator).half().float() for q in range(count)}
    doc_ids = {q: [f"d{i}" for i in range(7)] for q in scores}
    qrels = {q: {f"d{(i * 3) % 7}": 1 + i % 2, f"d{i % 7}": 1} for i, q in enumerate(scores)}
    return scores, doc_ids, qrels


def test_an_on_disk_float16_labelled_set_searches_as_the_float64_one(tmp_path):
    scores, doc_ids, qrels = planted()
    in_memory = build_labelled_set(scores, doc_ids, qrels)
    on_disk = build_labelled_set(dict(scores), doc_ids, qrels, dtype=torch.float16, on_disk=tmp_path)
    assert on_disk.scores.dtype == torch.float16 and on_disk.backing is not None
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing is left behind, even after a kill
    assert torch.equal(on_disk.scores.double(), in_memory.scores)
    config = SearchConfig(pool_size=6, max_heads=3)
    a, b = search_heads(in_memory, config), search_heads(on_disk, config)
    assert torch.equal(a.labels, b.labels) and a.pool == b.pool and torch.equal(a.query_ndcg, b.query_ndcg)
    assert torch.equal(single_head_quality(in_memory), single_head_quality(on_disk))
    assert rank_heads(in_memory) == rank_heads(on_disk)
    heads, rows = torch.tensor([[0, 5], [11, 2]]), torch.tensor([3, 30])
    assert torch.equal(in_memory.sum_heads(heads, rows), on_disk.sum_heads(heads, rows))
    assert on_disk.sum_heads(heads, rows).dtype == torch.float64


def test_the_builder_takes_queries_in_any_order_and_names_what_is_wrong(tmp_path):
    from routehead_rag.fit.labelled import LabelledSetBuilder

    scores, doc_ids, qrels = planted(count=6)
    qrels["q2"] = {}  # no relevant document: left out, and its scores are ignored
    reference = build_labelled_set(scores, doc_ids, qrels)
    builder = LabelledSetBuilder(doc_ids, qrels, 3, 4, dtype=torch.float16, on_disk=tmp_path / "new")
    assert not builder.wants("q2") and builder.wants("q5")
    for qid in reversed(list(scores)):
        builder.put(qid, scores[qid])
    data = builder.finish()
    assert data.qids == reference.qids == ["q0", "q1", "q3", "q4", "q5"]
    assert torch.equal(data.scores.double(), reference.scores) and torch.equal(data.ideal_dcg, reference.ideal_dcg)
    with pytest.raises(ValueError, match=r"query 'q1' has scores of shape \(3, 4, 6\), expected \(3, 4, 7\)"):
        builder.put("q1", scores["q1"][:, :, :6])
    partial = LabelledSetBuilder(doc_ids, qrels, 3, 4)
    partial.put("q0", scores["q0"])
    with pytest.raises(ValueError, match=r"4 queries have no scores yet \(e.g. \['q1', 'q3', 'q4'\]\)"):
        partial.finish()
    with pytest.raises(ValueError, match="float16, float32 or float64, got torch.bfloat16"):
        LabelledSetBuilder(doc_ids, qrels, 3, 4, dtype=torch.bfloat16)
