"""First-stage fusion and calibrated scores: the maths, the fit on dev, and what users get through each entry point."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from routehead_rag import RouteHeadReranker
from routehead_rag.fit.calibration import Lists, expected_calibration_error, fit_calibration
from routehead_rag.fit.labelled import build_labelled_set
from routehead_rag.fit.term_weights import fit_fusion
from routehead_rag.fusion import CalibrationConfig, calibrate, first_stage_signal, standardise
from routehead_rag.recipe import final_scores
from routehead_rag.router.model import Router, RouterConfig
from tests.unit.test_hostile_inputs import tiny_router  # noqa: F401  (the fixture)

PASSAGES = ["the moon pulls the sea", "stock prices fell", "tides follow the moon", "five players a team"]


def reference_z(values):
    """Independent z-score: numpy-free, over the whole list, population std."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return [0.0 if std == 0 else (v - mean) / std for v in values]


def test_the_formula_matches_an_independent_reference():
    attention, signal = [0.3, -0.1, 0.7, 0.2], [5.0, 2.0, 1.5, -3.0]
    for weight in (0.0, 0.5, 2.0):
        expected = [a + weight * f for a, f in zip(reference_z(attention), reference_z(signal))]
        got = final_scores(torch.tensor(attention, dtype=torch.float64), torch.tensor(signal, dtype=torch.float64), weight)
        assert got.tolist() == pytest.approx(expected, abs=1e-12)
    calibration = CalibrationConfig(slope=0.7, intercept=-0.3)
    expected = [1 / (1 + 2.718281828459045 ** -(0.7 * (a + f) - 0.3)) for a, f in zip(reference_z(attention), reference_z(signal))]
    both = final_scores(torch.tensor(attention, dtype=torch.float64), torch.tensor(signal, dtype=torch.float64), 1.0,
                        calibration)
    assert both.tolist() == pytest.approx(expected, abs=1e-12)
    # no fusion: the attention mass itself (then the calibration's map of it)
    assert final_scores(torch.tensor(attention, dtype=torch.float64)).tolist() == pytest.approx(attention, abs=1e-12)


def test_batched_with_padding_and_a_weight_per_list_equals_one_list_at_a_time():
    attention = torch.tensor([[0.3, -0.1, 0.7, 0.0], [0.5, 0.1, 0.2, 0.9]])
    signal = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    weights = torch.tensor([0.5, 2.0])
    batched = final_scores(attention, signal, weights, None, valid)
    assert batched[0, 3] == 0.0  # padding
    for row in range(2):
        count = int(valid[row].sum())
        alone = final_scores(attention[row, :count], signal[row, :count], float(weights[row]))
        assert batched[row, :count].tolist() == pytest.approx(alone.tolist(), abs=1e-12)


def test_weight_zero_ranks_exactly_as_attention_alone():
    attention = torch.tensor([0.3, -0.1, 0.7, 0.2])
    fused = final_scores(attention, first_stage_signal(4), 0.0)
    assert torch.equal(torch.argsort(fused, descending=True), torch.argsort(attention, descending=True))


def test_a_large_weight_follows_the_first_stage():
    attention = torch.tensor([0.3, -0.1, 0.7, 0.2])
    assert torch.argsort(final_scores(attention, first_stage_signal(4), 100.0), descending=True).tolist() == [0, 1, 2, 3]
    reversed_scores = first_stage_signal(4, [1.0, 2.0, 3.0, 4.0])  # a framework's scores: the last is best
    assert torch.argsort(final_scores(attention, reversed_scores, 100.0), descending=True).tolist() == [3, 2, 1, 0]


def test_huge_first_stage_scores_standardise_without_overflow():
    attention = torch.tensor([0.3, -0.1, 0.7])
    fused = final_scores(attention, torch.tensor([1e308, 1e307, -1e308], dtype=torch.float64), 1.0)
    assert bool(torch.isfinite(fused).all())
    assert fused.tolist() == pytest.approx(final_scores(attention, torch.tensor([1.0, 0.1, -1.0]), 1.0).tolist())


def test_standardise_and_the_signal():
    assert torch.equal(standardise(torch.tensor([2.0, 2.0, 2.0])), torch.zeros(3, dtype=torch.float64))
    z = standardise(torch.tensor([1.0, 2.0, 3.0]))
    assert abs(float(z.mean())) < 1e-12 and abs(float(z.std(unbiased=False)) - 1) < 1e-12
    assert first_stage_signal(3, [float("nan"), 1.0, 2.0]).tolist() == first_stage_signal(3).tolist()  # unusable: order
    assert first_stage_signal(3).tolist() == [0.0, -1.0, -2.0]  # raw: minus the rank
    with pytest.raises(ValueError, match="2 first-stage scores for 3 passages"):
        first_stage_signal(3, [1.0, 2.0])


def test_calibration_is_monotone_and_needs_a_positive_slope():
    scores = torch.linspace(-5, 5, 101)
    probabilities = calibrate(scores, CalibrationConfig(slope=0.7, intercept=-0.3))
    assert bool((probabilities[1:] > probabilities[:-1]).all()) and 0 < float(probabilities.min()) < float(probabilities.max()) < 1
    with pytest.raises(ValueError):
        CalibrationConfig(slope=0.0, intercept=0.0)
    with pytest.raises(ValueError):
        CalibrationConfig(slope=-1.0, intercept=0.0)


def planted(queries=120, passages=8, seed=0):
    """A labelled set whose one head is noisy and whose first stage is informative for half the queries."""
    generator = torch.Generator().manual_seed(seed)
    per_query, doc_ids, qrels, first, embeddings = {}, {}, {}, [], []
    for q in range(queries):
        relevant = int(torch.randint(0, passages, (1,), generator=generator))
        scores = torch.randn(1, 2, passages, generator=generator)
        scores[0, 0, relevant] += 1.0  # a weak attention signal
        trust = q % 2 == 0  # for these queries the first stage ranks the relevant passage first
        order = [relevant] + [i for i in range(passages) if i != relevant] if trust else list(range(passages))
        qid = f"q{q}"
        per_query[qid], doc_ids[qid], qrels[qid] = scores, [f"d{i}" for i in range(passages)], {f"d{relevant}": 1}
        signal = torch.zeros(passages, dtype=torch.float64)
        signal[order] = standardise(first_stage_signal(passages))
        first.append(signal)
        embeddings.append(torch.tensor([1.0 if trust else -1.0, 0.0, 0.5]))
    data = build_labelled_set(per_query, doc_ids, qrels)
    return data, torch.stack(first), torch.stack(embeddings)


def test_fit_fusion_learns_which_queries_to_trust_the_first_stage_for():
    data, signal, embeddings = planted()
    router = Router(RouterConfig(input_dim=3, num_layers=1, num_heads=2, dim=4, hidden=8))
    attention = data.scores[:, 0, :]  # the routed head's scores
    train, dev = torch.arange(0, 90), torch.arange(90, 120)
    fitted = fit_fusion(router, embeddings, attention, signal, data, train, dev, epochs=200)
    assert fitted.dev["global"] > fitted.dev["off"]
    assert fitted.dev["per_query"] >= fitted.dev["global"] and fitted.fusion.mode == "per_query"
    weights = fitted.router.fusion_weights(embeddings[:2])
    assert float(weights[0]) > float(weights[1])  # trusting queries get the larger first-stage weight


def test_fit_calibration_matches_observed_rates():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(400, 10, generator=generator, dtype=torch.float64)  # raw attention, no fusion
    truth = torch.sigmoid(2.0 * scores - 1.0)
    gains = (torch.rand(400, 10, generator=generator, dtype=torch.float64) < truth).double()
    valid = torch.ones(400, 10, dtype=torch.bool)
    full = Lists(scores, -torch.arange(10.0).expand(400, 10), gains, valid, None, torch.ones(400))
    level, config, report = fit_calibration(full, None, fused=False, level_grid=(0.0,))
    assert level == 0.0
    assert config.slope == pytest.approx(2.0, rel=0.2)
    # every list has 10 passages: intercept and count term are one number there
    assert config.intercept + config.count_slope * math.log(10) == pytest.approx(-1.0, abs=0.25)
    assert report["ece"] < 0.05
    assert expected_calibration_error(torch.full((10,), 0.9, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)) == pytest.approx(0.9)


def test_the_level_term_lets_a_single_relevant_passage_score_above_a_single_irrelevant_one():
    """With fusion the score is a z-score within the list; a passage alone has z = 0, so only the level term (mass x
    list size) can tell a relevant single passage from an irrelevant one: the fit must choose it."""
    generator = torch.Generator().manual_seed(2)
    lists = 300
    relevant = torch.randint(0, 10, (lists,), generator=generator)
    share = torch.rand(lists, 10, generator=generator, dtype=torch.float64) * 0.5 / 10  # irrelevant: low share
    share[torch.arange(lists), relevant] = 2.0 / 10  # the relevant passage draws twice an even share
    gains = torch.zeros(lists, 10, dtype=torch.float64)
    gains[torch.arange(lists), relevant] = 1.0
    valid = torch.ones(lists, 10, dtype=torch.bool)
    weights = torch.zeros(lists, dtype=torch.float64)  # fused, with an uninformative first stage
    full = Lists(share, -torch.arange(10.0).expand(lists, 10), gains, valid, weights, torch.full((lists,), 1.0))
    singles_attention = torch.cat([torch.full((lists, 1), 2.0), torch.rand(lists, 1, generator=generator, dtype=torch.float64) * 0.5])
    singles_gains = torch.cat([torch.ones(lists, 1), torch.zeros(lists, 1)]).double()
    sub = Lists(singles_attention, torch.zeros(2 * lists, 1, dtype=torch.float64), singles_gains,
                torch.ones(2 * lists, 1, dtype=torch.bool), torch.zeros(2 * lists, dtype=torch.float64))
    level, config, report = fit_calibration(full, sub, fused=True)
    assert level > 0
    assert report["single_relevant_mean_p"] > report["single_irrelevant_mean_p"] + 0.3
    one = torch.zeros(1, dtype=torch.float64)
    one_relevant = final_scores(torch.tensor([2.0]), one, 0.0, config, level_weight=level)
    one_irrelevant = final_scores(torch.tensor([0.2]), one, 0.0, config, level_weight=level)
    assert float(one_relevant) > 0.5 > float(one_irrelevant)
    # without the level term a single passage scores the same whatever it says
    _, flat, _ = fit_calibration(full, sub, fused=True, level_grid=(0.0,))
    assert float(final_scores(torch.tensor([2.0]), one, 0.0, flat)) == float(final_scores(torch.tensor([0.2]), one, 0.0, flat))
    # within a list the calibration never reorders: probabilities follow the level-adjusted score
    signal = full.signal[:5]
    scored = final_scores(full.attention[:5], signal, weights[:5], None, level_weight=level)
    probabilities = final_scores(full.attention[:5], signal, weights[:5], config, level_weight=level)
    assert torch.equal(torch.argsort(scored, dim=1, stable=True), torch.argsort(probabilities, dim=1, stable=True))


@pytest.fixture
def fused_router(tiny_router, tmp_path):  # noqa: F811
    """The tiny router with a dominant global first-stage weight and a calibration (config edits only)."""
    backbone, folder = tiny_router
    target = tmp_path / "router"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["fusion"] = {"mode": "global", "weight": 5.0}  # the first stage dominates: rank gaps > attention spread
    config["calibration"] = {"slope": 1.0, "intercept": 0.0, "target": "grade >= 1"}
    (target / "config.json").write_text(json.dumps(config))
    return backbone, target


def test_fusion_and_calibration_through_the_python_api(fused_router):
    backbone, folder = fused_router
    reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=folder)
    by_order = reranker.rank("sea", PASSAGES)
    assert [r.index for r in by_order] == [0, 1, 2, 3]  # the input order decides
    assert all(0.0 < r.score < 1.0 for r in by_order)  # calibrated probabilities
    by_scores = reranker.rank("sea", PASSAGES, first_stage_scores=[0.1, 0.2, 0.3, 0.4])
    assert [r.index for r in by_scores] == [3, 2, 1, 0]  # the framework's scores decide
    raw = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=folder,
                            fuse_first_stage=False, scale_score=False).rank("sea", PASSAGES)
    plain = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer,
                              heads=reranker.heads_for("sea")).rank("sea", PASSAGES)
    assert [(r.index, r.score) for r in raw] == [(r.index, r.score) for r in plain]  # off: attention alone
    with pytest.raises(ValueError, match="3 scores for 4 documents"):
        reranker.rank("sea", PASSAGES, first_stage_scores=[1.0, 2.0, 3.0])


def test_fusion_through_haystack_uses_document_scores(fused_router):
    from haystack import Document

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    backbone, folder = fused_router
    ranker = RouteHeadRanker(model=backbone.model, tokenizer=backbone.tokenizer, heads=str(folder), top_k=None)
    scored = [Document(id=f"d{i}", content=t, score=0.1 * i) for i, t in enumerate(PASSAGES)]
    assert [d.id for d in ranker.run(query="sea", documents=scored)["documents"]] == ["d3", "d2", "d1", "d0"]
    unscored = [Document(id=f"d{i}", content=t) for i, t in enumerate(PASSAGES)]
    assert [d.id for d in ranker.run(query="sea", documents=unscored)["documents"]] == ["d0", "d1", "d2", "d3"]
    off = RouteHeadRanker(model=backbone.model, tokenizer=backbone.tokenizer, heads=str(folder), top_k=None,
                          fuse_first_stage=False, scale_score=False)
    raw = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=folder,
                            fuse_first_stage=False, scale_score=False).rank("sea", PASSAGES)
    assert [(d.id, d.score) for d in off.run(query="sea", documents=scored)["documents"]] == [
        (f"d{r.index}", r.score) for r in raw]  # off: the documents' scores play no part
    assert RouteHeadRanker(fuse_first_stage=False).to_dict()["init_parameters"]["fuse_first_stage"] is False


def test_fusion_through_llama_index_uses_node_scores(fused_router):
    from llama_index.core.schema import NodeWithScore, TextNode

    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    backbone, folder = fused_router
    rerank = RouteHeadPostprocessor(model=backbone.model, tokenizer=backbone.tokenizer, heads=str(folder), top_n=4)
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=0.1 * i) for i, t in enumerate(PASSAGES)]
    assert [n.node.node_id for n in rerank.postprocess_nodes(nodes, query_str="sea")] == ["n3", "n2", "n1", "n0"]
    assert all(0.0 < n.score < 1.0 for n in rerank.postprocess_nodes(nodes, query_str="sea"))
