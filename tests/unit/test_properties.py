"""Property-based tests: generated queries and documents against the contract, through every entry point.

For ``RouteHeadReranker.rank``, the Haystack ``RouteHeadRanker.run`` and the LlamaIndex
``RouteHeadPostprocessor``: any input gives either the documented error (``TypeError``/``ValueError``,
the one an independent statement of the rules below predicts, naming the bad argument) or a
result holding every input document exactly once (or the ``top_k`` / threshold cut), none of them
mutated (deep comparison, metadata included), with finite scores (blank passages get
``EMPTY_PASSAGE_SCORE``), sorted best first, and identical on a second call.

Tiny random models keep this to seconds; derandomized, so CI sees the same cases every run.
"""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routehead_rag import RouteHeadReranker
from routehead_rag.documents import EMPTY_PASSAGE_SCORE
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES = {"rank": 450, "haystack": 300, "llama_index": 300}  # 1,050 generated cases (+5 of 500 documents)

# -- generators ---------------------------------------------------------------------------------

WORDS = st.sampled_from(["the", "moon", "sea", "tides", "stock", "prices", "team", "players", "bread", "ocean"])
ODD_TEXT = st.text(alphabet=st.characters(), max_size=30)  # any code point: controls, combining marks, lone surrogates
TEXT = st.one_of(
    st.lists(WORDS, min_size=1, max_size=12).map(" ".join),
    ODD_TEXT,
    st.sampled_from(["", " ", "\n\t ", "\ud800", "x\udfff y", "\x00\x07", "مرحبا", "🌊🌕", "a" * 600, "b " * 300]),
)
PLAIN = st.lists(WORDS, min_size=1, max_size=12).map(" ".join)
QUERY = st.one_of(PLAIN, PLAIN, TEXT, st.sampled_from(["a " * 2000, None, 3, b"bytes", ["list"]]))
IDS = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "", "\ud800"]), st.just(("t", 1)), st.just(["unhashable"]))
ITEM = st.one_of(TEXT, st.tuples(IDS, TEXT), st.sampled_from([None, 3, ("only-id",), ("a", 3)]))
VALID = st.one_of(
    st.lists(TEXT, max_size=8),  # strings: each id is its position
    st.lists(st.tuples(st.text(max_size=4), TEXT), max_size=8, unique_by=lambda pair: pair[0]),  # (id, text), ids unique
)
DOCUMENTS = st.one_of(
    VALID, VALID, VALID,  # most cases reach the model
    st.lists(ITEM, max_size=8),  # mixed and malformed items, repeated ids
    st.sampled_from([None, "a single string", {"d1": "dict"}, {"a", "b"}, 5]),
)
TOP_K = st.one_of(st.none(), st.integers(-2, 10), st.sampled_from([True, 2.5, "3", 10**6]))
THRESHOLD = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([True, "0.5"]))

# -- an independent statement of the rules ------------------------------------------------------


def violations(query, documents=(), top_k=None, threshold=None, *, top_k_name="top_k", budget_check=None):
    """Every ``(exception type, word its message holds)`` the contract predicts; empty: a result.

    When several things are wrong, any one of them may be the one reported.
    """
    found = []
    if not isinstance(query, str):
        found.append((TypeError, "query"))
    elif not query.strip():
        found.append((ValueError, "query"))
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        found.append((ValueError, top_k_name))
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or math.isnan(threshold)):
        found.append((ValueError, "score_threshold"))
    if documents is None or isinstance(documents, (str, bytes, dict, set, int)):
        return [*found, (TypeError, "documents")]
    seen, texts = set(), []
    for index, item in enumerate(documents):
        if isinstance(item, str):
            doc_id, text = index, item
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            doc_id, text = item
            try:
                hash(doc_id)
            except TypeError:
                return [*found, (TypeError, f"document {index}")]
        else:
            return [*found, (TypeError, f"document {index}")]
        if doc_id in seen:
            return [*found, (ValueError, "duplicate document id")]
        seen.add(doc_id)
        texts.append(text)
    if not found and any(t.strip() for t in texts) and budget_check(query):
        found.append((ValueError, "budget"))
    return found


def raises_one_of(expected, call):
    """``call()`` raises one of the ``expected`` errors, with the word each names in its message."""
    with pytest.raises((TypeError, ValueError)) as caught:
        call()
    assert any(isinstance(caught.value, kind) and word in str(caught.value) for kind, word in expected), (
        f"{type(caught.value).__name__}: {caught.value} is none of {expected}"
    )


# -- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return RouteHeadReranker(model=tiny_causal_lm("llama"), tokenizer=tiny_tokenizer(), heads="all")


def over_budget(engine):
    def check(query):
        try:
            engine.scorer.check_query(query)
        except ValueError:
            return True
        return False

    return check


def check_ranking(scores, blank, kept_order_of_blank=True):
    """Finite, best first, blank passages last with EMPTY_PASSAGE_SCORE."""
    assert all(math.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)
    flags = [b for b in blank]
    assert flags == sorted(flags)  # every blank passage after every scored one
    assert all(s == EMPTY_PASSAGE_SCORE for s, b in zip(scores, blank) if b)


@settings(max_examples=5, **SETTINGS)
@given(words=st.lists(WORDS, min_size=500, max_size=500), query=st.lists(WORDS, min_size=1, max_size=5).map(" ".join))
def test_rank_500_documents(engine, words, query):
    """500 candidates (in windows): every one back exactly once, sorted, finite."""
    documents = [f"{w} passage {i}" for i, w in enumerate(words)]
    results = engine.rank(query, documents)
    assert sorted(r.index for r in results) == list(range(500))
    check_ranking([r.score for r in results], [False] * 500)


@settings(max_examples=CASES["rank"], **SETTINGS)
@given(query=QUERY, documents=DOCUMENTS, top_k=TOP_K, threshold=THRESHOLD)
def test_rank(engine, query, documents, top_k, threshold):
    frozen = copy.deepcopy(documents)
    expected = violations(query, documents, top_k, threshold, budget_check=over_budget(engine))
    if expected:
        raises_one_of(expected, lambda: engine.rank(query, documents, top_k=top_k, score_threshold=threshold))
        assert documents == frozen
        return
    results = engine.rank(query, documents, top_k=top_k, score_threshold=threshold)
    assert documents == frozen
    items = list(documents)
    kept = [i for i in range(len(items))]
    texts = [item if isinstance(item, str) else item[1] for item in items]
    ids = [i if isinstance(item, str) else item[0] for i, item in enumerate(items)]
    indices = [r.index for r in results]
    assert len(indices) == len(set(indices))  # each document at most once
    full = engine.rank(query, documents)
    assert sorted(r.index for r in full) == kept  # every document exactly once without a cut
    cut = [r for r in full if threshold is None or r.score >= threshold][: top_k if top_k is not None else None]
    assert [(r.index, r.score) for r in results] == [(r.index, r.score) for r in cut]
    for r in full:
        assert r.text == texts[r.index] and r.id == ids[r.index]
    check_ranking([r.score for r in full], [not texts[r.index].strip() for r in full])
    again = engine.rank(query, documents, top_k=top_k, score_threshold=threshold)
    assert [(r.index, r.score) for r in again] == [(r.index, r.score) for r in results]  # bitwise deterministic


# -- Haystack -----------------------------------------------------------------------------------

META = st.dictionaries(st.sampled_from(["title", "section", "x"]), st.one_of(TEXT, st.integers(), st.none()), max_size=3)


@st.composite
def haystack_documents(draw):
    from haystack import Document

    count = draw(st.sampled_from([0, 1, 2, 3, 5, 8]))
    ids = draw(st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f", "g", "h"]), min_size=count, max_size=count))
    docs = [
        Document(id=i, content=draw(st.one_of(st.none(), TEXT)), meta=draw(META),
                 score=draw(st.one_of(st.none(), st.floats(-1, 1))))
        for i in ids
    ]
    if draw(st.booleans()) and docs:
        docs.insert(draw(st.integers(0, len(docs))), draw(st.sampled_from(["not a Document", 3, None])))
    return docs


@pytest.fixture(scope="module")
def haystack_ranker(engine):
    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    ranker = RouteHeadRanker(model=engine.scorer.backbone.model, tokenizer=engine.scorer.backbone.tokenizer,
                             heads="all", top_k=None, meta_fields_to_embed=["title"])
    ranker.warm_up()
    return ranker


@settings(max_examples=CASES["haystack"], **SETTINGS)
@given(query=QUERY, documents=haystack_documents(), top_k=TOP_K, threshold=THRESHOLD)
def test_haystack_run(haystack_ranker, engine, query, documents, top_k, threshold):
    from haystack import Document

    from haystack_integrations.components.rankers.routehead.documents import deduplicate, text_to_rank

    before = [(id(d), d.to_dict()) if isinstance(d, Document) else d for d in documents]

    def call():
        return haystack_ranker.run(query=query, documents=documents, top_k=top_k, score_threshold=threshold)

    bad_item = next((i for i, d in enumerate(documents) if not isinstance(d, Document)), None)
    expected = violations(query, (), top_k, threshold, budget_check=lambda q: False)
    if bad_item is not None:
        expected.append((TypeError, f"documents[{bad_item}]"))
    if not expected and documents:
        texts = [text_to_rank(d, ["title"], "\n") for d in deduplicate(documents)]
        expected = violations(query, texts, budget_check=over_budget(engine))
    if expected:
        raises_one_of(expected, call)
    else:
        result = call()["documents"]
        unique = deduplicate(documents)
        full = haystack_ranker.run(query=query, documents=documents, top_k=None, score_threshold=None)["documents"]
        assert sorted(d.id for d in full) == sorted(d.id for d in unique)  # every document once (after dedup)
        cut = [d for d in full if threshold is None or d.score >= threshold][: top_k]
        assert [(d.id, d.score) for d in result] == [(d.id, d.score) for d in cut]
        originals = {d.id: d for d in unique}
        for doc in full:
            assert doc.content == originals[doc.id].content and doc.meta == originals[doc.id].meta
        blank = [not text_to_rank(originals[d.id], ["title"], "\n").strip() for d in full]
        check_ranking([d.score for d in full], blank)
        assert [(d.id, d.score) for d in call()["documents"]] == [(d.id, d.score) for d in result]
    after = [(id(d), d.to_dict()) if isinstance(d, Document) else d for d in documents]
    assert after == before  # same objects, same fields: nothing mutated


# -- LlamaIndex ---------------------------------------------------------------------------------


@st.composite
def llama_nodes(draw):
    from llama_index.core.schema import NodeWithScore, TextNode

    count = draw(st.sampled_from([0, 1, 2, 3, 5, 8]))
    return [
        NodeWithScore(node=TextNode(text=draw(TEXT), metadata=draw(META)), score=draw(st.one_of(st.none(), st.floats(-1, 1))))
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def llama_postprocessor(engine):
    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    rerank = RouteHeadPostprocessor(model=engine.scorer.backbone.model, tokenizer=engine.scorer.backbone.tokenizer,
                                    heads="all", top_n=10)
    rerank.warm_up()
    return rerank


@settings(max_examples=CASES["llama_index"], **SETTINGS)
@given(query=QUERY, nodes=llama_nodes(), top_n=st.integers(1, 10), threshold=THRESHOLD, keep=st.booleans())
def test_llama_index_postprocessor(llama_postprocessor, engine, query, nodes, top_n, threshold, keep):
    from llama_index.core.schema import MetadataMode

    before = [(n.score, n.node.model_dump()) for n in nodes]
    bad_threshold = threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                                or math.isnan(threshold))
    if bad_threshold:
        with pytest.raises(ValueError, match="score_threshold"):
            type(llama_postprocessor)(model=engine.scorer.backbone.model, tokenizer=engine.scorer.backbone.tokenizer,
                                      heads="all", score_threshold=threshold)
        return
    rerank = llama_postprocessor.model_copy(update={"top_n": top_n, "score_threshold": threshold,
                                                    "keep_retrieval_score": keep})
    rerank._reranker = llama_postprocessor.reranker  # one engine (model_copy copies the fields only)
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    expected = violations(query, texts, budget_check=over_budget(engine)) if nodes else violations(query)
    if query is None:  # no query at all: the postprocessor's own "needs the query" error
        expected.append((ValueError, "needs the query"))
    if expected:
        raises_one_of(expected, lambda: rerank.postprocess_nodes(nodes, query_str=query))
    else:
        result = rerank.postprocess_nodes(nodes, query_str=query)
        full = engine.rank(query, texts) if nodes else []
        cut = [r for r in full if threshold is None or r.score >= threshold][:top_n]
        assert [n.score for n in result] == [r.score for r in cut]
        assert [n.node.text for n in result] == [nodes[r.index].node.text for r in cut]
        for n, r in zip(result, cut):  # the caller's metadata, plus the retrieval score when asked to keep it
            extra = {"retrieval_score": nodes[r.index].score} if keep else {}
            assert n.node.metadata == {**nodes[r.index].node.metadata, **extra}
        if full:
            check_ranking([r.score for r in full], [not texts[r.index].strip() for r in full])
        again = rerank.postprocess_nodes(nodes, query_str=query)
        assert [n.score for n in again] == [n.score for n in result]
    assert [(n.score, n.node.model_dump()) for n in nodes] == before  # nothing mutated


# -- first-stage scores and the fusion formula --------------------------------------------------

PASSAGES = ["the moon pulls the sea", "stock prices fell", "tides follow the moon", "five players a team"]
REAL = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**12, 10**12))


@st.composite
def first_stage_scores(draw, count=len(PASSAGES)):
    """Any first-stage scores a caller might pass: real numbers of every kind (huge ones too) in lists, tuples,
    NumPy arrays and iterators, and what must be refused: unordered or textual containers, NaN, infinities,
    bools, other lengths, 2-D arrays (a ``None`` among them means: fuse with the input order)."""
    import numpy as np

    kind = draw(st.sampled_from(["list", "tuple", "float64", "float32", "int64", "scalars", "iterator", "none",
                                 "set", "dict", "str", "int", "odd item", "length", "2-d"]))
    small = st.floats(allow_nan=False, allow_infinity=False, width=32)
    values = draw(st.lists(small if kind == "float32" else REAL, min_size=count, max_size=count, unique=kind == "set"))
    if kind == "length":
        return values + draw(st.lists(REAL, min_size=1, max_size=2)) if draw(st.booleans()) else values[:-1]
    if kind == "odd item":
        position = draw(st.integers(0, count - 1))
        values[position] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), True, np.bool_(False),
                                                 "0.5", 1j, None]))
        return values
    return {
        "list": lambda: values, "tuple": lambda: tuple(values), "iterator": lambda: iter(values),
        "float64": lambda: np.array(values, dtype="float64"), "float32": lambda: np.array(values, dtype="float32"),
        "int64": lambda: np.array([int(v) % 10**6 for v in values], dtype="int64"),
        "scalars": lambda: [np.float64(v) for v in values], "none": lambda: None, "set": lambda: set(values),
        "dict": lambda: dict(enumerate(values)), "str": lambda: "1234", "int": lambda: 4,
        "2-d": lambda: np.array([values, values], dtype="float64"),
    }[kind]()


def first_stage_violation(scores, count=len(PASSAGES)):
    """The error the rules predict for ``scores`` (type, word the message holds), or ``None``: a result."""
    import numbers

    import numpy as np

    if scores is None:
        return None
    if isinstance(scores, (str, bytes, dict, set, frozenset, int)):
        return TypeError, "first_stage_scores"
    if isinstance(scores, np.ndarray) and scores.ndim != 1:
        return ValueError, "first_stage_scores"
    items = list(scores)
    if len(items) != count:
        return ValueError, "first_stage_scores"
    if any(item is None for item in items):
        return None
    for index, item in enumerate(items):
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Real) or not math.isfinite(float(item)):
            return ValueError, f"first_stage_scores[{index}]"
    return None


def reference_signal(scores, count=len(PASSAGES)):
    """Minus each passage's first-stage rank (1 = best): by score, highest first, ties in input order; without
    usable scores, by the input order."""
    values = None if scores is None else list(scores)
    if values is None or any(v is None for v in values):
        return [-float(i) for i in range(count)]
    order = sorted(range(count), key=lambda i: (-float(values[i]), i))
    signal = [0.0] * count
    for rank, index in enumerate(order):
        signal[index] = -float(rank)
    return signal


def reference_z(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return [0.0 if std == 0 else (v - mean) / std for v in values]


@pytest.fixture(scope="module")
def per_query(engine, tmp_path_factory):
    """A router predicting a first-stage weight per query (no calibration): fusion on, and fusion off."""
    from tests.unit.test_hostile_inputs import handmade_router

    backbone = engine.scorer.backbone
    folder = handmade_router(backbone, tmp_path_factory.mktemp("per-query") / "router", fusion="per_query")
    kwargs = dict(model=backbone.model, tokenizer=backbone.tokenizer, heads=folder, scale_score=False)
    return RouteHeadReranker(**kwargs), RouteHeadReranker(fuse_first_stage=False, **kwargs)


@settings(max_examples=150, **SETTINGS)
@given(query=PLAIN, scores=first_stage_scores())
def test_first_stage_scores(per_query, query, scores):
    """Any real numbers (NumPy's, huge ones) rank by their ranks; anything else is the predicted error."""
    import numpy as np

    fused, _ = per_query
    items = list(scores) if isinstance(scores, type(iter([]))) else None
    if items is not None:  # an iterator is read once: judge its items, pass a fresh iterator over them
        scores = iter(items)
    judged = items if items is not None else scores
    frozen = judged.copy() if isinstance(judged, np.ndarray) else copy.deepcopy(judged)
    expected = first_stage_violation(judged)
    if expected is not None:
        raises_one_of([expected], lambda: fused.rank(query, PASSAGES, first_stage_scores=scores))
        return
    ranked = fused.rank(query, PASSAGES, first_stage_scores=scores)
    by_ranks = fused.rank(query, PASSAGES, first_stage_scores=reference_signal(frozen))
    assert [(r.index, r.score) for r in ranked] == [(r.index, r.score) for r in by_ranks]  # only the ranks count
    assert all(math.isfinite(r.score) and r.score != EMPTY_PASSAGE_SCORE for r in ranked)
    if isinstance(scores, np.ndarray):
        assert np.array_equal(scores, frozen)  # not modified
    elif items is None:
        assert scores == frozen


@settings(max_examples=60, **SETTINGS)
@given(query=PLAIN, scores=st.one_of(st.none(), st.lists(REAL, min_size=4, max_size=4)))
def test_the_fusion_weight_recovered_from_outputs_is_the_routers_per_query_weight(per_query, query, scores):
    """``score = z(attention) + w * z(-first-stage rank)`` over the list (recipe.final_scores, the README's
    formula): w recovered from the outputs, for any first-stage scores, is the weight the router predicts for
    the query, and the remainder is nothing."""
    fused, plain = per_query
    out = {r.index: r.score for r in fused.rank(query, PASSAGES, first_stage_scores=scores)}
    attention = {r.index: r.score for r in plain.rank(query, PASSAGES)}  # fusion off: the attention mass
    z_attention = reference_z([attention[i] for i in range(len(PASSAGES))])
    z_signal = reference_z(reference_signal(scores))
    residual = [out[i] - z_attention[i] for i in range(len(PASSAGES))]
    weight = sum(r * s for r, s in zip(residual, z_signal)) / sum(s * s for s in z_signal)
    assert residual == pytest.approx([weight * s for s in z_signal], abs=1e-9)
    routed = fused.resolved_strategy.route(fused.scorer.backbone, query).fusion_weight
    assert weight == pytest.approx(routed, abs=1e-9)


def test_the_per_query_weight_differs_between_queries(per_query):
    fused, _ = per_query
    weights = {fused.resolved_strategy.route(fused.scorer.backbone, q).fusion_weight
               for q in ("sea", "stock prices", "the team players", "bread")}
    assert len(weights) == 4 and all(w > 0 for w in weights)
