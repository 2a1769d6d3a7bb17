"""RouteHeadPostprocessor (LlamaIndex): ordering, copies, events, serialisation, sharing a model.

Most tests swap the attention scorer for a word-overlap rule that the tests recompute on their
own, so they check the adapter (text sent, order, truncation, copies, events), not a mock's echo.
Two tests run the real engine on a tiny random llama model and compare with the core API.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import torch
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

import routehead_rag.model.backbone
from llama_index.postprocessor.routehead import RouteHeadPostprocessor
from routehead_rag import RouteHeadReranker
from routehead_rag.documents import EMPTY_PASSAGE_SCORE
from routehead_rag.engine.scorer import HeadScores
from routehead_rag.options import RerankerOptions
from routehead_rag.strategy import AllHeads
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

QUERY = "what pulls the sea tides"
TEXTS = [
    "stock prices fell on monday",  # 0 shared words
    "the moon pulls the sea",  # 3: the, pulls, sea
    "tides follow the moon and the sea",  # 3: the, sea, tides (tie with 1: keeps retrieval order)
    "five players make a team",  # 0
    "what the tides do",  # 3: what, the, tides
    "",  # empty: ranked last with EMPTY_PASSAGE_SCORE
]


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def overlap(query: str, passage: str) -> float:
    """The stand-in relevance rule: how many distinct words the passage shares with the query."""
    return float(len(words(query) & words(passage)))


def expected_order(query: str, texts: list[str]) -> list[int]:
    """Reference ranking: overlap descending, ties in retrieval order, empty passages last."""
    live = [i for i, t in enumerate(texts) if t.strip()]
    dead = [i for i, t in enumerate(texts) if not t.strip()]
    return sorted(live, key=lambda i: -overlap(query, texts[i])) + dead


class OverlapScorer:
    """Stand-in for ``AttentionScorer.head_scores`` (one "head" whose score is the word overlap); records what
    it was asked to score."""

    backbone = None  # the head choice below needs none

    def check_query(self, query: str) -> int:  # the engine's budget check: the stand-in has no budget
        return 0

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def head_scores(self, query, passages, heads=None, lora=None):
        self.calls.append((query, list(passages)))
        scores = torch.tensor([overlap(query, p) for p in passages], dtype=torch.float64)  # [passage]
        return HeadScores(real=scores.reshape(1, 1, -1), content_free=None)


@pytest.fixture
def scorer(monkeypatch) -> OverlapScorer:
    fake = OverlapScorer()

    def warm_up(self) -> None:
        self._scorer, self._resolved = fake, AllHeads()

    monkeypatch.setattr(RouteHeadReranker, "warm_up", warm_up)
    return fake


@pytest.fixture
def no_loading(monkeypatch) -> list:
    """Fail the test if anything tries to load a backbone."""
    attempts: list = []

    def load_backbone(*args, **kwargs):
        attempts.append((args, kwargs))
        raise AssertionError("a backbone was loaded")

    monkeypatch.setattr(routehead_rag.model.backbone, "load_backbone", load_backbone)
    return attempts


def make_nodes(texts=TEXTS) -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(text=text, id_=f"n{i}", metadata={"pos": i}, excluded_embed_metadata_keys=["pos"]),
            score=0.9 - 0.1 * i,
        )
        for i, text in enumerate(texts)  # "pos" is left out of the embed text: the scorer sees `text` alone
    ]


# -- ranking -----------------------------------------------------------------------------------
def test_best_first_and_truncated_to_top_n(scorer):
    nodes = make_nodes()
    result = RouteHeadPostprocessor(top_n=4).postprocess_nodes(nodes, query_str=QUERY)
    order = expected_order(QUERY, TEXTS)[:4]
    assert [n.node.node_id for n in result] == [f"n{i}" for i in order]
    assert [n.score for n in result] == [overlap(QUERY, TEXTS[i]) for i in order]
    assert scorer.calls == [(QUERY, TEXTS[:-1])]  # one call, retrieval order; the empty passage is not scored


def test_top_n_larger_than_candidates_returns_all_with_empty_last(scorer):
    result = RouteHeadPostprocessor(top_n=50).postprocess_nodes(make_nodes(), query_str=QUERY)
    assert [n.node.node_id for n in result] == [f"n{i}" for i in expected_order(QUERY, TEXTS)]
    assert result[-1].score == EMPTY_PASSAGE_SCORE and result[-1].node.get_content() == ""


def test_new_objects_and_inputs_untouched(scorer):
    nodes = make_nodes()
    before = [n.model_dump() for n in nodes]
    result = RouteHeadPostprocessor(top_n=3, keep_retrieval_score=True).postprocess_nodes(nodes, query_str=QUERY)
    assert [n.model_dump() for n in nodes] == before  # scores, metadata, text: all as they were
    originals = {id(n) for n in nodes} | {id(n.node) for n in nodes}
    assert all(id(n) not in originals and id(n.node) not in originals for n in result)
    assert all("retrieval_score" not in n.node.metadata for n in nodes)


def test_keep_retrieval_score(scorer):
    nodes = make_nodes()
    by_id = {n.node.node_id: n.score for n in nodes}
    kept = RouteHeadPostprocessor(top_n=3, keep_retrieval_score=True).postprocess_nodes(nodes, query_str=QUERY)
    for n in kept:
        assert n.node.metadata["retrieval_score"] == by_id[n.node.node_id]
        assert n.node.metadata["pos"] == int(n.node.node_id[1:])  # the rest of the metadata kept
        assert n.score == overlap(QUERY, n.node.get_content(metadata_mode=MetadataMode.NONE))
    plain = RouteHeadPostprocessor(top_n=3).postprocess_nodes(nodes, query_str=QUERY)
    assert all("retrieval_score" not in n.node.metadata for n in plain)
    assert all(p.node is nodes[int(p.node.node_id[1:])].node for p in plain)  # unchanged nodes are shared


def test_metadata_mode_sets_the_text_scored(scorer):
    node = TextNode(
        text="the moon pulls the sea",
        metadata={"title": "Tides explained", "secret": "hidden value"},
        excluded_embed_metadata_keys=["secret"],
    )
    nodes = [NodeWithScore(node=node, score=0.5)]
    RouteHeadPostprocessor().postprocess_nodes(nodes, query_str=QUERY)  # default: EMBED
    RouteHeadPostprocessor(metadata_mode=MetadataMode.NONE).postprocess_nodes(nodes, query_str=QUERY)
    RouteHeadPostprocessor(metadata_mode="all").postprocess_nodes(nodes, query_str=QUERY)
    embed, none, everything = (passages[0] for _, passages in scorer.calls)
    assert "Tides explained" in embed and "hidden value" not in embed and "the moon pulls the sea" in embed
    assert none == "the moon pulls the sea"
    assert "Tides explained" in everything and "hidden value" in everything


def test_score_threshold_drops_low_scores(scorer):
    result = RouteHeadPostprocessor(top_n=10, score_threshold=3.0).postprocess_nodes(make_nodes(), query_str=QUERY)
    expected = [i for i in expected_order(QUERY, TEXTS) if TEXTS[i].strip() and overlap(QUERY, TEXTS[i]) >= 3.0]
    assert [n.node.node_id for n in result] == [f"n{i}" for i in expected]
    assert len(expected) == 3  # the threshold does cut something here


def test_async_path_matches_sync(scorer):
    rerank = RouteHeadPostprocessor(top_n=3)
    sync = rerank.postprocess_nodes(make_nodes(), query_str=QUERY)
    result = asyncio.run(rerank.apostprocess_nodes(make_nodes(), query_bundle=QueryBundle(QUERY)))
    assert [(n.node.node_id, n.score) for n in result] == [(n.node.node_id, n.score) for n in sync]


def test_missing_query_bundle_is_a_clear_error(scorer):
    with pytest.raises(ValueError, match="needs the query"):
        RouteHeadPostprocessor().postprocess_nodes(make_nodes())


def test_empty_node_list_loads_nothing(no_loading):
    assert RouteHeadPostprocessor().postprocess_nodes([], query_str=QUERY) == []
    assert no_loading == []


# -- events ------------------------------------------------------------------------------------
class Collect(BaseEventHandler):
    events: list = []

    def handle(self, event, **kwargs) -> None:
        self.events.append(event)


def test_events_fired(scorer):
    handler = Collect(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    debug = LlamaDebugHandler()
    rerank = RouteHeadPostprocessor(top_n=2, callback_manager=CallbackManager([debug]))
    nodes = make_nodes()
    try:
        result = rerank.postprocess_nodes(nodes, query_str=QUERY)
    finally:
        root.event_handlers.remove(handler)

    events = [e for e in handler.events if isinstance(e, (ReRankStartEvent, ReRankEndEvent))]
    assert [type(e) for e in events] == [ReRankStartEvent, ReRankEndEvent]
    start, end = events
    assert start.query.query_str == QUERY and start.top_n == 2 and start.model_name == "smollm2-135m"
    assert [n.node.node_id for n in start.nodes] == [n.node.node_id for n in nodes]
    assert [n.node.node_id for n in end.nodes] == [n.node.node_id for n in result]

    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    begin, finish = pairs[0]
    assert begin.payload[EventPayload.QUERY_STR] == QUERY
    assert begin.payload[EventPayload.TOP_K] == 2
    assert begin.payload[EventPayload.MODEL_NAME] == "smollm2-135m"
    assert finish.payload[EventPayload.NODES] == result


# -- construction, laziness, serialisation -------------------------------------------------------
def test_constructing_and_serialising_load_nothing(no_loading):
    rerank = RouteHeadPostprocessor(top_n=3, dtype=torch.float32, device="cpu")
    RouteHeadPostprocessor.from_dict(rerank.to_dict())
    assert no_loading == []
    assert not rerank.reranker.is_loaded


def test_to_dict_from_dict_round_trip(no_loading):
    rerank = RouteHeadPostprocessor(
        heads=["L0.H1", "L1.H3"],
        top_n=3,
        score_threshold=0.25,
        keep_retrieval_score=True,
        metadata_mode=MetadataMode.NONE,
        device="cpu",
        dtype="bfloat16",
        max_prompt_tokens=1024,
        lora=False,
        max_passage_tokens=200,
        model_kwargs={"revision": "main"},
    )
    data = rerank.to_dict()
    assert data["class_name"] == "RouteHeadPostprocessor"
    assert data["heads"] == ["L0.H1", "L1.H3"] and data["dtype"] == "bfloat16" and data["shared_model"] is False
    assert data["lora"] is False and data["max_passage_tokens"] == 200 and data["model_kwargs"] == {"revision": "main"}
    # every option of the one options model is serialised, by its name
    assert set(RerankerOptions.model_fields) <= set(data)
    again = RouteHeadPostprocessor.from_dict(data)
    assert again.reranker.options.lora is False and again.reranker.options == rerank.reranker.options
    assert again.to_dict() == data
    assert RouteHeadPostprocessor.from_json(rerank.to_json()).to_dict() == data
    assert [str(h) for h in again.reranker.heads] == ["L0.H1", "L1.H3"]


def test_heads_accepts_head_objects_pairs_and_paths(tmp_path, no_loading):
    from routehead_rag.heads import Head

    assert RouteHeadPostprocessor(heads=[Head(0, 1), (1, 3), "L0.H1"]).heads == ["L0.H1", "L1.H3"]
    heads_file = tmp_path / "heads.txt"
    heads_file.write_text("L1.H2\n")
    rerank = RouteHeadPostprocessor(heads=heads_file)
    assert rerank.heads == str(heads_file) and [str(h) for h in rerank.reranker.heads] == ["L1.H2"]
    assert RouteHeadPostprocessor(heads="all").reranker.heads is None  # every head


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_n=0), "top_n must be a positive integer.*got 0"),
        (dict(top_n=-2), "got -2"),
        (dict(top_n=True), "got True"),
        (dict(top_n="3"), "got '3'"),
        (dict(max_prompt_tokens=0), "max_prompt_tokens=0: Input should be greater than or equal to 64"),
        (dict(no_such_option=1), r"unknown option\(s\) \['no_such_option'\]"),
        (dict(dtype="int8"), "dtype='int8' is not supported"),
        (dict(device="gpu"), "device='gpu' is not a valid torch device"),
        (dict(heads="no/such/router"), "heads='no/such/router' is neither"),
        (dict(heads=["L0.H1", "layer zero"]), "cannot parse head 'layer zero'"),
        (dict(heads=3), "heads must be 'auto'"),
        (dict(score_threshold=float("nan")), "score_threshold must be a number or None, got nan"),
        (dict(instruction="summarise"), "instruction='summarise': Input should be 'relevance' or 'question'"),
        (dict(tokenizer=object()), "tokenizer= is only used with a model object"),
        (dict(model=42), "model must be a name"),
        (dict(shared_model=True), "from_dict\\(data, llm=your_llm\\)"),
        (dict(llm=object()), "holds no loaded transformers model"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RouteHeadPostprocessor(**kwargs)


def test_model_object_without_tokenizer():
    with pytest.raises(ValueError, match="tokenizer= is missing"):
        RouteHeadPostprocessor(model=torch.nn.Linear(2, 2))


def test_engine_settings_are_frozen_and_top_n_is_validated_on_assignment(no_loading):
    rerank = RouteHeadPostprocessor()
    rerank.top_n = 2
    assert rerank.top_n == 2
    with pytest.raises(ValueError, match="got 0"):
        rerank.top_n = 0
    with pytest.raises(ValueError, match="heads is a re-ranker option, fixed when the postprocessor is built"):
        rerank.heads = "all"  # the engine was built from it: changing it later would be ignored
    with pytest.raises(ValueError, match="fixed when the postprocessor is built"):
        rerank.lora = False


# -- the real engine on a tiny model -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm("llama"), tiny_tokenizer()


def test_tiny_model_end_to_end_matches_the_core_reranker(tiny):
    model, tokenizer = tiny
    rerank = RouteHeadPostprocessor(model=model, tokenizer=tokenizer, heads="all", top_n=3)
    nodes = make_nodes()
    result = rerank.postprocess_nodes(nodes, query_str=QUERY)

    reference = RouteHeadReranker(model=model, tokenizer=tokenizer, heads="all").rank(QUERY, TEXTS)
    assert [n.node.node_id for n in result] == [f"n{r.index}" for r in reference[:3]]
    for got, want in zip(result, reference):
        assert got.score == pytest.approx(want.score, abs=1e-6)
    assert rerank.shared_model and rerank.reranker.scorer.backbone.model is model
    assert [n.score for n in nodes] == pytest.approx([0.9 - 0.1 * i for i in range(len(TEXTS))])


def test_shares_a_huggingface_llm_and_reattaches_after_from_dict(tiny):
    from llama_index.llms.huggingface import HuggingFaceLLM

    model, tokenizer = tiny
    llm = HuggingFaceLLM(model=model, tokenizer=tokenizer, context_window=512, max_new_tokens=4)
    rerank = RouteHeadPostprocessor(llm=llm, heads="all", top_n=2)
    result = rerank.postprocess_nodes(make_nodes(), query_str=QUERY)
    assert len(result) == 2
    assert rerank.reranker.scorer.backbone.model is model  # the generator's own object
    assert rerank.reranker.scorer.backbone.tokenizer is tokenizer

    data = rerank.to_dict()
    assert data["shared_model"] is True and isinstance(data["model"], str)
    with pytest.raises(ValueError, match="llm=your_llm"):
        RouteHeadPostprocessor.from_dict(data)
    again = RouteHeadPostprocessor.from_dict(data, llm=llm)
    assert again.to_dict() == data
    again_result = again.postprocess_nodes(make_nodes(), query_str=QUERY)
    assert [(n.node.node_id, n.score) for n in again_result] == [(n.node.node_id, n.score) for n in result]
    assert again.reranker.scorer.backbone.model is model
