"""The engine on the real embedded SmolLM2-135M: capture, content-free subtraction, ranking, windows, CLI."""

import pytest
import torch
from transformers import DynamicCache

from routehead_rag.engine.capture import CaptureRequest, capture_scope, run_capture
from routehead_rag.engine.scorer import AttentionScorer, ScoringConfig
from routehead_rag.reranker import RouteHeadReranker

pytestmark = pytest.mark.integration

QUERY = "What causes the ocean tides?"
DOCS = [
    "The stock market fell sharply on Monday after the bank raised interest rates.",
    "Ocean tides are caused by the gravitational pull of the Moon and, to a lesser extent, the Sun.",
    "Basketball is played by two teams of five players on a rectangular court.",
    "A recipe for banana bread needs ripe bananas, flour, sugar, butter and eggs.",
]


def test_captured_rows_equal_eager_output_attentions(embedded_backbone):
    model = embedded_backbone.causal_lm
    tokenizer = embedded_backbone.tokenizer
    ids = torch.tensor([tokenizer.encode(" ".join(DOCS) + " " + QUERY)])
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            reference = model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    start = ids.shape[1] - 8
    layers = [0, 7, 15, 29]
    request = CaptureRequest(heads_by_layer={layer: None for layer in layers}, row_start=start)
    with capture_scope(embedded_backbone.decoder), torch.inference_mode():
        run_capture(embedded_backbone.decoder, ids, DynamicCache(), request)
    for layer in layers:
        torch.testing.assert_close(request.rows[layer][0], reference[layer][0, :, start:, :], atol=1e-5, rtol=0)
    assert model.config._attn_implementation == original


def test_icr_ranks_the_relevant_passage_first(embedded_backbone):
    reranker = RouteHeadReranker(model=embedded_backbone.model, tokenizer=embedded_backbone.tokenizer, heads="all")
    results = reranker.rank(QUERY, DOCS)
    assert results[0].index == 1, results


def test_hundred_candidates_are_scored_in_windows(embedded_backbone):
    passages = [f"Passage {i}: " + DOCS[i % 4] for i in range(100)]
    scorer = AttentionScorer(embedded_backbone, ScoringConfig(max_prompt_tokens=1024))
    scores = scorer.passage_scores(QUERY, passages)
    assert scores.shape == (100,) and torch.isfinite(scores).all()
    tide_mean = scores[1::4].mean()
    others = torch.cat([scores[0::4], scores[2::4], scores[3::4]]).mean()
    assert tide_mean > others


def test_cli_rerank_prints_the_ranking(embedded_backbone):
    from typer.testing import CliRunner

    from routehead_rag.cli import app

    result = CliRunner().invoke(app, ["rerank", QUERY, *DOCS, "--json"])
    assert result.exit_code == 0, result.output
    first = result.stdout.strip().splitlines()[0]
    assert '"rank": 1' in first and '"id": 1' in first
