"""Per-head scores and aggregations, checked against eager attention summed by hand."""

import pytest
import torch

from routehead_rag.engine.scorer import AttentionScorer, ScoringConfig, aggregate, plan_windows
from routehead_rag.fit.labelled import build_labelled_set, rank_heads
from routehead_rag.heads import Head
from routehead_rag.strategy import StaticHeads
from tests.tiny_models import tiny_backbone

PASSAGES = ["the moon pulls the sea twice a day", "stock prices fell on monday", "two teams of five players", "tides follow the moon"]
QUERY = "what moves the sea"


@pytest.fixture(scope="module")
def scorer():
    return AttentionScorer(tiny_backbone("llama"))


def eager_reference(backbone, prompt_ids, query_span, passage_spans):
    """Independent reference: eager output_attentions of one full pass, rows averaged over the query part."""
    model = backbone.causal_lm
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(torch.tensor([prompt_ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)
    result = torch.zeros(len(attentions), attentions[0].shape[1], len(passage_spans))
    for layer, attention in enumerate(attentions):
        rows = attention[0, :, query_span.start : query_span.end, :].mean(dim=1)  # [heads, keys]
        for p, span in enumerate(passage_spans):
            result[layer, :, p] = rows[:, span.start : span.end].sum(dim=-1)
    return result


def test_head_scores_match_two_full_eager_passes(scorer):
    scores = scorer.head_scores(QUERY, PASSAGES)
    layout = scorer.prompts.layout(PASSAGES)
    real_part = scorer.prompts.query_part(QUERY, layout.prefix_length)
    free_part = scorer.prompts.query_part("N/A", layout.prefix_length)
    real = eager_reference(scorer.backbone, layout.prefix_ids + real_part.ids, real_part.span, layout.passage_spans)
    free = eager_reference(scorer.backbone, layout.prefix_ids + free_part.ids, free_part.span, layout.passage_spans)
    torch.testing.assert_close(scores.real, real, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.content_free, free, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.debiased, real - free, atol=1e-5, rtol=0)


def test_static_heads_equal_slice_of_all_heads(scorer):
    heads = [Head(1, 2), Head(0, 3)]
    everything = scorer.head_scores(QUERY, PASSAGES)
    some = scorer.head_scores(QUERY, PASSAGES, heads)
    for head in heads:
        torch.testing.assert_close(some.debiased[head.layer, head.head], everything.debiased[head.layer, head.head], atol=1e-6, rtol=0)
    assert torch.isnan(some.real[0, 0]).all()  # not computed
    torch.testing.assert_close(
        scorer.passage_scores(QUERY, PASSAGES, heads), aggregate(everything.debiased, heads), atol=1e-6, rtol=0
    )


def test_aggregate_all_is_sum_of_every_head():
    scores = torch.randn(3, 4, 5)
    torch.testing.assert_close(aggregate(scores), scores.sum(dim=(0, 1)))
    torch.testing.assert_close(aggregate(scores, [Head(2, 1), Head(0, 0)]), scores[2, 1] + scores[0, 0])
    with pytest.raises(ValueError):
        aggregate(scores, [])


def test_plan_windows_round_robin_and_fits_budget():
    costs = [10] * 10
    assert plan_windows(costs, fixed_cost=20, budget=1000) == [list(range(10))]
    windows = plan_windows(costs, fixed_cost=20, budget=70)
    assert windows == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    assert sorted(i for w in windows for i in w) == list(range(10))
    assert plan_windows([], 20, 70) == []


def test_windows_score_every_passage_and_match_separate_prompts():
    backbone = tiny_backbone("llama")
    passages = [f"passage number {i} about the moon and the sea and tides" for i in range(12)]
    small = AttentionScorer(backbone, ScoringConfig(max_prompt_tokens=160))
    big = AttentionScorer(backbone, ScoringConfig(max_prompt_tokens=4096))
    windowed = small.head_scores(QUERY, passages)
    assert not torch.isnan(windowed.real).any()
    fixed = small.prompts.fixed_token_count(QUERY)
    costs = [small.prompts.passage_cost(small.prompts.cut_passage(p), len(passages)) for p in passages]
    windows = plan_windows(costs, fixed, 160)
    assert len(windows) > 1
    for window in windows:
        alone = big.head_scores(QUERY, [passages[i] for i in window])
        torch.testing.assert_close(windowed.real[:, :, window], alone.real, atol=1e-6, rtol=0)


def test_query_over_budget_is_a_clear_error():
    scorer = AttentionScorer(tiny_backbone("llama"), ScoringConfig(max_prompt_tokens=64))
    with pytest.raises(ValueError, match="query alone needs"):
        scorer.head_scores("why " * 200, PASSAGES)


def test_outlier_masking_changes_only_the_aggregate(scorer):
    masked = AttentionScorer(scorer.backbone, ScoringConfig(mask_outliers=True))
    plain = scorer.head_scores(QUERY, PASSAGES)
    with_mask = masked.head_scores(QUERY, PASSAGES)
    torch.testing.assert_close(with_mask.real, plain.real)
    assert with_mask.aggregated is not None and with_mask.aggregated.shape == (len(PASSAGES),)


def test_unknown_head_is_rejected_by_the_one_head_check(scorer):
    with pytest.raises(ValueError, match="does not exist"):
        StaticHeads((Head(99, 0),)).resolve(scorer.backbone)


def test_rank_heads_finds_the_planted_head():
    torch.manual_seed(0)
    per_query, doc_ids, qrels = {}, {}, {}
    for q in range(6):
        scores = torch.randn(2, 3, 5)
        relevant = q % 5
        scores[1, 2] = -1.0
        scores[1, 2, relevant] = 5.0  # L1.H2 always puts the relevant passage first
        qid = f"q{q}"
        per_query[qid] = scores
        doc_ids[qid] = [f"d{i}" for i in range(5)]
        qrels[qid] = {f"d{relevant}": 1}
    ranked = rank_heads(build_labelled_set(per_query, doc_ids, qrels))
    assert ranked[0][0] == Head(1, 2)
    assert ranked[0][1] == pytest.approx(1.0)
    assert len(ranked) == 6


def test_outlier_mask_follows_icr_rule():
    """Tokens whose calibrated score is below mean - 2 std within the passage are dropped."""
    from routehead_rag.engine.prompt import PromptLayout, Span
    from routehead_rag.engine.scorer import _masked_passage_scores

    real = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -20.0, 2.0, 3.0])
    free = torch.zeros_like(real)
    layout = PromptLayout(prefix_ids=[0] * 13, passage_spans=[Span(1, 11), Span(11, 13)], prompt_order=[0, 1],
                          passage_token_counts=[10, 2])
    scores = _masked_passage_scores(real, free, layout)
    # passage 0: the -20 outlier is masked (mean - 2 std > -20), nine ones remain
    assert scores[0].item() == pytest.approx(9.0)
    assert scores[1].item() == pytest.approx(5.0)  # nothing below the threshold
