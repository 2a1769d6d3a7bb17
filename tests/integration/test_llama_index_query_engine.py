"""RouteHeadPostprocessor in a real LlamaIndex query engine, sharing the generator's SmolLM2-135M.

The index embeds with the packaged all-MiniLM-L6-v2; the LLM is SmolLM2-135M-Instruct (the
embedded default, loaded as objects from its cached folder), and the re-ranker reads attention
from that same model object. Everything is offline; nothing is set on ``Settings``.
"""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.schema import MetadataMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_index.postprocessor.routehead import RouteHeadPostprocessor
from routehead_rag import RouteHeadReranker
from routehead_rag.data.first_stage import packaged_minilm_path
from routehead_rag.model.gguf_cache import convert_embedded

pytestmark = pytest.mark.integration

QUERY = "What causes the ocean tides?"
TEXTS = [
    "The stock market fell sharply on Monday after the bank raised interest rates.",
    "Ocean tides are caused by the gravitational pull of the Moon and, to a lesser extent, the Sun.",
    "Basketball is played by two teams of five players on a rectangular court.",
    "A recipe for banana bread needs ripe bananas, flour, sugar, butter and eggs.",
    "Sea levels rise and fall twice a day along most coasts of the world.",
    "The Moon orbits the Earth about once every 27 days.",
]


@pytest.fixture(scope="module")
def llm():
    from llama_index.llms.huggingface import HuggingFaceLLM

    folder = convert_embedded()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return HuggingFaceLLM(
        model=model,
        tokenizer=tokenizer,
        model_name=str(folder),
        tokenizer_name=str(folder),
        context_window=2048,
        max_new_tokens=24,
        generate_kwargs={"do_sample": False},
        is_chat_model=True,  # SmolLM2-Instruct: prompts go through its chat template
        device_map="cpu",
    )


@pytest.fixture(scope="module")
def index():
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    embed_model = HuggingFaceEmbedding(model_name=str(packaged_minilm_path()), device="cpu")
    documents = [Document(text=text, id_=f"doc-{i}") for i, text in enumerate(TEXTS)]
    return VectorStoreIndex.from_documents(documents, embed_model=embed_model)


def parameter_pointers(model: torch.nn.Module) -> set[int]:
    return {p.data_ptr() for p in model.parameters()}


def test_query_engine_answers_with_re_ranked_sources(llm, index):
    rerank = RouteHeadPostprocessor(llm=llm, top_n=2, keep_retrieval_score=True)
    engine = index.as_query_engine(llm=llm, similarity_top_k=4, node_postprocessors=[rerank])
    response = engine.query(QUERY)

    assert str(response).strip()
    sources = response.source_nodes
    assert len(sources) == 2

    # Independent path: the same retrieval, re-ranked by the core API on the same model.
    retrieved = index.as_retriever(similarity_top_k=4).retrieve(QUERY)
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in retrieved]
    reference = RouteHeadReranker(model=llm._model, tokenizer=llm._tokenizer).rank(
            QUERY, texts, top_k=2, first_stage_scores=[n.score for n in retrieved]  # the retriever's scores, fused
        )
    assert [s.node.node_id for s in sources] == [retrieved[r.index].node.node_id for r in reference]
    for source, want in zip(sources, reference):
        assert source.score == pytest.approx(want.score, abs=1e-5)
        assert source.node.metadata["retrieval_score"] == pytest.approx(retrieved[want.index].score)
    assert sources[0].score >= sources[1].score
    assert sources[0].node.get_content() == TEXTS[1]  # the passage that answers the question

    # One model for both jobs: the re-ranker's backbone is the generator's object, not a copy.
    backbone_model = rerank.reranker.scorer.backbone.model
    assert backbone_model is llm._model
    assert parameter_pointers(backbone_model) == parameter_pointers(llm._model)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_sharing_the_model_adds_little_memory(llm, index):
    retrieved = index.as_retriever(similarity_top_k=4).retrieve(QUERY)
    llm.complete("Say hello.")  # generation has run: the allocator and kernels are warm
    parameter_bytes = sum(p.numel() * p.element_size() for p in llm._model.parameters())
    before = rss()

    rerank = RouteHeadPostprocessor(llm=llm, top_n=2)
    rerank.warm_up()
    result = rerank.postprocess_nodes(retrieved, query_str=QUERY)
    grown = rss() - before

    assert len(result) == 2
    assert grown < 0.10 * parameter_bytes, (
        f"RSS grew by {grown / 2**20:.1f} MiB for a {parameter_bytes / 2**20:.0f} MiB model: the backbone was copied?"
    )
