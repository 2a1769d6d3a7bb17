"""Issue 19, the setting a RAG builder has: a passage budget set from every entry point (and the cut logged), long
documents in chunks (the best chunk decides), single-candidate scores, one calibration per configuration, and
``scale_score`` meaning the same in the core and both integrations. Each against a reference computed apart:
a passage cut by hand, the chunks ranked as documents of their own, the scorer's head scores put through the
formula written out here."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math

import pytest
import torch
from typer.testing import CliRunner

from routehead_rag import RouteHeadReranker
from routehead_rag.engine.prompt import cut_words
from routehead_rag.engine.scorer import aggregate
from routehead_rag.fusion import CalibrationConfig, FusionConfig
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

QUERY = "what moves the sea"
DOCS = ["the moon pulls the sea", "stock prices fell", "tides follow the moon"]
LONG = "The moon pulls the sea.\nTides rise twice a day, and the water falls between them. " * 6
LONGER = "Rain fell all night over the mountains, the rivers rose, and by morning the old bridge was gone. " * 5
BUDGET = 16
LOGGER = "routehead_rag.reranker"
CUT = "longer than the passage budget"

runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()


@pytest.fixture(scope="module")
def shared():
    return tiny_causal_lm("llama"), tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(shared, tmp_path_factory):
    """The same tiny llama saved to a folder: what a serialised ranker (or the CLI) loads by name."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = shared
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make(shared, **options) -> RouteHeadReranker:
    model, tokenizer = shared
    return RouteHeadReranker(model=model, tokenizer=tokenizer, **options)


def write_router(shared, folder, fusion: FusionConfig, calibration, calibration_unfused, bi_encoder=None):
    """A random router on the tiny backbone with the given fusion, calibrations and bi-encoder (config only, no fit)."""
    from routehead_rag.engine.embedding import QueryEmbeddingConfig
    from routehead_rag.engine.scorer import ScoringConfig
    from routehead_rag.model.backbone import load_backbone
    from routehead_rag.router.artifact import RouterArtifactConfig, save_artifact
    from routehead_rag.router.model import Router, RouterConfig, SelectionConfig

    model, tokenizer = shared
    backbone = load_backbone(model, tokenizer=tokenizer)
    torch.manual_seed(5)
    routing = Router(RouterConfig(input_dim=backbone.hidden_size, num_layers=2, num_heads=4, dim=8, hidden=16))
    config = RouterArtifactConfig(
        backbone_name="tiny", backbone_fingerprint=backbone.fingerprint(), scoring=ScoringConfig(),
        query_embedding=QueryEmbeddingConfig(layer=0), router=routing.config,
        selection=SelectionConfig(k=3, max_heads=3), fusion=fusion, calibration=calibration,
        calibration_unfused=calibration_unfused, bi_encoder=bi_encoder)
    return save_artifact(folder, routing, config, "card")


FUSED = CalibrationConfig(slope=1.5, intercept=-0.3, count_slope=0.2)
UNFUSED = CalibrationConfig(slope=0.8, intercept=0.4, count_slope=-0.1)


@pytest.fixture(scope="module")
def router(shared, tmp_path_factory):
    """Global fusion, a level term, and one calibration per configuration (fused and unfused), each with a list-size
    term."""
    return write_router(shared, tmp_path_factory.mktemp("router") / "router",
                        FusionConfig(mode="global", weight=0.7, level_weight=0.5), FUSED, UNFUSED)


@pytest.fixture(scope="module")
def fused_only_router(shared, tmp_path_factory):
    """Fusion and a calibration of the fused score only (a router fitted before unfused calibrations existed)."""
    return write_router(shared, tmp_path_factory.mktemp("fused-only") / "router",
                        FusionConfig(mode="global", weight=0.7), FUSED, None)


def cut_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and CUT in r.getMessage()]


def first_tokens(tokenizer, text: str, budget: int) -> tuple[str, int]:
    """``(prefix, kept)``: ``text`` (whitespace normalised, as the prompt reads it) cut by hand to its first ``kept``
    tokens, at the first word boundary at or after ``budget`` tokens where the prefix alone encodes to those tokens."""
    text = cut_words(text, None)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    for kept in range(budget, len(ids)):
        prefix = text[: offsets[kept][0]]
        if text[offsets[kept][0]] == " " and tokenizer.encode(prefix, add_special_tokens=False) == ids[:kept]:
            return prefix, kept
    raise AssertionError("no word boundary to cut at")


# -- 1. the passage budget, from every entry point, and the cut logged ----------------------------------------------


@pytest.fixture(scope="module")
def cut_setting(shared):
    """A budget that ends on a word boundary of LONG, and the reference scores: LONG cut by hand to that many tokens,
    scored with no budget at all."""
    _, tokenizer = shared
    prefix, budget = first_tokens(tokenizer, LONG, 24)
    reference = make(shared, heads="all", max_passage_tokens=100_000).rank(QUERY, [prefix, *DOCS])
    return budget, {r.index: r.score for r in reference}


def test_the_budget_scores_a_passage_as_its_first_n_tokens_and_warns_once(shared, cut_setting, caplog):
    budget, reference = cut_setting
    reranker = make(shared, heads="all", max_passage_tokens=budget)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = reranker.rank(QUERY, [LONG, *DOCS])
    assert {r.index: r.score for r in results} == pytest.approx(reference, abs=1e-7)
    assert results[results.ids().index(0)].text == LONG  # the caller's text comes back whole
    (record,) = cut_records(caplog)  # once per call
    assert record.levelno == logging.WARNING
    assert f"1 of {1 + len(DOCS)} passages" in record.getMessage()  # how many
    assert f"({budget} tokens;" in record.getMessage()  # to what length
    whole = len(tiny_tokenizer().encode(cut_words(LONG, None), add_special_tokens=False))
    assert f"the longest had {whole} tokens" in record.getMessage()
    # a budget that cuts nothing changes nothing and logs nothing (the budget is counted in tokens, not words)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        roomy = make(shared, heads="all", max_passage_tokens=whole).rank(QUERY, [LONG, *DOCS])
        unbudgeted = make(shared, heads="all", max_passage_tokens=100_000).rank(QUERY, [LONG, *DOCS])
    assert [(r.index, r.score) for r in roomy] == [(r.index, r.score) for r in unbudgeted]
    assert [(r.index, r.score) for r in roomy] != [(r.index, r.score) for r in results]
    assert cut_records(caplog) == []


def test_one_warning_per_call_however_many_passages_are_cut_and_it_can_be_silenced(shared, caplog):
    reranker = make(shared, heads="all", max_passage_tokens=BUDGET)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        reranker.rank(QUERY, [LONG, DOCS[0], LONGER, DOCS[1]])
        reranker.explain(QUERY, [LONG, DOCS[0], LONGER])
        reranker.rank(QUERY, DOCS)  # nothing over the budget: nothing logged
    first, second = cut_records(caplog)
    assert "2 of 4 passages" in first.getMessage() and f"({BUDGET} tokens;" in first.getMessage()
    assert "2 of 3 passages" in second.getMessage()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="routehead_rag"):  # through logging: a user silences it there
        reranker.rank(QUERY, [LONG, *DOCS])
    assert cut_records(caplog) == []


def test_rank_batch_warns_once_for_the_whole_call(shared, caplog):
    reranker = make(shared, heads="all", max_passage_tokens=BUDGET)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        batch = reranker.rank_batch([QUERY, QUERY, QUERY], [[LONG, DOCS[0]], DOCS, [LONGER, LONG, DOCS[1]]])
    (record,) = cut_records(caplog)
    assert "3 of 8 passages of 3 queries" in record.getMessage() and f"({BUDGET} tokens;" in record.getMessage()
    one_by_one = [reranker.rank(QUERY, d) for d in ([LONG, DOCS[0]], DOCS, [LONGER, LONG, DOCS[1]])]
    assert [[r.id for r in b] for b in batch] == [[r.id for r in o] for o in one_by_one]


def test_the_default_budget_cuts_nothing_short_and_logs_nothing(shared, caplog):
    with caplog.at_level(logging.DEBUG, logger="routehead_rag"):
        make(shared, heads="all").rank(QUERY, DOCS)
    assert cut_records(caplog) == []


def test_haystack_takes_the_budget_serialises_it_and_scores_as_the_core(model_dir, cut_setting, caplog):
    from haystack import Document

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    budget, reference = cut_setting
    ranker = RouteHeadRanker(model=str(model_dir), heads="all", dtype="float32", top_k=None,
                             max_passage_tokens=budget, chunk_long_documents=False)
    data = ranker.to_dict()
    assert data["init_parameters"]["max_passage_tokens"] == budget
    restored = RouteHeadRanker.from_dict(json.loads(json.dumps(data)))
    assert restored.to_dict() == data and restored.options.max_passage_tokens == budget
    documents = [Document(id=f"d{i}", content=text) for i, text in enumerate([LONG, *DOCS])]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ranked = restored.run(query=QUERY, documents=documents)["documents"]
    assert {d.id: d.score for d in ranked} == pytest.approx({f"d{i}": s for i, s in reference.items()}, abs=1e-6)
    assert len(cut_records(caplog)) == 1
    chunked = RouteHeadRanker.from_dict(RouteHeadRanker(model=str(model_dir), max_passage_tokens=BUDGET,
                                                        chunk_long_documents=True).to_dict())
    assert chunked.options.chunk_long_documents is True and chunked.options.max_passage_tokens == BUDGET


def test_llama_index_takes_the_budget_serialises_it_and_scores_as_the_core(model_dir, cut_setting, caplog):
    from llama_index.core.schema import NodeWithScore, TextNode

    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    budget, reference = cut_setting
    rerank = RouteHeadPostprocessor(model=str(model_dir), heads="all", dtype="float32", top_n=10,
                                    max_passage_tokens=budget, chunk_long_documents=False)
    data = rerank.to_dict()
    assert data["max_passage_tokens"] == budget and data["chunk_long_documents"] is False
    restored = RouteHeadPostprocessor.from_dict(json.loads(json.dumps(data)))
    assert restored.to_dict() == data and restored.reranker.options.max_passage_tokens == budget
    nodes = [NodeWithScore(node=TextNode(text=text, id_=f"n{i}")) for i, text in enumerate([LONG, *DOCS])]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ranked = restored.postprocess_nodes(nodes, query_str=QUERY)
    assert {n.node.node_id: n.score for n in ranked} == pytest.approx(
        {f"n{i}": s for i, s in reference.items()}, abs=1e-6)
    assert len(cut_records(caplog)) == 1
    chunked = RouteHeadPostprocessor.from_dict(RouteHeadPostprocessor(max_passage_tokens=BUDGET,
                                                                      chunk_long_documents=True).to_dict())
    assert chunked.chunk_long_documents is True and chunked.reranker.options.max_passage_tokens == BUDGET


def test_rerank_cli_takes_the_budget_and_logs_the_cut(model_dir, cut_setting, tmp_path, caplog):
    from routehead_rag.cli import app

    budget, reference = cut_setting
    passages = tmp_path / "passages.jsonl"
    passages.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate([LONG, *DOCS])))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = runner.invoke(app, ["rerank", QUERY, "--file", str(passages), "--model", str(model_dir), "--heads",
                                     "all", "--dtype", "float32", "--max-passage-tokens", str(budget), "--json"])
    assert result.exit_code == 0, result.output
    (answer,) = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert {r["id"]: r["score"] for r in answer["results"]} == pytest.approx(
        {f"p{i}": s for i, s in reference.items()}, abs=1e-6)
    assert len(cut_records(caplog)) == 1


# -- 2. chunk mode: the best chunk decides, nothing lost or duplicated -------------------------------------------------


def chunks_of(reranker, text: str) -> list[tuple[int, int]]:
    """The chunk spans of ``text``, checked here: in order, covering the text, each within the budget as scored."""
    spans = reranker.scorer.prompts.split_passage(text, BUDGET)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous: no character lost or repeated
    tokenizer = tiny_tokenizer()
    for start, end in spans:
        assert 0 < len(tokenizer.encode(cut_words(text[start:end], None), add_special_tokens=False)) <= BUDGET
    return spans


def test_chunk_mode_scores_a_document_as_its_best_chunk(shared, caplog):
    documents = [{"id": "long", "text": LONG, "meta": {"source": "a"}}, {"id": "moon", "text": DOCS[0]},
                 {"id": "rain", "text": LONGER, "meta": {"source": "b"}}, {"id": "stock", "text": DOCS[1]}, "   "]
    snapshot = copy.deepcopy(documents)
    items = list(documents)
    reranker = make(shared, heads="all", max_passage_tokens=BUDGET, chunk_long_documents=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = reranker.rank(QUERY, documents)
    assert cut_records(caplog) == []  # nothing is cut in chunk mode
    assert documents == snapshot and all(a is b for a, b in zip(documents, items))  # the caller's list untouched
    # every document exactly once, its id, text and meta as given
    assert sorted(r.index for r in results) == [0, 1, 2, 3, 4]
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    for r in results:
        given = documents[r.index]
        if isinstance(given, dict):
            assert (r.id, r.text, r.meta or {}) == (given["id"], given["text"], given.get("meta", {}))
    # the reference: every chunk ranked as a document of its own, in the same list, the same settings
    pieces, owners = [], []
    for index, document in enumerate(documents[:4]):
        text = document["text"]
        spans = chunks_of(reranker, text)
        assert (len(spans) > 1) == (text in (LONG, LONGER))
        pieces += [(index, span) for span in spans]
        owners.append(index)
    texts = [documents[i]["text"][a:b] for i, (a, b) in pieces]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        alone = make(shared, heads="all", max_passage_tokens=BUDGET).rank(QUERY, texts)
    assert cut_records(caplog) == []  # each chunk fits the budget as the reference scores it
    chunk_scores = {r.index: r.score for r in alone}
    by_index = {r.index: r for r in results}
    for index in owners:
        mine = [k for k, (owner, _) in enumerate(pieces) if owner == index]
        best = max(mine, key=lambda k: chunk_scores[k])
        assert by_index[index].score == pytest.approx(chunk_scores[best], abs=1e-7)
        assert by_index[index].score == pytest.approx(max(chunk_scores[k] for k in mine), abs=1e-7)
        assert by_index[index].chunk == (pieces[best][1] if len(mine) > 1 else None)
    scores = [r.score for r in results[:4]]
    assert scores == sorted(scores, reverse=True) and results[4].index == 4  # best first, the blank one last


def test_chunk_mode_with_fusion_gives_each_chunk_its_documents_first_stage_rank(shared, router):
    """With a router the chunks are one list: ``z(mass) + w * z(first stage) + level * mass * n``, then the fused
    calibration with ``n`` the number of chunks scored; each chunk carries its document's first-stage rank."""
    reranker = make(shared, heads=router, max_passage_tokens=BUDGET, chunk_long_documents=True)
    documents = [DOCS[0], LONG, DOCS[1], LONGER]
    retrieval = [0.3, 0.9, 0.1, 0.5]  # first-stage ranks 3, 1, 4, 2
    results = reranker.rank(QUERY, documents, first_stage_scores=retrieval)
    pieces = [(i, span) for i, text in enumerate(documents) for span in chunks_of(reranker, text)]
    texts = [documents[i][a:b] for i, (a, b) in pieces]
    heads = reranker.heads_for(QUERY)
    mass = aggregate(reranker.scorer.head_scores(QUERY, texts).debiased, heads).double()  # [chunk]
    rank = {0: 3, 1: 1, 2: 4, 3: 2}
    signal = torch.tensor([-float(rank[i]) for i, _ in pieces], dtype=torch.float64)
    n = len(texts)

    def z(values):
        return (values - values.mean()) / values.std(unbiased=False)

    fused = z(mass) + 0.7 * z(signal) + 0.5 * mass * n
    p = torch.sigmoid(FUSED.slope * fused + FUSED.count_slope * math.log(n) + FUSED.intercept)
    for r in results:
        mine = [k for k, (owner, _) in enumerate(pieces) if owner == r.index]
        assert r.score == pytest.approx(float(p[mine].max()), abs=1e-6)


def test_split_passage_fits_every_chunk_as_it_is_scored(shared):
    """Whitespace at a chunk's edge is normalised before scoring, which can change its tokens: every chunk must still
    fit (a chunk over the budget would be cut, and chunk mode promises nothing is cut)."""
    reranker = make(shared, heads="all", max_passage_tokens=BUDGET, chunk_long_documents=True)
    text = "Tides  rise\n twice a day,\n\n and the water   falls between them.  " * 8
    for budget in (8, 9, 13, BUDGET):
        spans = reranker.scorer.prompts.split_passage(text, budget)
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        for start, end in spans:
            ids, whole = reranker.scorer.prompts.cut_passage_counted(text[start:end])
            assert whole is None and len(ids) <= budget


# -- 3. a single candidate: the level term reaches it ----------------------------------------------------------------


def test_a_single_candidates_score_follows_its_attention_level(shared, router, fused_only_router):
    """End to end, a list of one: z-scores are 0, so the score is ``sigmoid(a * level * mass + b)`` (mass computed
    here from the scorer), different for different passages and rising with the mass. Without a level term every
    single candidate scores ``sigmoid(b)``, whatever it says. (Which passage is *relevant* a random tiny model cannot
    say: that the fitted level term ranks a relevant single passage above an irrelevant one is
    test_fusion.py::test_the_level_term_lets_a_single_relevant_passage_score_above_a_single_irrelevant_one.)"""
    reranker = make(shared, heads=router)
    flat = make(shared, heads=fused_only_router)
    heads = reranker.heads_for(QUERY)
    singles = {}
    for text in DOCS:
        (only,) = reranker.rank(QUERY, [text])
        mass = float(aggregate(reranker.scorer.head_scores(QUERY, [text]).debiased, heads))
        assert only.score == pytest.approx(1 / (1 + math.exp(-(FUSED.slope * 0.5 * mass + FUSED.intercept))), abs=1e-9)
        singles[text] = (mass, only.score)
        (level_free,) = flat.rank(QUERY, [text])
        assert level_free.score == pytest.approx(1 / (1 + math.exp(-FUSED.intercept)), abs=1e-12)
    assert len({score for _, score in singles.values()}) == len(DOCS)
    by_mass = sorted(singles.values())
    assert [score for _, score in by_mass] == sorted(score for _, score in by_mass)


# -- 4. one calibration per configuration, or a refusal -----------------------------------------------------------------


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_each_configuration_uses_its_own_calibration(shared, router, fuse, scale):
    reranker = make(shared, heads=router, fuse_first_stage=fuse, scale_score=scale)
    retrieval = [0.2, 0.9, 0.4]
    results = reranker.rank(QUERY, DOCS, first_stage_scores=retrieval)
    recipe = reranker.resolved_strategy.route(reranker.scorer.backbone, QUERY)
    assert recipe.calibration == FUSED and recipe.calibration_unfused == UNFUSED and recipe.can_scale(fuse)
    mass = aggregate(reranker.scorer.head_scores(QUERY, DOCS).debiased, reranker.heads_for(QUERY)).double()
    n = len(DOCS)

    def z(values):
        return (values - values.mean()) / values.std(unbiased=False)

    signal = torch.tensor([-2.0, 0.0, -1.0], dtype=torch.float64)  # minus the first-stage rank, from the scores
    score = z(mass) + 0.5 * mass * n + (0.7 * z(signal) if fuse else 0.0)
    calibration = FUSED if fuse else UNFUSED
    if scale:
        score = torch.sigmoid(calibration.slope * score + calibration.count_slope * math.log(n) + calibration.intercept)
    expected = recipe.final_scores(mass, [-2.0, 0.0, -1.0], fuse=fuse, scale=scale)
    assert torch.allclose(expected, score, atol=1e-12)  # the recipe's formula, restated
    for r in results:
        assert r.score == pytest.approx(float(score[r.index]), abs=1e-7)
    if scale and not fuse:  # the unfused calibration, not the fused one applied to unfused scores
        wrong = torch.sigmoid(FUSED.slope * (z(mass) + 0.5 * mass * n) + FUSED.count_slope * math.log(n) + FUSED.intercept)
        assert not torch.allclose(wrong, score, atol=1e-3)


def test_a_configuration_without_a_calibration_refuses_scale_score(shared, fused_only_router):
    refused = make(shared, heads=fused_only_router, fuse_first_stage=False)  # scale_score=True by default
    with pytest.raises(ValueError, match="probabilities for fused scores only.*scale_score=False"):
        refused.rank(QUERY, DOCS)
    # asked for one call: refused the same way, not raw scores passed off as probabilities
    unscaled = make(shared, heads=fused_only_router, fuse_first_stage=False, scale_score=False)
    with pytest.raises(ValueError, match="probabilities for fused scores only.*scale_score=False"):
        unscaled.rank(QUERY, DOCS, scale_score=True)
    with pytest.raises(ValueError, match="probabilities for fused scores only"):
        unscaled.rank_batch([QUERY], [DOCS], scale_score=True)
    raw = unscaled.rank(QUERY, DOCS)  # what can be given: the unfused, uncalibrated score
    mass = aggregate(unscaled.scorer.head_scores(QUERY, DOCS).debiased, unscaled.heads_for(QUERY)).double()
    for r in raw:
        assert r.score == pytest.approx(float(mass[r.index]), abs=1e-7)
    fused = make(shared, heads=fused_only_router).rank(QUERY, DOCS)  # the fused configuration has its calibration
    assert all(0.0 < r.score < 1.0 for r in fused)


def test_haystack_refuses_a_per_call_scale_score_without_a_calibration(shared, fused_only_router):
    from haystack import Document

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    model, tokenizer = shared
    ranker = RouteHeadRanker(model=model, tokenizer=tokenizer, heads=str(fused_only_router), top_k=None,
                             fuse_first_stage=False, scale_score=False)
    documents = [Document(id=f"d{i}", content=text) for i, text in enumerate(DOCS)]
    assert len(ranker.run(query=QUERY, documents=documents)["documents"]) == len(DOCS)
    with pytest.raises(ValueError, match="probabilities for fused scores only"):
        ranker.run(query=QUERY, documents=documents, scale_score=True)


# -- 5. scale_score means the same in the core and both integrations ---------------------------------------------------


@pytest.mark.parametrize("heads", ["router", "all"])
@pytest.mark.parametrize("fuse", [True, False])
def test_scale_score_is_the_same_in_the_core_haystack_and_llama_index(shared, router, heads, fuse):
    from haystack import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker
    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    model, tokenizer = shared
    choice = str(router) if heads == "router" else "all"
    retrieval = [0.2, 0.9, 0.4]
    documents = [Document(id=f"d{i}", content=text, score=s) for i, (text, s) in enumerate(zip(DOCS, retrieval))]
    nodes = [NodeWithScore(node=TextNode(text=text, id_=f"d{i}"), score=s) for i, (text, s) in enumerate(zip(DOCS, retrieval))]
    common = dict(heads=choice, fuse_first_stage=fuse)
    outcomes = {}
    for scale in (True, False):
        core = make(shared, scale_score=scale, **common).rank(QUERY, DOCS, first_stage_scores=retrieval)
        expected = [(f"d{r.index}", r.score) for r in core]
        overridden = make(shared, scale_score=not scale, **common).rank(QUERY, DOCS, first_stage_scores=retrieval,
                                                                         scale_score=scale)
        assert [(f"d{r.index}", r.score) for r in overridden] == expected  # the per-call override: the same meaning
        haystack = RouteHeadRanker(model=model, tokenizer=tokenizer, top_k=None, scale_score=scale, **common)
        assert [(d.id, d.score) for d in haystack.run(query=QUERY, documents=documents)["documents"]] == expected
        per_call = RouteHeadRanker(model=model, tokenizer=tokenizer, top_k=None, scale_score=not scale, **common)
        assert [(d.id, d.score) for d in per_call.run(query=QUERY, documents=documents, scale_score=scale)[
            "documents"]] == expected
        llama = RouteHeadPostprocessor(model=model, tokenizer=tokenizer, top_n=len(DOCS), scale_score=scale, **common)
        assert [(n.node.node_id, n.score) for n in llama.postprocess_nodes(nodes, query_str=QUERY)] == expected
        outcomes[scale] = expected
    if heads == "router":  # the router's calibration: probabilities with scale_score, the unscaled scores without
        assert all(0.0 < s < 1.0 for _, s in outcomes[True]) and outcomes[True] != outcomes[False]
        assert [i for i, _ in outcomes[True]] == [i for i, _ in outcomes[False]]  # monotone: the same order
    else:  # no calibration: scale_score changes nothing
        assert outcomes[True] == outcomes[False]
