"""RouteHeadRanker in a real Haystack RAG pipeline on the embedded SmolLM2-135M: one model for both jobs.

BM25 retriever -> RouteHeadRanker -> ChatPromptBuilder -> TransformersChatGenerator, where the ranker
scores with the generator's own model object: no second copy of the weights.
"""

from __future__ import annotations

import gc

import psutil
import pytest
from haystack import Document, Pipeline
from haystack.components.builders import ChatPromptBuilder
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.dataclasses import ChatMessage
from haystack.document_stores.in_memory import InMemoryDocumentStore

from haystack_integrations.components.generators.transformers import TransformersChatGenerator
from haystack_integrations.components.rankers.routehead import RouteHeadRanker
from routehead_rag.model.gguf_cache import convert_embedded

pytestmark = pytest.mark.integration

QUERY = "What causes the ocean tides?"
DOCUMENTS = [
    Document(id="market", content="The stock market fell sharply on Monday after the bank raised interest rates."),
    Document(
        id="tides",
        content="Ocean tides are caused by the gravitational pull of the Moon and, to a lesser extent, the Sun.",
    ),
    Document(id="surf", content="Surfers wait on the beach for big waves, which the wind raises far out at sea."),
    Document(id="bread", content="A recipe for banana bread needs ripe bananas, flour, sugar, butter and eggs."),
]
TEMPLATE = [
    ChatMessage.from_user(
        "Notes:\n{% for document in documents %}- {{ document.content }}\n{% endfor %}"
        "\nUsing the notes, answer briefly: {{ query }}"
    )
]


@pytest.fixture(scope="module")
def generator() -> TransformersChatGenerator:
    """The embedded SmolLM2-135M-Instruct as a Haystack generator (offline, greedy), warmed up once per module.

    It answers once here: the weights are memory-mapped from safetensors and only become resident
    on the first forward pass, which would otherwise be counted against whoever runs the model next.
    """
    generator = TransformersChatGenerator(
        model=str(convert_embedded()),
        task="text-generation",
        generation_kwargs={"max_new_tokens": 24, "do_sample": False},
    )
    generator.warm_up()
    generator.run(messages=[ChatMessage.from_user("Say hello.")])
    return generator


def _parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_ranking_adds_no_second_copy_of_the_weights(generator):
    model = generator.pipeline.model
    before = _rss()
    ranker = RouteHeadRanker(model=generator, top_k=2)
    ranker.warm_up()
    result = ranker.run(query=QUERY, documents=DOCUMENTS)["documents"]
    grown = _rss() - before

    backbone_model = ranker.reranker.scorer.backbone.model
    assert backbone_model is model
    ours = dict(backbone_model.named_parameters())
    theirs = dict(model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(ours[name].data_ptr() == theirs[name].data_ptr() for name in theirs)
    assert grown < 0.10 * _parameter_bytes(model), f"RSS grew {grown / 2**20:.1f} MiB"
    assert result[0].id == "tides"


def test_rag_pipeline_ranks_and_answers_with_one_model(generator):
    store = InMemoryDocumentStore()
    store.write_documents(DOCUMENTS)
    ranker = RouteHeadRanker(model=generator, top_k=2)
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=4))
    pipeline.add_component("ranker", ranker)
    pipeline.add_component("prompt", ChatPromptBuilder(template=TEMPLATE, required_variables=["query", "documents"]))
    pipeline.add_component("llm", generator)
    pipeline.connect("retriever.documents", "ranker.documents")
    pipeline.connect("ranker.documents", "prompt.documents")
    pipeline.connect("prompt.prompt", "llm.messages")

    result = pipeline.run(
        {"retriever": {"query": QUERY}, "ranker": {"query": QUERY}, "prompt": {"query": QUERY}},
        include_outputs_from={"ranker"},
    )

    ranked = result["ranker"]["documents"]
    assert len(ranked) == 2 and ranked[0].id == "tides"
    assert ranked[0].score >= ranked[1].score
    assert all(doc.score is not None for doc in ranked)
    answer = result["llm"]["replies"][0].text
    assert answer and answer.strip()
    assert "moon" in answer.lower(), answer  # the top passage reached the generator

    shared = ranker.reranker.scorer.backbone.model
    assert shared is generator.pipeline.model
    assert next(shared.parameters()).data_ptr() == next(generator.pipeline.model.parameters()).data_ptr()
    # Saved and loaded back (the generator is serialised inside the ranker too). Compared by parts:
    # Haystack lists a loaded pipeline's connections in another order.
    loaded = Pipeline.loads(pipeline.dumps()).to_dict()
    saved = pipeline.to_dict()
    assert loaded["components"] == saved["components"]
    assert sorted(map(str, loaded["connections"])) == sorted(map(str, saved["connections"]))
