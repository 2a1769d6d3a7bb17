"""metrics.py: ir_measures conventions checked against values computed by hand here."""

from __future__ import annotations

import math

import pytest

from routehead_rag.eval.metrics import (
    candidate_recall,
    evaluate,
    parse_measure,
    per_query,
    ranking_to_run,
    rankings_to_run,
)


def dcg(grades):  # linear gain, log2(rank + 1) discount: the textbook formula, for reference
    return sum(g / math.log2(i + 2) for i, g in enumerate(grades))


QRELS = {
    "q1": {"a": 3, "b": 0, "c": 1, "z": 2},  # z is judged but never retrieved
    "q2": {"x": 1},
}


def test_ndcg_is_linear_gain_with_ideal_over_all_judged_docs():
    run = rankings_to_run({"q1": ["b", "c", "a"], "q2": ["y", "x"]})
    q1 = dcg([0, 1, 3]) / dcg([3, 2, 1, 0])  # ideal counts z, which the run never returns
    q2 = dcg([0, 1]) / dcg([1])
    got = per_query(run, QRELS, "nDCG@10")
    assert got["q1"] == pytest.approx(q1, abs=1e-9)
    assert got["q2"] == pytest.approx(q2, abs=1e-9)
    assert evaluate(run, QRELS)["nDCG@10"] == pytest.approx((q1 + q2) / 2, abs=1e-9)


def test_cutoff_counts_only_the_top_k():
    run = rankings_to_run({"q2": ["n1", "n2", "x"]})
    assert per_query(run, QRELS, "nDCG@2", qids=["q2"])["q2"] == 0.0
    assert per_query(run, QRELS, "nDCG@3", qids=["q2"])["q2"] == pytest.approx(1 / math.log2(4))


def test_query_missing_from_run_counts_zero_not_dropped():
    run = rankings_to_run({"q2": ["x"]})  # perfect for q2, nothing for q1
    assert per_query(run, QRELS) == {"q1": 0.0, "q2": 1.0}
    assert evaluate(run, QRELS)["nDCG@10"] == pytest.approx(0.5)
    assert evaluate({"q1": {}, "q2": {"x": 1.0}}, QRELS)["nDCG@10"] == pytest.approx(0.5)
    assert evaluate({}, QRELS)["nDCG@10"] == 0.0


def test_qids_restrict_the_mean_and_must_be_judged():
    run = rankings_to_run({"q1": ["a"], "q2": ["x"], "unjudged": ["a"]})  # extra query ignored
    assert evaluate(run, QRELS, qids=["q2"])["nDCG@10"] == 1.0
    with pytest.raises(ValueError, match="no qrels"):
        evaluate(run, QRELS, qids=["q2", "unjudged"])


def test_query_without_relevant_document_scores_zero():
    qrels = {"q": {"a": 0, "b": 0}}
    assert per_query(rankings_to_run({"q": ["a", "b"]}), qrels, "nDCG@10") == {"q": 0.0}


def test_measures_keyed_as_spelled_and_bad_names_rejected():
    run = rankings_to_run({"q2": ["x"]})
    out = evaluate(run, QRELS, ["nDCG@10", "R@20", parse_measure("RR")], qids=["q2"])
    assert set(out) == {"nDCG@10", "R@20", "RR"}
    with pytest.raises(ValueError, match="not an ir_measures measure"):
        evaluate(run, QRELS, ["nDCGG@10"])


def test_trec_eval_breaks_raw_ties_by_doc_id_descending():
    """Why ranking_to_run exists: equal raw scores would be ordered c, b, a."""
    qrels = {"q": {"a": 1}}
    tied = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}
    assert per_query(tied, qrels, "RR")["q"] == pytest.approx(1 / 3)  # a ends up last
    ordered = ranking_to_run("q", ["a", "b", "c"], [1.0, 1.0, 1.0])  # ties keep candidate order
    assert per_query(ordered, qrels, "RR")["q"] == 1.0


def test_ranking_to_run_scores():
    assert ranking_to_run("q", ["d1", "d2", "d3"]) == {"q": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}
    run = ranking_to_run("q", ["d1", "d2", "d3", "d4"], [0.1, 0.9, 0.5, 0.9])
    order = sorted(run["q"], key=run["q"].get, reverse=True)
    assert order == ["d2", "d4", "d3", "d1"]  # d2 before d4: same score, earlier candidate
    assert len(set(run["q"].values())) == 4  # strictly decreasing, no tie left
    with pytest.raises(ValueError, match="repeats"):
        ranking_to_run("q", ["d1", "d1"])
    with pytest.raises(ValueError, match="2 scores for 3"):
        ranking_to_run("q", ["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        ranking_to_run("q", ["a"], [float("nan")])


def test_candidate_recall_at_a_relevance_level():
    qrels = {"q": {"a": 3, "b": 2, "c": 1, "d": 0, "e": 2}}
    cands = {"q": ["d", "c", "a", "b", "n"]}
    assert candidate_recall(cands, qrels, k=20, rel=1) == pytest.approx(3 / 4)  # a b c of a b c e
    assert candidate_recall(cands, qrels, k=20, rel=2) == pytest.approx(2 / 3)  # a b of a b e
    assert candidate_recall(cands, qrels, k=3, rel=2) == pytest.approx(1 / 3)  # only a in top 3
    # a query missing from the candidates counts 0
    assert candidate_recall({}, qrels, k=20) == 0.0


def test_paired_randomization_matches_exact_enumeration():
    import itertools

    from routehead_rag.eval.metrics import paired_randomization_test

    a = [0.9, 0.4, 0.7, 0.8, 0.3, 0.6, 0.75, 0.5]
    b = [0.5, 0.45, 0.6, 0.4, 0.35, 0.3, 0.7, 0.2]
    diff = [x - y for x, y in zip(a, b)]
    observed = abs(sum(diff) / len(diff))
    flips = list(itertools.product((1, -1), repeat=len(diff)))
    exact = sum(abs(sum(s * d for s, d in zip(signs, diff)) / len(diff)) >= observed - 1e-12 for signs in flips) / len(flips)
    estimate = paired_randomization_test(a, b, trials=20_000, seed=1)
    assert abs(estimate - exact) < 0.01, (estimate, exact)
    assert paired_randomization_test(a, a, trials=100) == 1.0  # no difference: every trial is as extreme


def test_paired_randomization_rejects_misaligned_input():
    from routehead_rag.eval.metrics import paired_randomization_test

    with pytest.raises(ValueError, match="must align"):
        paired_randomization_test([0.1, 0.2], [0.1])
