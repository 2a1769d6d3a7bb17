"""RouteHeadRanker (Haystack component): serialisation, validation, Document handling, model sharing.

Most tests replace the attention scorer with a fake whose scores the test chooses (so expected
orders are written out literally); the last tests run the real engine on a tiny random llama.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.core.errors import SerializationError
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice, Secret
from haystack.utils.misc import _deduplicate_documents as haystack_deduplicate

from haystack_integrations.components.generators.transformers import TransformersChatGenerator
from haystack_integrations.components.rankers.routehead import RouteHeadRanker
from routehead_rag.documents import EMPTY_PASSAGE_SCORE
from routehead_rag.engine.prompt import QUESTION_INSTRUCTION
from routehead_rag.engine.scorer import HeadScores
from routehead_rag.options import RerankerOptions
from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.strategy import AllHeads
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

RANKER_TYPE = "haystack_integrations.components.rankers.routehead.ranker.RouteHeadRanker"
GENERATOR_TYPE = (
    "haystack_integrations.components.generators.transformers.chat.chat_generator.TransformersChatGenerator"
)


class FakeScorer:
    """Stands in for the engine's attention scorer: each text's score is looked up in ``scores``.

    The engine's own ``rank`` runs on top (best first, ties in input order, blank texts last with
    ``EMPTY_PASSAGE_SCORE``, ``top_k`` and ``score_threshold``).  Records every (query, texts) it is asked to score
    (blank texts are never sent to a scorer).
    """

    backbone = None  # every head: the head choice needs no backbone

    def check_query(self, query: str) -> int:  # the engine's budget check: the stand-in has no budget
        return 0

    def __init__(self, scores: dict[str, float] | None = None):
        self.scores = scores or {}
        self.calls: list[tuple[str, list[str]]] = []
        self.warm_ups = 0

    def head_scores(self, query, passages, heads=None, lora=None):
        self.calls.append((query, list(passages)))
        scores = torch.tensor([self.scores.get(text, 0.0) for text in passages], dtype=torch.float64)  # [passage]
        return HeadScores(real=scores.reshape(1, 1, -1), content_free=None)  # one "head": its sum is the score


@pytest.fixture
def fake(monkeypatch) -> FakeScorer:
    fake = FakeScorer()

    def warm_up(self):
        fake.warm_ups += 1
        self._scorer, self._resolved = fake, AllHeads()

    monkeypatch.setattr(RouteHeadReranker, "warm_up", warm_up)
    return fake


def docs_abc() -> list[Document]:
    return [Document(id="a", content="alpha"), Document(id="b", content="beta"), Document(id="c", content="gamma")]


# -- serialisation ------------------------------------------------------------------------------


OPTION_DEFAULTS = RerankerOptions().model_dump(mode="json", exclude={"device"})  # device: a ComponentDevice
TOKEN_SECRET = {"type": "env_var", "env_vars": ["HF_API_TOKEN", "HF_TOKEN"], "strict": False}


def test_to_dict_defaults():
    assert RouteHeadRanker().to_dict() == {
        "type": RANKER_TYPE,
        "init_parameters": {
            "model": "smollm2-135m",
            "top_k": 10,
            "score_threshold": None,
            "meta_fields_to_embed": [],
            "embedding_separator": "\n",
            "device": None,
            "tokenizer": None,
            "token": TOKEN_SECRET,
            "explain": False,
            **OPTION_DEFAULTS,  # every option of the one options model, by its names
        },
    }


def test_to_dict_with_every_argument_set():
    ranker = RouteHeadRanker(
        model="HuggingFaceTB/SmolLM2-360M-Instruct",
        heads=["L1.H0", (0, 3), "L1.H0"],
        top_k=3,
        score_threshold=0.25,
        meta_fields_to_embed=["title"],
        embedding_separator=" | ",
        device=ComponentDevice.from_str("cpu"),
        dtype=torch.bfloat16,
        max_prompt_tokens=2048,
        instruction="question",
        tokenizer="HuggingFaceTB/SmolLM2-360M-Instruct",
        token=Secret.from_env_var("MY_HF_TOKEN"),
        explain=True,
        fuse_first_stage=False,
        scale_score=False,
        lora=False,
        max_passage_tokens=200,
        chunk_long_documents=True,
        model_kwargs={"revision": "main"},
    )
    assert ranker.to_dict() == {
        "type": RANKER_TYPE,
        "init_parameters": {
            "model": "HuggingFaceTB/SmolLM2-360M-Instruct",
            "top_k": 3,
            "score_threshold": 0.25,
            "meta_fields_to_embed": ["title"],
            "embedding_separator": " | ",
            "device": {"type": "single", "device": "cpu"},
            "tokenizer": "HuggingFaceTB/SmolLM2-360M-Instruct",
            "token": {"type": "env_var", "env_vars": ["MY_HF_TOKEN"], "strict": True},
            "explain": True,
            **OPTION_DEFAULTS,
            "heads": ["L1.H0", "L0.H3"],  # normalised, repeats dropped
            "dtype": "bfloat16",
            "max_prompt_tokens": 2048,
            "instruction": "question",
            "fuse_first_stage": False,
            "scale_score": False,
            "lora": False,
            "max_passage_tokens": 200,
            "chunk_long_documents": True,
            "model_kwargs": {"revision": "main"},
        },
    }


def test_a_token_value_is_never_serialised():
    with pytest.raises(TypeError, match="Secret"):
        RouteHeadRanker(token="hf_secret_value")
    ranker = RouteHeadRanker(token=Secret.from_token("hf_secret_value"))
    with pytest.raises(ValueError):  # Haystack refuses to serialise a token-based Secret
        ranker.to_dict()


def test_from_dict_round_trip_leaves_the_data_untouched():
    data = {
        "type": RANKER_TYPE,
        "init_parameters": {
            "model": "some/model",
            "top_k": None,
            "score_threshold": -1.5,
            "meta_fields_to_embed": ["title", "section"],
            "embedding_separator": "\n\n",
            "device": {"type": "single", "device": "cpu"},
            "tokenizer": None,
            "token": TOKEN_SECRET,
            "explain": True,
            **OPTION_DEFAULTS,
            "dtype": "float16",
            "max_prompt_tokens": 512,
            "lora": False,
        },
    }
    snapshot = {**data, "init_parameters": dict(data["init_parameters"])}
    ranker = RouteHeadRanker.from_dict(data)
    assert data == snapshot
    assert ranker.device == ComponentDevice.from_str("cpu")
    assert ranker.top_k is None and ranker.score_threshold == -1.5 and ranker.options.instruction is None
    assert ranker.explain is True
    assert ranker.to_dict() == data
    older = {**data, "init_parameters": {k: v for k, v in data["init_parameters"].items() if k != "explain"}}
    assert RouteHeadRanker.from_dict(older).explain is False  # saved before explain existed: off


def test_generator_as_model_is_serialised_with_its_own_to_dict():
    generator = TransformersChatGenerator(model="a/local-folder", task="text-generation")
    data = RouteHeadRanker(model=generator, heads="all").to_dict()
    assert data["init_parameters"]["model"] == generator.to_dict()
    assert data["init_parameters"]["model"]["type"] == GENERATOR_TYPE
    restored = RouteHeadRanker.from_dict(data)
    assert isinstance(restored.model, TransformersChatGenerator)
    assert restored.model.pipeline is None  # nothing loaded by deserialisation
    assert restored.to_dict() == data


def test_pipeline_dumps_loads_round_trip():
    store = InMemoryDocumentStore()
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=20))
    pipeline.add_component("ranker", RouteHeadRanker(top_k=3, meta_fields_to_embed=["title"], score_threshold=0.0))
    pipeline.connect("retriever.documents", "ranker.documents")
    assert Pipeline.loads(pipeline.dumps()) == pipeline


def test_pipeline_round_trip_with_a_generator_as_model():
    pipeline = Pipeline()
    pipeline.add_component(
        "ranker", RouteHeadRanker(model=TransformersChatGenerator(model="a/local-folder", task="text-generation"))
    )
    loaded = Pipeline.loads(pipeline.dumps())
    assert loaded == pipeline
    assert isinstance(loaded.get_component("ranker").model, TransformersChatGenerator)


def test_a_model_object_cannot_be_serialised_and_the_error_says_what_to_do():
    ranker = RouteHeadRanker(model=tiny_causal_lm("llama"), tokenizer=tiny_tokenizer())
    expected = "LlamaForCausalLM.*pass a model name or folder.*TransformersChatGenerator"
    with pytest.raises(SerializationError, match=expected):
        ranker.to_dict()
    pipeline = Pipeline()
    pipeline.add_component("ranker", ranker)
    with pytest.raises(SerializationError, match="cannot be serialised"):
        pipeline.dumps()


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k must be a positive integer.*got 0"),
        ({"top_k": -2}, "got -2"),
        ({"top_k": True}, "got True"),
        ({"top_k": 2.5}, "got 2.5"),
        ({"score_threshold": "0.5"}, "score_threshold must be a number or None, got '0.5'"),
        ({"score_threshold": float("nan")}, "got nan"),
        ({"score_threshold": False}, "got False"),
        ({"meta_fields_to_embed": "title"}, "list of meta field names, got 'title'"),
        ({"meta_fields_to_embed": ["title", 3]}, r"got \['title', 3\]"),
        ({"embedding_separator": None}, "embedding_separator must be a string, got None"),
        ({"device": "cuda:0"}, r"ComponentDevice.from_str\('cuda:0'\)"),
        ({"dtype": "int8"}, "dtype='int8' is not supported"),
        ({"dtype": torch.int8}, "dtype=torch.int8 is not supported"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens=0: Input should be greater than or equal to 64"),
        ({"instruction": "summarise"}, "instruction='summarise': Input should be 'relevance' or 'question'"),
        ({"max_passage_tokens": 0}, "max_passage_tokens=0: Input should be greater than or equal to 8"),
        ({"heads": "/no/such/router"}, "heads='/no/such/router' is neither 'auto' nor 'all'"),
        ({"heads": []}, "heads is an empty list"),
        ({"heads": ["L1"]}, "cannot parse head 'L1'"),
    ],
)
def test_bad_init_arguments_are_value_errors_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouteHeadRanker(**kwargs)


def test_a_head_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="head #0 is 1.5"):
        RouteHeadRanker(heads=[1.5])


def test_dtype_is_parsed_by_the_engine_the_same_way_in_both_adapters():
    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    for spelled in ("torch.bfloat16", "BFloat16", torch.bfloat16):
        assert RouteHeadRanker(dtype=spelled).options.dtype == RouteHeadPostprocessor(dtype=spelled).dtype == "bfloat16"
        assert RouteHeadReranker(dtype=spelled).options.dtype == "bfloat16"


def test_bad_model_arguments():
    with pytest.raises(TypeError, match="model must be a model name.*got int"):
        RouteHeadRanker(model=3)
    with pytest.raises(TypeError, match="tokenizer is None: pass the tokenizer"):
        RouteHeadRanker(model=tiny_causal_lm("llama"))
    generator = TransformersChatGenerator(model="a/local-folder", task="text-generation")
    with pytest.raises(ValueError, match="generator's own tokenizer is used"):
        RouteHeadRanker(model=generator, tokenizer=tiny_tokenizer())


def test_bad_run_inputs_fail_before_anything_loads(fake):
    ranker = RouteHeadRanker()
    with pytest.raises(ValueError, match="query is empty"):
        ranker.run(query="  ", documents=docs_abc())
    with pytest.raises(TypeError, match="query must be a string, got NoneType"):
        ranker.run(query=None, documents=docs_abc())
    with pytest.raises(TypeError, match=r"documents\[1\] is a str, not a haystack Document"):
        ranker.run(query="q", documents=[Document(content="x"), "y"])
    assert fake.warm_ups == 0 and ranker.reranker is None


# -- run ----------------------------------------------------------------------------------------


def test_copies_best_first_with_scores_and_originals_untouched(fake):
    fake.scores = {"alpha": 0.1, "beta": 0.7, "gamma": 0.4}
    documents = docs_abc()
    before = [(id(doc), doc.to_dict()) for doc in documents]
    result = RouteHeadRanker().run(query="which letter?", documents=documents)["documents"]
    assert [(doc.id, doc.score) for doc in result] == [("b", 0.7), ("c", 0.4), ("a", 0.1)]
    assert [(id(doc), doc.to_dict()) for doc in documents] == before  # same objects, same fields, score None
    assert all(doc.score is None for doc in documents)
    assert not {id(doc) for doc in result} & {id(doc) for doc in documents}
    assert fake.calls == [("which letter?", ["alpha", "beta", "gamma"])]


def test_init_top_k_and_threshold_apply_and_run_overrides_use_is_none(fake):
    fake.scores = {"alpha": -0.2, "beta": 0.0, "gamma": 0.3}
    ranker = RouteHeadRanker(top_k=2, score_threshold=-1.0)
    assert [d.id for d in ranker.run(query="q", documents=docs_abc())["documents"]] == ["c", "b"]
    assert [d.id for d in ranker.run(query="q", documents=docs_abc(), top_k=3)["documents"]] == ["c", "b", "a"]
    # 0.0 is a threshold, not "no override": the negative document goes; >= keeps the 0.0 one
    assert [d.id for d in ranker.run(query="q", documents=docs_abc(), top_k=3, score_threshold=0.0)["documents"]] == [
        "c",
        "b",
    ]
    with pytest.raises(ValueError, match="top_k must be a positive integer.*got 0"):
        ranker.run(query="q", documents=docs_abc(), top_k=0)
    with pytest.raises(ValueError, match="score_threshold must be a number or None, got 'high'"):
        ranker.run(query="q", documents=docs_abc(), score_threshold="high")
    assert ranker.top_k == 2 and ranker.score_threshold == -1.0  # overrides do not stick


def test_duplicate_ids_follow_haystacks_rule(fake):
    fake.scores = {"one": 1.0, "one, better retrieved": 0.5, "two": 2.0, "three": 3.0, "three again": 0.0}
    documents = [
        Document(id="x", content="one", score=0.2),
        Document(id="y", content="two"),
        Document(id="x", content="one, better retrieved", score=0.9),
        Document(id="z", content="three", score=0.1),
        Document(id="z", content="three again", score=0.1),  # tie: the first is kept
    ]
    reference = haystack_deduplicate(documents)  # what Haystack's own rankers rank
    result = RouteHeadRanker().run(query="q", documents=documents)["documents"]
    assert fake.calls[0][1] == [doc.content for doc in reference] == ["one, better retrieved", "two", "three"]
    assert [(d.id, d.content, d.score) for d in result] == [
        ("z", "three", 3.0),
        ("y", "two", 2.0),
        ("x", "one, better retrieved", 0.5),
    ]


def test_documents_without_content_are_kept_and_ranked_last(fake):
    fake.scores = {"alpha": 0.5, "Only a title\n": 0.9}  # meta + separator + "" (content None)
    documents = [
        Document(id="empty", content=None),
        Document(id="a", content="alpha"),
        Document(id="titled", content=None, meta={"title": "Only a title"}),
    ]
    result = RouteHeadRanker().run(query="q", documents=documents)["documents"]
    assert [(d.id, d.score) for d in result] == [("a", 0.5), ("empty", EMPTY_PASSAGE_SCORE), ("titled", EMPTY_PASSAGE_SCORE)]
    result = RouteHeadRanker(meta_fields_to_embed=["title"]).run(query="q", documents=documents)["documents"]
    assert [(d.id, d.score) for d in result] == [("titled", 0.9), ("a", 0.5), ("empty", EMPTY_PASSAGE_SCORE)]
    assert documents[0].content is None and documents[0].score is None


def test_meta_fields_are_put_before_the_content(fake):
    documents = [
        Document(id="1", content="body one", meta={"title": "T1", "year": 2021}),
        Document(id="2", content="body two", meta={"year": 0, "title": ""}),  # falsy values are skipped
        Document(id="3", content=None, meta={"title": "T3"}),
    ]
    RouteHeadRanker(meta_fields_to_embed=["title", "year", "missing"], embedding_separator=" | ").run(
        query="q", documents=documents
    )
    assert fake.calls[0][1] == ["T1 | 2021 | body one", "body two", "T3 | "]


def test_no_documents_give_no_documents_without_loading(fake):
    ranker = RouteHeadRanker()
    assert ranker.run(query="q", documents=[]) == {"documents": []}
    assert fake.warm_ups == 0


def test_run_async_gives_the_same_as_run(fake):
    fake.scores = {"alpha": 0.3, "beta": 0.2, "gamma": 0.9}
    ranker = RouteHeadRanker(top_k=2)
    expected = ranker.run(query="q", documents=docs_abc(), score_threshold=0.25)
    got = asyncio.run(ranker.run_async(query="q", documents=docs_abc(), score_threshold=0.25))
    assert got == expected and [d.id for d in got["documents"]] == ["c", "a"]
    with pytest.raises(ValueError, match="got 0"):
        asyncio.run(ranker.run_async(query="q", documents=docs_abc(), top_k=0))


def test_init_arguments_reach_the_engine(fake):
    ranker = RouteHeadRanker(
        heads=["L0.H1"],
        instruction="question",
        max_prompt_tokens=1000,
        dtype="bfloat16",
        device=ComponentDevice.from_str("cpu"),
    )
    asyncio.run(ranker.warm_up_async())
    engine = ranker.reranker
    assert isinstance(engine, RouteHeadReranker) and fake.warm_ups == 1
    assert [str(h) for h in engine.heads] == ["L0.H1"]
    assert engine.config.prompt.task_instruction == QUESTION_INSTRUCTION
    assert engine.config.max_prompt_tokens == 1000
    assert (engine.model, engine.options.dtype, engine.options.device) == ("smollm2-135m", "bfloat16", "cpu")


def test_concurrent_warm_ups_build_one_engine(monkeypatch):
    built = []

    def slow_warm_up(self):
        time.sleep(0.05)
        built.append(self)

    monkeypatch.setattr(RouteHeadReranker, "warm_up", slow_warm_up)
    ranker = RouteHeadRanker()
    threads = [threading.Thread(target=ranker.warm_up) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and built[0] is ranker.reranker


# -- the real engine on a tiny model ------------------------------------------------------------

QUERY = "what moves the sea"
TEXTS = ["the moon pulls the sea", "stock prices fell", "tides follow the moon", "five players a team"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_causal_lm("llama"), tiny_tokenizer()


def test_tiny_llama_end_to_end_matches_the_engine(tiny):
    model, tokenizer = tiny
    documents = [Document(id=f"d{i}", content=text) for i, text in enumerate(TEXTS)] + [Document(id="none")]
    ranker = RouteHeadRanker(model=model, tokenizer=tokenizer, heads="all", top_k=None)
    result = ranker.run(query=QUERY, documents=documents)["documents"]
    reference = RouteHeadReranker(model=model, tokenizer=tokenizer, heads="all").rank(QUERY, TEXTS)
    assert [(d.id, d.content) for d in result[:4]] == [(f"d{r.index}", r.text) for r in reference]
    for doc, expected in zip(result, reference):
        assert doc.score == pytest.approx(expected.score, abs=1e-6)
    assert (result[4].id, result[4].score) == ("none", EMPTY_PASSAGE_SCORE)
    assert ranker.reranker.scorer.backbone.model is model  # shared, not copied


def test_generator_is_warmed_up_and_its_model_is_shared(tiny):
    model, tokenizer = tiny
    generator = TransformersChatGenerator(
        huggingface_pipeline_kwargs={"model": model, "tokenizer": tokenizer, "task": "text-generation"},
        generation_kwargs={"max_new_tokens": 3, "do_sample": False},
    )
    ranker = RouteHeadRanker(model=generator, heads="all")
    assert generator.pipeline is None
    result = ranker.run(query=QUERY, documents=[Document(content=text) for text in TEXTS])["documents"]
    assert generator.pipeline is not None  # the ranker warmed the generator up
    assert ranker.reranker.scorer.backbone.model is generator.pipeline.model is model
    assert ranker.reranker.scorer.backbone.tokenizer is generator.pipeline.tokenizer
    assert len(result) == 4 and all(math.isfinite(d.score) for d in result)
    # the generator still generates afterwards (random tiny model: any text)
    from haystack.dataclasses import ChatMessage

    assert len(generator.run(messages=[ChatMessage.from_user("hi")])["replies"]) == 1


def test_a_generator_without_a_model_and_tokenizer_is_a_clear_error():
    generator = TransformersChatGenerator(model="a/local-folder", task="text-generation")
    generator.pipeline = SimpleNamespace(model=None, tokenizer=None)
    with pytest.raises(TypeError, match="left no transformers pipeline with a model and a tokenizer"):
        RouteHeadRanker(model=generator).warm_up()
