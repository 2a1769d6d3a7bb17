"""``RouteHeadReranker.explain``: the ranking is rank()'s, the parts add up, the offsets index the caller's text,
the token weights match eager attention, and the page, the CLI and both integrations carry it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from routehead_rag import RouteHeadReranker
from routehead_rag.engine.offsets import cut_words_mapped
from routehead_rag.engine.prompt import PromptConfig, cut_words
from routehead_rag.engine.scorer import aggregate
from routehead_rag.explain import META_KEY, in_content
from routehead_rag.fusion import CalibrationConfig, FusionConfig, first_stage_signal, standardise
from routehead_rag.heads import Head
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

QUERY = "what moves the sea"
DOCS = ["the moon pulls the sea", "stock prices fell", "tides follow the moon", "five players a team"]
UNICODE = ("  Ünïcödé\tmoon\n\n naïve café 🎉 pulls\r\nthe 日本語のテキスト sea\u2028line\x1cseparated "
           "surrogate\ud800here   end ")
LONG = "The moon pulls the sea.\nTides rise twice a day, and the water falls between them. " * 6


@pytest.fixture(scope="module")
def shared():
    return tiny_causal_lm("llama"), tiny_tokenizer()


def make(shared, **options) -> RouteHeadReranker:
    model, tokenizer = shared
    return RouteHeadReranker(model=model, tokenizer=tokenizer, **options)


@pytest.fixture(scope="module")
def router(shared, tmp_path_factory):
    """A random router on the tiny backbone with a global first-stage weight and a calibration (no fit needed)."""
    from routehead_rag.engine.embedding import QueryEmbeddingConfig
    from routehead_rag.engine.scorer import ScoringConfig
    from routehead_rag.model.backbone import load_backbone
    from routehead_rag.router.artifact import RouterArtifactConfig, save_artifact
    from routehead_rag.router.model import Router, RouterConfig, SelectionConfig

    model, tokenizer = shared
    backbone = load_backbone(model, tokenizer=tokenizer)
    torch.manual_seed(3)
    routing = Router(RouterConfig(input_dim=backbone.hidden_size, num_layers=2, num_heads=4, dim=8, hidden=16))
    with torch.no_grad():
        routing.head_embeddings.mul_(100)  # spread the logits: queries pick different heads
    config = RouterArtifactConfig(
        backbone_name="tiny", backbone_fingerprint=backbone.fingerprint(), scoring=ScoringConfig(),
        query_embedding=QueryEmbeddingConfig(layer=0), router=routing.config,
        selection=SelectionConfig(k=3, max_heads=3), fusion=FusionConfig(mode="global", weight=0.7),
        calibration=CalibrationConfig(slope=1.5, intercept=-0.3),
        calibration_unfused=CalibrationConfig(slope=1.0, intercept=0.1))
    return save_artifact(tmp_path_factory.mktemp("router") / "router", routing, config, "card")


def same(ranking, reference) -> bool:
    fields = ("id", "index", "rank", "score", "chunk", "text", "meta")
    return [tuple(getattr(r, f) for f in fields) for r in ranking] == [tuple(getattr(r, f) for f in fields) for r in reference]


# -- the ranking is rank()'s ----------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    dict(),
    dict(top_k=2),
    dict(score_threshold=-0.01),
    dict(first_stage_scores=[0.1, 0.9, 0.5, 0.3, None]),
    dict(first_stage_scores=[0.1, 0.9, 0.5, 0.3, 0.0], scale_score=False),
])
@pytest.mark.parametrize("heads", ["all", ["L1.H2", "L0.H0"], "router"])
def test_the_ranking_is_ranks_own(shared, router, heads, call):
    reranker = make(shared, heads=router if heads == "router" else heads)
    documents = [*DOCS, "   "]  # a blank one too: ranked last, explained as blank
    assert same(reranker.explain(QUERY, documents, **call).ranking, reranker.rank(QUERY, documents, **call))


def test_chunk_mode_ranking_and_spans(shared):
    reranker = make(shared, heads="all", max_passage_tokens=8, chunk_long_documents=True)
    documents = [LONG, *DOCS]
    explanation = reranker.explain(QUERY, documents, attended="all")
    assert same(explanation.ranking, reranker.rank(QUERY, documents))
    long = explanation.passage(0)
    start, end = long.document.chunk
    assert 0 < end - start < len(LONG)
    assert long.spans and all(start <= s.start < s.end <= end for s in long.spans)
    assert "".join(LONG[s.start : s.end] for s in long.spans) == "".join(LONG[start:end].split())


# -- the parts add up ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads, options", [
    ("all", {}), (["L1.H2", "L0.H0", "L1.H3"], {}), ("router", {}), ("all", {"mask_outliers": True}),
    ("all", {"subtract_content_free": False}),
])
def test_head_contributions_add_up_to_the_score_before_fusion_and_calibration(shared, router, heads, options):
    reranker = make(shared, heads=router if heads == "router" else heads, **options)
    explanation = reranker.explain(QUERY, DOCS, attended="all")
    chosen = reranker.heads_for(QUERY)
    assert [c.head for c in explanation.heads] == (
        sorted(chosen, key=lambda h: -next(c.router_weight for c in explanation.heads if c.head == h))
        if heads == "router" else chosen or [Head(layer, head) for layer in range(2) for head in range(4)])
    reference = reranker.scorer.head_scores(QUERY, DOCS, chosen)
    unfused = reranker.scorer.aggregate(reference, chosen)  # [passage] what the recipe sums
    for passage in explanation:
        assert sum(passage.contributions.values()) + passage.outlier_masking == pytest.approx(passage.attention, abs=1e-6)
        assert passage.attention == pytest.approx(float(unfused[passage.document.index]), abs=1e-6)
        for head, value in passage.contributions.items():
            assert value == pytest.approx(float(reference.debiased[head.layer, head.head, passage.document.index]), abs=1e-6)
        words = sum(s.weight for s in passage.spans)
        assert words + passage.label_weight == pytest.approx(sum(passage.contributions.values()), abs=1e-5)
        assert passage.attention_part + passage.first_stage_part == pytest.approx(passage.fused, abs=1e-9)
    if options.get("mask_outliers"):
        assert any(abs(p.outlier_masking) > 1e-7 for p in explanation)
        with_mask = aggregate(reference.debiased, chosen)
        assert not torch.allclose(with_mask, unfused)
    else:
        assert all(p.outlier_masking == 0.0 for p in explanation)


def test_fusion_and_calibration_are_shown_apart(shared, router):
    reranker = make(shared, heads=router)
    scores = [0.2, 0.9, 0.1, 0.5]
    explanation = reranker.explain(QUERY, DOCS, first_stage_scores=scores)
    assert explanation.fusion_weight == 0.7 and explanation.calibrated
    by_index = {p.document.index: p for p in explanation}
    attention = torch.tensor([by_index[i].attention for i in range(4)], dtype=torch.float64)
    z_attention = standardise(attention)  # [passage], an independent restatement of the formula
    z_first = standardise(first_stage_signal(4, scores))
    for i, passage in by_index.items():
        assert passage.attention_part == pytest.approx(float(z_attention[i]), abs=1e-6)
        assert passage.first_stage_part == pytest.approx(0.7 * float(z_first[i]), abs=1e-6)
        assert passage.probability == pytest.approx(1 / (1 + math.exp(-(1.5 * passage.fused - 0.3))), abs=1e-6)
        assert passage.probability == passage.document.score
    assert [by_index[i].first_stage_rank for i in range(4)] == [3, 1, 4, 2]
    plain = make(shared, heads=router, fuse_first_stage=False, scale_score=False).explain(QUERY, DOCS)
    assert plain.fusion_weight is None and not plain.calibrated
    for passage in plain:
        assert passage.first_stage_part == 0.0 and passage.probability is None
        assert passage.fused == pytest.approx(passage.attention, abs=1e-7) == passage.document.score


def test_routed_heads_carry_the_routers_weights(shared, router):
    reranker = make(shared, heads=router)
    strategy = reranker.resolved_strategy
    from routehead_rag.engine.embedding import embed_query

    tops = set()
    for query in ("what moves the sea", "stock prices fell on monday", "five players on the court", "bread"):
        explanation = reranker.explain(query, DOCS)
        assert explanation.strategy == "routed" and explanation.description.startswith("routed (router")
        assert {c.head for c in explanation.heads} == set(reranker.heads_for(query))
        with torch.no_grad():
            embedding = embed_query(reranker.scorer.backbone, query, strategy.config.query_embedding)
            logits = strategy.router(embedding[None])[0]  # [layer * head]
        for choice in explanation.heads:
            assert choice.router_weight == pytest.approx(float(torch.sigmoid(logits[choice.head.layer * 4 + choice.head.head])))
        weights = [c.router_weight for c in explanation.heads]
        assert weights == sorted(weights, reverse=True)
        tops.add(explanation.heads[0].head)
    assert len(tops) > 1  # different queries, different top heads


# -- token weights and offsets ------------------------------------------------------------------


def test_token_weights_equal_eager_attention_on_the_passage_tokens(shared):
    reranker = make(shared, heads=["L0.H1", "L1.H3"])
    scorer = reranker.scorer
    scores = scorer.head_scores(QUERY, DOCS, [Head(0, 1), Head(1, 3)], token_weights=True)
    layout = scorer.prompts.layout(DOCS)
    model = scorer.backbone.causal_lm
    per_query = []
    for text in (QUERY, "N/A"):
        part = scorer.prompts.query_part(text, layout.prefix_length)
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                attentions = model(torch.tensor([layout.prefix_ids + part.ids]), output_attentions=True).attentions
        finally:
            model.set_attn_implementation("sdpa")
        rows = [attentions[layer][0, head, part.span.start : part.span.end, : layout.prefix_length].mean(dim=0)
                for layer, head in ((0, 1), (1, 3))]  # [prefix keys] each
        per_query.append(sum(rows))  # [prefix keys] summed over the two heads
    debiased = per_query[0] - per_query[1]
    for index, span in enumerate(layout.passage_spans):
        count = layout.passage_token_counts[index]
        torch.testing.assert_close(scores.tokens[index], debiased[span.end - count : span.end], atol=1e-5, rtol=0)
    assert scorer.head_scores(QUERY, DOCS).tokens is None  # off unless asked: rank's pass is unchanged


def words_of(text: str) -> str:
    return "".join(text.split())


def test_offsets_index_the_callers_text_with_unicode_newlines_and_surrogates(shared):
    documents = [UNICODE, "tides\n\nfollow  the moon", *DOCS]
    frozen = copy.deepcopy(documents)
    explanation = make(shared, heads="all", max_passage_tokens=None).explain(QUERY, documents, attended="all")
    assert documents == frozen  # nothing the caller passed is changed
    for passage in explanation:
        text = passage.document.text
        assert passage.scored_end is None
        assert "".join(text[s.start : s.end] for s in passage.spans) == words_of(text)  # every word, in order, once
        assert all(text[s.start : s.end].strip() == text[s.start : s.end] for s in passage.spans)
    spans = {UNICODE[s.start : s.end] for s in explanation.passage(0).spans}
    assert {"Ünïcödé", "naïve", "café", "🎉", "pulls", "surrogate", "\ud800", "here"} <= spans  # U+FFFD: not a letter
    assert "日本語のテキスト" not in spans and "日" in "".join(spans)  # wide characters: a token each


def test_offsets_of_a_cut_passage_end_where_reading_stopped(shared):
    reranker = make(shared, heads="all", max_passage_tokens=12)
    explanation = reranker.explain(QUERY, [LONG, *DOCS], attended="all")
    long = explanation.passage(0)
    assert long.scored_end is not None and 0 < long.scored_end < len(LONG)
    assert all(s.end <= long.scored_end for s in long.spans)
    assert "".join(LONG[s.start : s.end] for s in long.spans) == words_of(LONG[: long.scored_end])
    builder = reranker.scorer.prompts
    read = tiny_tokenizer().decode(builder.cut_passage(LONG))  # the byte-level tokenizer decodes what it read
    assert cut_words(read, None) == cut_words(LONG[: long.scored_end], None)
    assert all(p.scored_end is None for p in explanation if p.document.index)


def test_offsets_after_a_word_cut(shared):
    prompt = PromptConfig(max_passage_words=5, max_passage_tokens=None)
    explanation = make(shared, heads="all", prompt=prompt).explain(QUERY, [UNICODE, *DOCS], attended="all")
    first = explanation.passage(0)
    assert words_of(UNICODE[: first.scored_end]) == "".join(UNICODE.split()[:5])
    assert "".join(UNICODE[s.start : s.end] for s in first.spans) == "".join(UNICODE.split()[:5])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab é🎉日\n\r\t\x0b\x1c\x85\u2028 ")), max_size=40),
       st.one_of(st.none(), st.integers(0, 8)))
def test_cut_words_mapped_is_cut_words_with_offsets(text, max_words):
    kept, kept_starts, text_starts = cut_words_mapped(text, max_words)
    assert kept == cut_words(text, max_words)
    words = kept.split()
    assert [kept[k : k + len(w)] for k, w in zip(kept_starts, words)] == words
    assert [text[t : t + len(w)] for t, w in zip(text_starts, words)] == words


def test_only_the_best_passages_get_spans_unless_asked(shared):
    reranker = make(shared, heads="all")
    assert [p.spans is not None for p in reranker.explain(QUERY, DOCS, attended=2)] == [True, True, False, False]
    assert all(p.spans is None for p in reranker.explain(QUERY, DOCS, attended=0))
    for bad in (-1, "some", True, 1.5):
        with pytest.raises(ValueError, match=f"attended must be .* got {bad!r}"):
            reranker.explain(QUERY, DOCS, attended=bad)


def test_a_slow_tokenizer_is_a_clear_error_only_when_spans_are_asked(shared, monkeypatch):
    reranker = make(shared, heads="all")
    reranker.warm_up()
    monkeypatch.setattr(type(reranker.scorer.backbone.tokenizer), "is_fast", property(lambda self: False))
    with pytest.raises(ValueError, match="fast tokenizer .* pass attended=0"):
        reranker.explain(QUERY, DOCS)
    assert reranker.explain(QUERY, DOCS, attended=0).passages


def test_blank_documents_only_load_nothing(shared):
    reranker = make(shared, heads="all")
    explanation = reranker.explain(QUERY, ["", "  "])
    assert not reranker.is_loaded and [p.attention for p in explanation] == [None, None]
    json.dumps(explanation.to_dict(), allow_nan=False)


# -- the page, the CLI ---------------------------------------------------------------------------


def test_the_page_escapes_user_text_and_renders_in_jupyter(shared):
    documents = ["<script>alert(1)</script> the moon & the sea", *DOCS, "<img src=x onerror=alert(2)>"]
    explanation = make(shared, heads="all").explain("<b>sea</b>?", documents, attended=2)
    page = explanation.to_html()
    assert page == explanation._repr_html_()
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page  # a passage without spans: plain, escaped
    assert "&lt;</mark><mark" in page or "&lt;script" in page  # with spans: each piece escaped
    assert "&lt;b&gt;sea&lt;/b&gt;?" in page and page.count("class='rh-passage'") == len(documents)
    assert page.count("<mark") == sum(len(p.spans) for p in explanation if p.spans)


def test_cli_explain_prints_heads_and_writes_the_page(shared, tmp_path):
    from routehead_rag.cli import app

    folder = tmp_path / "tiny"
    shared[0].save_pretrained(folder)
    shared[1].save_pretrained(folder)
    page = tmp_path / "why.html"
    runner = CliRunner()
    result = runner.invoke(app, ["rerank", "sea [bold]", "the moon [red]pulls[/red] the sea", "stock prices fell",
                                 "--model", str(folder), "--heads", "L0.H1,L1.H2", "--explain", "--explain-html", str(page)])
    assert result.exit_code == 0, result.output
    assert "L0.H1" in result.output and "L1.H2" in result.output and "[red]pulls[/red]" in result.output
    assert "<mark" in page.read_text(encoding="utf-8")
    result = runner.invoke(app, ["rerank", "sea", "a", "b", "--model", str(folder), "--explain", "--json"])
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["explanation"]["passages"][0]["id"] == answer["results"][0]["id"]


def test_the_terminal_highlights_exactly_the_top_words(shared):
    import re

    from rich.console import Console

    from routehead_rag.cli_explain import print_explanation

    documents = ["the moon\n\npulls [red]the[/red] sea 🎉 çà\r\nline two here", "stock prices fell"]
    explanation = make(shared, heads="all").explain(QUERY, documents)
    console = Console(record=True, width=300, force_terminal=True, color_system="truecolor")
    print_explanation(explanation, console, top_spans=3)
    shown = re.findall(r'<span style="[^"]*background-color[^"]*">([^<]*)</span>', console.export_html(inline_styles=True, clear=False))
    expected = [p.text[s.start : s.end] for p in explanation for s in p.top_spans(3) if s.weight > 0]
    assert sorted(shown) == sorted(expected) and "[red]the[/red]" in console.export_text()


# -- the integrations ----------------------------------------------------------------------------


def test_in_content_moves_spans_out_of_embedded_metadata():
    record = {"spans": [{"start": 0, "end": 5, "weight": 0.5, "text": "Title"},
                        {"start": 6, "end": 10, "weight": 0.25, "text": "moon"}], "scored_end": None}
    moved = in_content(record, "Title\nmoon sea", "moon sea", "doc-7")
    assert moved["spans"] == [{"start": 0, "end": 4, "weight": 0.25, "text": "moon"}] and moved["metadata_weight"] == 0.5
    assert moved["id"] == "doc-7"
    stripped = in_content({"spans": [{"start": 7, "end": 11, "weight": 0.25, "text": "moon"}], "scored_end": None},
                          "Title\n\nmoon sea", "  moon sea\n", "doc-7")  # LlamaIndex strips the whole
    assert stripped["spans"] == [{"start": 2, "end": 6, "weight": 0.25, "text": "moon"}]
    assert record["spans"][1]["start"] == 6  # not modified


def test_haystack_meta_is_json_and_survives_serialisation_and_a_pipeline(shared, tmp_path):
    from haystack import Document, Pipeline

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    folder = tmp_path / "tiny"
    shared[0].save_pretrained(folder)
    shared[1].save_pretrained(folder)
    documents = [Document(id=f"d{i}", content=t, meta={"title": f"T{i} ünï"}) for i, t in enumerate([UNICODE, *DOCS])]
    frozen = copy.deepcopy(documents)
    ranker = RouteHeadRanker(model=str(folder), heads="all", top_k=3, meta_fields_to_embed=["title"], explain=True,
                             dtype="float32")
    assert ranker.to_dict()["init_parameters"]["explain"] is True
    assert RouteHeadRanker.from_dict(ranker.to_dict()).explain is True
    pipeline = Pipeline()
    pipeline.add_component("ranker", ranker)
    loaded = Pipeline.loads(pipeline.dumps())
    assert loaded == pipeline
    first = pipeline.run({"ranker": {"query": QUERY, "documents": documents}})["ranker"]["documents"]
    again = loaded.run({"ranker": {"query": QUERY, "documents": documents}})["ranker"]["documents"]
    assert documents == frozen and len(first) == 3
    for document, other in zip(first, again):
        why = document.meta[META_KEY]
        assert json.loads(json.dumps(why, allow_nan=False)) == why == other.meta[META_KEY]
        assert why["id"] == document.id and why["score"] == document.score and why["heads"]
        assert all(document.content[s["start"] : s["end"]] == s["text"] for s in why["spans"])
        assert why["metadata_weight"] != 0.0  # the title's words drew attention too, and stay out of the spans
        assert Document.from_dict(document.to_dict()) == document
    assert "".join(s["text"] for s in first[0].meta[META_KEY]["spans"]) == words_of(first[0].content)
    plain = RouteHeadRanker(model=str(folder), heads="all", top_k=3, dtype="float32")
    assert all(META_KEY not in d.meta for d in plain.run(query=QUERY, documents=documents)["documents"])


def test_llama_index_metadata_is_json_survives_serialisation_and_stays_out_of_the_llms_text(shared):
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    model, tokenizer = shared
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"source": "wiki"}), score=1.0 - 0.1 * i)
             for i, t in enumerate([UNICODE, *DOCS])]
    frozen = copy.deepcopy(nodes)
    rerank = RouteHeadPostprocessor(model=model, tokenizer=tokenizer, heads="all", top_n=3, explain=True,
                                    keep_retrieval_score=True)
    data = rerank.to_dict()
    assert data["explain"] is True
    assert RouteHeadPostprocessor.from_dict(data, model=model, tokenizer=tokenizer).explain is True
    ranked = rerank.postprocess_nodes(nodes, query_str=QUERY)
    assert [n.model_dump() for n in nodes] == [n.model_dump() for n in frozen]
    reference = make(shared, heads="all").rank(QUERY, [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes],
                                               top_k=3, first_stage_scores=[n.score for n in nodes])
    assert [(n.node.node_id, n.score) for n in ranked] == [(f"n{r.index}", r.score) for r in reference]
    for item in ranked:
        why = item.node.metadata[META_KEY]
        assert json.loads(json.dumps(why, allow_nan=False)) == why and item.node.metadata["retrieval_score"] is not None
        assert all(item.node.text[s["start"] : s["end"]] == s["text"] for s in why["spans"])
        assert META_KEY not in item.node.get_content(metadata_mode=MetadataMode.LLM)
        assert META_KEY not in item.node.get_content(metadata_mode=MetadataMode.EMBED)
        assert why["id"] == item.node.node_id
        assert TextNode.from_json(item.node.to_json()).metadata[META_KEY] == why
    with pytest.raises(ValueError, match="explain must be True or False, got 'yes'"):
        RouteHeadPostprocessor(explain="yes")
