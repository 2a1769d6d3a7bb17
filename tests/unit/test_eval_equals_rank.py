"""``eval`` measures exactly what users get: its run file equals ``RouteHeadReranker.rank`` on the same inputs.

A synthetic BEIR-layout set whose pools (8 paragraphs each, no scores: a POOL set) are longer than the
candidate depth (3): the BM25 top 3 of each pool is what the baseline ranks *and* what the re-ranker sees,
and both ``fit`` and ``eval`` run on it (they crashed on such sets when the two lists differed).
"""

from __future__ import annotations

import json

import pytest

from routehead_rag import RouteHeadReranker
from routehead_rag.engine.embedding import QueryEmbeddingConfig
from routehead_rag.eval.harness import evaluate_on_set, first_stage_run, prepare_set, read_trec_run
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import beir_source
from routehead_rag.fit.training import TrainingConfig
from tests.tiny_models import tiny_backbone

TOPICS = ["moon tides sea ocean", "stock market prices shares", "basketball players court team", "bread flour oven recipe",
          "rain clouds storm weather", "train station tickets platform", "violin orchestra concert music",
          "volcano lava eruption ash"]
QUERIES = 12
POOL = 8
TOP_K = 3


def write_set(folder):
    """A pool set: each query's own 8 paragraphs (no scores), graded qrels in test.tsv and train.tsv."""
    (folder / "qrels").mkdir(parents=True)
    corpus, candidates, qrels = [], [], []
    for q in range(QUERIES):
        ids = []
        for i in range(POOL):
            doc = f"q{q}d{i}"
            corpus.append({"_id": doc, "title": "", "text": f"{TOPICS[(q + i) % len(TOPICS)]} note {q} {i}"})
            ids.append(doc)
        candidates.append({"query_id": f"q{q}", "doc_ids": list(reversed(ids))})  # source order is not a ranking
        qrels.append(f"q{q}\tq{q}d0\t{1 + q % 2}")
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in corpus) + "\n")
    (folder / "queries.jsonl").write_text("\n".join(
        json.dumps({"_id": f"q{q}", "text": f"what about {TOPICS[q % len(TOPICS)]}"}) for q in range(QUERIES)) + "\n")
    (folder / "candidates.jsonl").write_text("\n".join(json.dumps(c) for c in candidates) + "\n")
    for split in ("test", "train"):
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    return folder


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    folder = write_set(root / "tiny-pools")
    backbone = tiny_backbone("llama")
    source = beir_source(str(folder), top_k=TOP_K)
    assert all(len(ids) == TOP_K for ids in source.candidates.values())  # the BM25 top 3 of 8, in BM25 order
    result = run_fit(backbone, [source], root / "router", query_embedding=QueryEmbeddingConfig(layer=0),
                     search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=20, ks=(1, 2)),
                     cache_dir=root / "cache")
    return backbone, folder, result.artifact, root


def test_baseline_and_reranker_see_the_same_candidates(setting):
    _, folder, _, _ = setting
    eval_set = prepare_set(folder, top_k=TOP_K)
    run = first_stage_run(eval_set)
    for qid in eval_set.qids:
        assert list(run[qid]) == eval_set.candidates[qid].doc_ids == [d for d, _ in eval_set.documents(qid)]
        scores = eval_set.candidates[qid].scores
        assert scores == sorted(scores, reverse=True) and len(scores) == TOP_K


@pytest.mark.parametrize("heads", ["router", "static", "all"])
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_eval_run_equals_rank(setting, heads, fuse, scale, tmp_path):
    backbone, folder, router, root = setting
    choice = {"router": router, "static": ["L1.H0", "L0.H2"], "all": "all"}[heads]
    reranker = RouteHeadReranker(model=backbone, heads=choice, fuse_first_stage=fuse, scale_score=scale)
    eval_set = prepare_set(folder, top_k=TOP_K)
    report = evaluate_on_set(eval_set, reranker, cache_dir=root / "eval-cache", run_output=tmp_path / "run.txt")
    assert 0.0 <= report["ndcg@10"] <= 1.0
    run = read_trec_run(tmp_path / "run.txt")
    assert set(run) == set(eval_set.qids)
    fresh = RouteHeadReranker(model=backbone, heads=choice, fuse_first_stage=fuse, scale_score=scale)
    for qid in eval_set.qids:
        ranked = fresh.rank(eval_set.dataset.queries[qid], eval_set.documents(qid),
                            first_stage_scores=eval_set.candidates[qid].scores)
        assert [doc for doc, _, _ in run[qid]] == ranked.ids()
        assert [rank for _, rank, _ in run[qid]] == [r.rank for r in ranked]
        for (_, _, score), r in zip(run[qid], ranked):
            assert score == pytest.approx(r.score, abs=1e-6)


def test_trec_run_refuses_ids_with_spaces(tmp_path):
    from routehead_rag.eval.harness import write_trec_run
    from routehead_rag.results import RankedDocument, RankedResults

    ranked = RankedResults("q", [RankedDocument(id="a b", text="", score=1.0, rank=1, index=0)])
    with pytest.raises(ValueError, match="spaces"):
        write_trec_run(tmp_path / "run.txt", {"q1": ranked}, "tag")
