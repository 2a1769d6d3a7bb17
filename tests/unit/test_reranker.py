"""RouteHeadReranker: the public API on a tiny model, input handling and no mutation."""

import contextlib
import copy
import json
import math
import threading

import pytest
import torch

from routehead_rag.engine.scorer import aggregate
from routehead_rag.heads import Head
from routehead_rag.reranker import EMPTY_PASSAGE_SCORE, RankedResults, RouteHeadReranker
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

DOCS = ["the moon pulls the sea", "stock prices fell", "tides follow the moon", "five players a team"]


@pytest.fixture(scope="module")
def shared():
    return tiny_causal_lm("llama"), tiny_tokenizer()


@pytest.fixture
def reranker(shared):
    model, tokenizer = shared
    return RouteHeadReranker(model=model, tokenizer=tokenizer)


def test_rank_returns_all_documents_best_first(reranker):
    results = reranker.rank("what moves the sea", DOCS)
    assert isinstance(results, RankedResults)
    assert sorted(r.index for r in results) == [0, 1, 2, 3]
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    assert [r.rank for r in results] == [1, 2, 3, 4]
    assert all(r.text == DOCS[r.index] and r.id == r.index for r in results)
    expected = reranker.scorer.passage_scores("what moves the sea", DOCS)
    for r in results:
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-6)


def test_static_heads_score_is_the_head_sum(shared):
    model, tokenizer = shared
    heads = ["L1.H2", "L0.H0"]
    static = RouteHeadReranker(model=model, tokenizer=tokenizer, heads=heads)
    everything = RouteHeadReranker(model=model, tokenizer=tokenizer).scorer.head_scores("sea", DOCS)
    expected = aggregate(everything.debiased, [Head(1, 2), Head(0, 0)])
    results = static.rank("sea", DOCS)
    for r in results:
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-5)


def test_heads_file(tmp_path, shared):
    model, tokenizer = shared
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": ["L1.H3"]}))
    assert RouteHeadReranker(model=model, tokenizer=tokenizer, heads=path).heads == [Head(1, 3)]


def test_id_text_pairs_top_k_and_lookup(reranker):
    docs = [(f"doc-{i}", text) for i, text in enumerate(DOCS)]
    frozen = copy.deepcopy(docs)
    results = reranker.rank("what moves the sea", docs, top_k=2)
    assert len(results) == 2
    assert docs == frozen  # inputs untouched
    best = results[0]
    assert results.get_score_by_docid(best.id) == best.score
    assert best.id == f"doc-{best.index}"


def test_inputs_are_not_mutated(reranker):
    docs = list(DOCS)
    reranker.rank("sea", docs)
    assert docs == DOCS


def test_empty_and_whitespace_passages_are_kept_and_ranked_last(reranker):
    docs = ["", DOCS[0], "   \n", DOCS[2]]
    results = reranker.rank("sea", docs)
    assert [r.index for r in results][-2:] == [0, 2]
    assert results[-1].score == EMPTY_PASSAGE_SCORE == -1e9  # finite: results serialise as JSON
    assert all(math.isfinite(r.score) for r in results[:2])


def test_bad_input_errors(reranker):
    with pytest.raises(ValueError, match="query is empty"):
        reranker.rank("  ", DOCS)
    with pytest.raises(TypeError, match="query must be a string"):
        reranker.rank(None, DOCS)
    assert len(reranker.rank("sea", [])) == 0
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        reranker.rank("sea", [("a", "x"), ("a", "y")])
    with pytest.raises(TypeError, match="document 1"):
        reranker.rank("sea", ["fine", 42])
    with pytest.raises(TypeError, match="document 0 has text"):
        reranker.rank("sea", [("a", 3)])
    with pytest.raises(TypeError, match="not a single string"):
        reranker.rank("sea", "just one string")
    with pytest.raises(ValueError, match="top_k"):
        reranker.rank("sea", DOCS, top_k=0)


def test_bad_heads_are_clear_errors(shared, tmp_path):
    model, tokenizer = shared
    with pytest.raises(ValueError, match="L<layer>.H<head>"):
        RouteHeadReranker(model=model, tokenizer=tokenizer, heads=["layer1head2"])
    with pytest.raises(ValueError, match="neither 'auto' nor 'all' nor an existing heads file"):
        RouteHeadReranker(model=model, tokenizer=tokenizer, heads="nothing-here.json")
    with pytest.raises(ValueError, match="empty list"):
        RouteHeadReranker(model=model, tokenizer=tokenizer, heads=[])
    with pytest.raises(ValueError, match="does not exist in this backbone"):
        RouteHeadReranker(model=model, tokenizer=tokenizer, heads=["L7.H0"]).rank("sea", DOCS)


def test_shared_model_is_left_as_it_was(shared):
    model, tokenizer = shared
    before_impl = model.config._attn_implementation
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.tensor([tokenizer.encode("the moon pulls the sea")])
    with torch.no_grad():
        logits_before = model(ids).logits
    RouteHeadReranker(model=model, tokenizer=tokenizer).rank("sea", DOCS)
    assert model.config._attn_implementation == before_impl
    for name, param in model.named_parameters():
        assert torch.equal(param, before_params[name]), name
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits_before)


def test_lazy_loading(monkeypatch):
    calls = []
    import routehead_rag.model.backbone as backbone_module

    monkeypatch.setattr(backbone_module, "load_backbone", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(RuntimeError("loaded")))
    reranker = RouteHeadReranker()  # constructing loads nothing
    assert calls == []
    with pytest.raises(RuntimeError, match="loaded"):
        reranker.rank("q", ["d"])
    assert len(calls) == 1


@contextlib.contextmanager
def ranking_in_background(reranker):
    """Rank DOCS repeatedly in another thread for the span of the block; yields the rankings seen."""
    stop = threading.Event()
    rankings, errors = [], []

    def rank_loop():
        try:
            while not stop.is_set():
                rankings.append([r.index for r in reranker.rank("sea", DOCS)])
        except Exception as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=rank_loop)
    thread.start()
    try:
        yield rankings
    finally:
        stop.set()
        thread.join()
    assert not errors, errors


def test_generator_sharing_the_model_is_unaffected_while_ranking(shared):
    """One thread ranks repeatedly while another uses the same model as a generator would."""
    model, tokenizer = shared
    reranker = RouteHeadReranker(model=model, tokenizer=tokenizer)
    ids = torch.tensor([tokenizer.encode("the moon pulls the sea and the tides follow")])
    with torch.no_grad():
        expected = model(ids).logits
    expected_ranking = [r.index for r in reranker.rank("sea", DOCS)]
    with ranking_in_background(reranker) as rankings:
        for _ in range(20):
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, expected, atol=1e-6, rtol=0)
    assert rankings and all(r == expected_ranking for r in rankings)
    assert model.config._attn_implementation == "sdpa"


def test_generate_while_ranking_gives_the_same_tokens(shared):
    """greedy generate() in one thread while another thread ranks with the same model."""
    model, tokenizer = shared
    reranker = RouteHeadReranker(model=model, tokenizer=tokenizer)
    ids = torch.tensor([tokenizer.encode("the moon pulls")])
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(ids, **settings)
    with ranking_in_background(reranker):
        for _ in range(5):
            assert torch.equal(model.generate(ids, **settings), expected)
