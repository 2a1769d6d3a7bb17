"""Inputs an adversary (or a bad day) sends: each gets a result or a clear error naming the bad value."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time

import pytest
import torch

from routehead_rag import RouteHeadReranker
from routehead_rag.documents import EMPTY_PASSAGE_SCORE
from routehead_rag.engine.embedding import QueryEmbeddingConfig
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import read_query_log
from routehead_rag.fit.training import TrainingConfig
from tests.tiny_models import tiny_backbone, tiny_causal_lm, tiny_tokenizer

DOCS = ["the moon pulls the sea", "stock prices fell", "tides follow the moon"]


@pytest.fixture(scope="module")
def shared():
    return tiny_causal_lm("llama"), tiny_tokenizer()


@pytest.fixture
def reranker(shared):
    model, tokenizer = shared
    return RouteHeadReranker(model=model, tokenizer=tokenizer, heads="all")


def test_a_strings_id_is_its_index_and_may_not_repeat_a_pairs_id(reranker):
    with pytest.raises(ValueError, match="duplicate document id 0 at positions 0 and 1"):
        reranker.rank("tides", ["x", (0, "y")])
    results = reranker.rank("tides", ["x", (5, "y")])
    assert sorted(r.id for r in results) == [0, 5]


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ({"d1": "The moon pulls the sea.", "d2": "Stocks fell."}, "documents is a dict.*list\\(docs.items\\(\\)\\)"),
        (None, "documents is None"),
        ({"a", "b"}, "a set, which has no order"),
        (42, "got int"),
    ],
)
def test_containers_that_are_not_a_ranking_are_type_errors(reranker, documents, message):
    with pytest.raises(TypeError, match=message):
        reranker.rank("tides", documents)


def test_a_dicts_items_rank_as_pairs(reranker):
    docs = {"d1": "The moon pulls the sea.", "d2": "Stocks fell."}
    assert sorted(r.id for r in reranker.rank("tides", list(docs.items()))) == ["d1", "d2"]


def test_unencodable_text_is_scored_from_a_cleaned_copy_and_returned_untouched(reranker):
    docs = ["the moon\ud800 pulls", ("b", "stock \udfff prices"), "plain text"]
    frozen = copy.deepcopy(docs)
    results = reranker.rank("x\ud800 tides", docs)
    assert docs == frozen
    assert {r.text for r in results} == {"the moon\ud800 pulls", "stock \udfff prices", "plain text"}
    assert all(math.isfinite(r.score) for r in results)
    cleaned = reranker.rank("x\ufffd tides", ["the moon\ufffd pulls", ("b", "stock \ufffd prices"), "plain text"])
    assert [r.score for r in results] == [r.score for r in cleaned]  # scored exactly as U+FFFD


def test_blank_passages_score_a_finite_value_that_serialises_as_json(reranker):
    results = reranker.rank("tides", ["", DOCS[0], "  \n"])
    assert [r.index for r in results][-2:] == [0, 2] and results[-1].score == EMPTY_PASSAGE_SCORE
    json.loads(json.dumps([r.score for r in results], allow_nan=False))


@pytest.fixture(scope="module")
def tiny_router(tmp_path_factory):
    from tests.unit.test_fit import write_log

    folder = tmp_path_factory.mktemp("router")
    backbone = tiny_backbone("llama")
    result = run_fit(
        backbone, [read_query_log(write_log(folder / "log.jsonl", count=10))], folder / "router",
        query_embedding=QueryEmbeddingConfig(layer=0), search=SearchConfig(pool_size=4, max_heads=2),
        training=TrainingConfig(epochs=5, ks=(1,)), cache_dir=folder / "cache",
    )
    return backbone, result.artifact


def test_a_query_over_the_budget_fails_before_the_routing_pass(tiny_router, monkeypatch):
    import routehead_rag.engine.embedding as embedding

    backbone, router = tiny_router
    reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=router)
    reranker.warm_up()
    monkeypatch.setattr(embedding, "embed_query", lambda *a, **k: pytest.fail("the query was embedded"))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="the query alone needs .* prompt tokens, over the budget"):
        reranker.rank("a " * 50_000, ["The moon pulls the ocean."])
    assert time.perf_counter() - started < 10


def test_fit_checks_every_querys_budget_before_extracting(tmp_path, monkeypatch):
    import routehead_rag.engine.scorer as scorer

    log = tmp_path / "log.jsonl"
    lines = [{"id": "ok", "query": "sea", "candidates": [{"id": "a", "text": "the sea"}], "relevance": {"a": 1}},
             {"id": "long", "query": "a " * 5000, "candidates": [{"id": "a", "text": "x"}]}]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    monkeypatch.setattr(scorer.AttentionScorer, "head_scores_batch", lambda *a, **k: pytest.fail("extracted"))
    with pytest.raises(ValueError, match="log: query 'long': the query alone needs"):
        run_fit(tiny_backbone("llama"), [read_query_log(log)], tmp_path / "router", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "q", "candidates": [{"id": "a", "text": "x"}], "relevance": {"a": Infinity}}', ":1: Infinity"),
        ('{"query": "q", "candidates": [{"id": "a", "text": "x"}], "relevance": {"a": 1e400}}', ":1: the grade of 'a' is inf"),
        ('{"query": "q", "candidates": [{"id": "a", "text": "x"}], "relevance": {"a": 1.7}}', ":1: the grade of 'a' is 1.7"),
        ('{"query": "q", "candidates": [{"id": "a", "text": "x"}], "relevance": {"a": true}}', ":1: the grade of 'a' is True"),
        ('{"id": "\\ud800", "query": "q", "candidates": [{"id": "a", "text": "x"}]}', ":1: the query id"),
        ('{"query": "q", "candidates": [{"id": "\\udfff", "text": "x"}]}', ":1: candidate 0's id"),
    ],
)
def test_query_log_edges_name_the_line(tmp_path, line, message):
    log = tmp_path / "log.jsonl"
    log.write_text('{"query": "fine", "candidates": [{"id": "a", "text": "x"}]}\n' + line.replace(":1:", "") + "\n")
    with pytest.raises(ValueError, match=message.replace(":1:", "log.jsonl:2:")):
        read_query_log(log)


def test_query_log_that_is_not_utf8_names_the_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"query": "fine", "candidates": [{"id": "a", "text": "x"}]}\n{"query": "q\xff"}\n')
    with pytest.raises(ValueError, match="log.jsonl:2: not UTF-8"):
        read_query_log(log)


def test_an_integral_grade_written_as_a_float_is_read(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"query": "q", "candidates": [{"id": 1, "text": "x"}], "relevance": {"1": 2.0}}\n')
    assert read_query_log(log).qrels == {"line1": {"1": 2}}


def test_editing_a_candidate_in_place_is_re_extracted(tmp_path):
    """Same byte count, other text: the cache is keyed on content, not on the log's path and size."""
    from routehead_rag.engine.scorer import AttentionScorer
    from routehead_rag.offline.extraction import extract

    backbone = tiny_backbone("llama")
    scorer = AttentionScorer(backbone)
    log = tmp_path / "log.jsonl"

    def run(text):
        log.write_text(json.dumps({"id": "q", "query": "sea", "candidates": [{"id": "a", "text": text},
                                                                            {"id": "b", "text": "stock prices"}]}) + "\n")
        source = read_query_log(log)
        return extract(scorer, source.name, source.queries, source.candidates, source.passages, tmp_path / "cache")["q"]

    first = run("the moon pulls the sea")
    size = log.stat().st_size
    second = run("the sun warms the sand")
    assert log.stat().st_size == size
    assert not torch.equal(first.real, second.real)
    fresh = AttentionScorer(backbone).head_scores("sea", ["the sun warms the sand", "stock prices"])
    torch.testing.assert_close(second.real, fresh.real.half().float(), atol=0, rtol=0)  # the cache keeps float16


def test_an_interrupted_artifact_write_leaves_nothing_the_next_write_does_not_clean(tiny_router, tmp_path):
    from routehead_rag.fit.report import model_card
    from routehead_rag.router.artifact import load_artifact, read_artifact_config, save_artifact

    _, router_dir = tiny_router
    router, config = load_artifact(router_dir)
    out = tmp_path / "router"
    shutil.copytree(router_dir, out)
    (tmp_path / ".router.tmp-killed").mkdir()  # what a kill -9 during a write leaves
    (tmp_path / ".router.tmp-killed" / "router.safetensors").write_bytes(b"half")
    (tmp_path / ".router.old-4242").mkdir()
    save_artifact(out, router, config, model_card(config))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]
    assert read_artifact_config(out).files == config.files  # the same weights, the same checksum
    load_artifact(out)


def test_surrogates_in_haystack_content_and_meta_are_scored_and_returned_untouched(shared):
    from haystack import Document

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    model, tokenizer = shared
    ranker = RouteHeadRanker(model=model, tokenizer=tokenizer, heads="all", meta_fields_to_embed=["title"], top_k=None)
    documents = [Document(id="a", content="the moon\ud800", meta={"title": "tides\udfff"}),
                 Document(id="b", content="stock prices", meta={"title": "ok"})]
    before = [d.to_dict() for d in documents]
    result = ranker.run(query="tides\ud800", documents=documents)["documents"]
    assert [d.to_dict() for d in documents] == before
    assert {d.id for d in result} == {"a", "b"} and all(math.isfinite(d.score) for d in result)
    assert next(d for d in result if d.id == "a").content == "the moon\ud800"


def test_surrogates_in_llama_index_metadata_are_scored_and_returned_untouched(shared):
    from llama_index.core.schema import NodeWithScore, TextNode

    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    model, tokenizer = shared
    rerank = RouteHeadPostprocessor(model=model, tokenizer=tokenizer, heads="all", top_n=2)
    nodes = [NodeWithScore(node=TextNode(text="the moon", metadata={"title": "tides\ud800"}), score=0.5),
             NodeWithScore(node=TextNode(text="stock\udfff prices"), score=0.4)]
    before = [n.node.model_dump() for n in nodes]
    result = rerank.postprocess_nodes(nodes, query_str="sea\udfff")
    assert [n.node.model_dump() for n in nodes] == before
    assert len(result) == 2 and all(math.isfinite(n.score) for n in result)


# -- second round: first-stage scores, the CLI's own output -------------------------------------


def handmade_router(backbone, folder, *, fusion="off", weight=0.0, lora=None, seed=0):
    """A router artifact written without a fit: seeded random weights, every setting chosen here (no
    calibration, so scores are the fused scores themselves)."""
    from routehead_rag.engine.scorer import ScoringConfig
    from routehead_rag.fusion import FusionConfig
    from routehead_rag.router.artifact import RouterArtifactConfig, save_artifact
    from routehead_rag.router.model import Router, RouterConfig, SelectionConfig

    shape = RouterConfig(input_dim=backbone.hidden_size, num_layers=backbone.num_layers, num_heads=backbone.num_heads,
                         dim=8, hidden=16, fusion_head=fusion == "per_query")
    torch.manual_seed(seed)
    router = Router(shape)
    if shape.fusion_head:
        torch.nn.init.normal_(router.fusion.weight, std=0.5)  # weights that differ from query to query
    config = RouterArtifactConfig(
        backbone_name="tiny", backbone_fingerprint=backbone.fingerprint(), scoring=ScoringConfig(),
        query_embedding=QueryEmbeddingConfig(layer=0), router=shape, selection=SelectionConfig(k=2, max_heads=2),
        fusion=FusionConfig(mode=fusion, weight=weight), lora=None if lora is None else lora.config,
    )
    return save_artifact(folder, router, config, "a router written by a test", lora)


@pytest.fixture(scope="module")
def fused(shared, tmp_path_factory):
    """The tiny model and a router whose global first-stage weight (2) makes the first stage count."""
    model, tokenizer = shared
    from routehead_rag.model.backbone import load_backbone

    folder = handmade_router(load_backbone(model=model, tokenizer=tokenizer), tmp_path_factory.mktemp("fused") / "r",
                             fusion="global", weight=2.0)
    return RouteHeadReranker(model=model, tokenizer=tokenizer, heads=folder), folder


def scored(results):
    return [(r.index, r.score) for r in results]


def test_numpy_first_stage_scores_rank_as_the_same_numbers(fused):
    import numpy as np

    reranker, _ = fused
    values = [0.25, 0.75, 0.5]  # exact in float32
    expected = scored(reranker.rank("tides", DOCS, first_stage_scores=values))
    for given in (np.array(values, dtype="float32"), np.array(values), [np.float32(v) for v in values],
                  [np.float64(v) for v in values], np.array([1, 3, 2], dtype="int64"), [np.int16(1), 3, 2.0]):
        frozen = copy.deepcopy(given)
        assert scored(reranker.rank("tides", DOCS, first_stage_scores=given)) == expected, given
        assert np.array_equal(np.asarray(given), np.asarray(frozen))  # not modified
    assert scored(reranker.rank("tides", DOCS)) != expected  # the scores were used, not the input order


def test_huge_finite_first_stage_scores_neither_overflow_nor_blank_a_passage(fused):
    reranker, _ = fused
    huge = reranker.rank("tides", DOCS, first_stage_scores=[1e307, 1e308, -1e308])
    assert EMPTY_PASSAGE_SCORE not in [r.score for r in huge] and all(math.isfinite(r.score) for r in huge)
    assert scored(huge) == scored(reranker.rank("tides", DOCS, first_stage_scores=[2.0, 3.0, 1.0]))  # the same ranks


@pytest.mark.parametrize("given", [{0.1, 0.2, 0.3}, frozenset({1.0, 2.0, 3.0}), {"a": 1.0, "b": 2.0, "c": 3.0}, "123"])
def test_unordered_or_textual_first_stage_scores_are_refused(fused, given):
    reranker, _ = fused
    with pytest.raises(TypeError, match="first_stage_scores must be a list .* got "):
        reranker.rank("tides", DOCS, first_stage_scores=given)


def test_rank_batch_names_first_stage_scores_that_are_not_a_list(fused):
    reranker, _ = fused
    with pytest.raises(TypeError, match="first_stage_scores must be a list .* got generator"):
        reranker.rank_batch(["tides"], [DOCS], first_stage_scores=(s for s in [[0.1, 0.2, 0.3]]))
    with pytest.raises(TypeError, match=r"first_stage_scores\[0\] must be a list .* a set"):
        reranker.rank_batch(["tides"], [DOCS], first_stage_scores=[{0.1, 0.2, 0.3}])


def test_haystack_numpy_document_scores_fuse_as_scores_not_as_the_input_order(fused, shared):
    import numpy as np
    from haystack import Document

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    reranker, folder = fused
    model, tokenizer = shared
    ranker = RouteHeadRanker(model=model, tokenizer=tokenizer, heads=str(folder), top_k=None)
    values = [0.25, 0.75, 0.5]
    documents = [Document(id=f"d{i}", content=text, score=np.float32(v)) for i, (text, v) in enumerate(zip(DOCS, values))]
    got = [(d.id, d.score) for d in ranker.run(query="tides", documents=documents)["documents"]]
    by_scores = reranker.rank("tides", DOCS, first_stage_scores=values)
    assert got == [(f"d{r.index}", r.score) for r in by_scores]
    assert got != [(f"d{r.index}", r.score) for r in reranker.rank("tides", DOCS)]  # not the input order


def test_the_cli_prints_user_text_as_written_never_as_markup(tmp_path):
    from typer.testing import CliRunner

    from routehead_rag.cli import app

    model_dir = tmp_path / "tiny-llama"
    tiny_causal_lm("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    query, passage = "[/] tides [link=x] :smile:", "The Moon [bold]pulls[/bold] the ocean [/]."
    passages = tmp_path / "passages.jsonl"
    passages.write_text(json.dumps({"id": "[red]id[/]", "text": passage}) + "\n" + json.dumps({"text": "[/"}) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["rerank", "--heads", "L1.H0,L1.H3", "--model", str(model_dir), query, "[/]",
                                 "Stock prices [link=x]fell"], terminal_width=400)
    assert result.exit_code == 0, result.output
    for text in (query, "[/]", "Stock prices [link=x]fell"):
        assert text in result.output
    result = runner.invoke(app, ["rerank", "--model", str(model_dir), "--heads", "all", query, "--file", str(passages)],
                           terminal_width=400)
    assert result.exit_code == 0, result.output
    for text in (passage, "[red]id[/]", "[/"):
        assert text in result.output
    result = runner.invoke(app, ["rerank", "--heads", "L9.H[/]", "--model", str(model_dir), query, "x"])
    assert result.exit_code != 0 and "L9.H[/]" in result.output and "Traceback" not in result.output


def test_progress_stage_names_are_printed_as_written(capsys):
    from routehead_rag.cli_shared import progress_display

    with progress_display(quiet=False) as report:
        report("[/] extracting [link=x]log[/link]", 1, 2)
    assert "[/] extracting [link=x]log[/link]" in capsys.readouterr().err
