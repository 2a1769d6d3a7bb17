"""Choosing the bi-encoder weight on a fit's dev queries (``fit --bi-encoder-weight dev``).

References: each weight's dev nDCG@10 is recomputed from the formula (``z(mass) + v * cosine``) with an nDCG
written in :mod:`tests.unit.test_bi_encoder_head`; the significance rule is checked against the paired test's own
p-value of the per-query figures recomputed here.
"""

from __future__ import annotations

import pytest
import torch

from routehead_rag.bi_encoder import CHOSEN_BY, BiEncoderConfig
from routehead_rag.eval.metrics import paired_randomization_test
from routehead_rag.fit.labelled import build_labelled_set
from routehead_rag.fit.term_weights import BI_ENCODER_WEIGHT_GRID, SIGNIFICANCE, choose_bi_encoder_weight
from tests.unit.test_bi_encoder import z
from tests.unit.test_bi_encoder_head import reference_ndcg

GIVEN = BiEncoderConfig(weight=40.0, chosen_by=CHOSEN_BY)


def planted(queries: int, cosine_names_relevant: bool, passages: int = 8, seed: int = 0):
    """Attention names the relevant passage in every query; the cosine names it too, or is noise."""
    generator = torch.Generator().manual_seed(seed)
    per_query, doc_ids, qrels, cosines = {}, {}, {}, []
    for q in range(queries):
        relevant = int(torch.randint(0, passages, (1,), generator=generator))
        scores = torch.randn(1, 1, passages, generator=generator) * 0.3
        scores[0, 0, relevant] += 1.0
        cosine = torch.rand(passages, generator=generator, dtype=torch.float64) * 0.3
        if cosine_names_relevant:
            cosine[relevant] += 0.3
        qid = f"q{q}"
        per_query[qid], doc_ids[qid], qrels[qid] = scores, [f"d{i}" for i in range(passages)], {f"d{relevant}": 1}
        cosines.append(cosine)
    data = build_labelled_set(per_query, doc_ids, qrels)
    attention = data.scores[:, 0, :].double()  # [query, passage] the one head's scores
    signal = -torch.arange(passages, dtype=torch.float64).expand(queries, passages)
    return data, attention, signal, torch.stack(cosines)


def per_query_ndcg(data, attention, cosines, dev, weight) -> list[float]:
    return [reference_ndcg((z(attention[row]) + weight * cosines[row]).tolist(), data.gains[row].tolist())
            for row in dev.tolist()]


def test_dev_takes_a_smaller_weight_where_the_cosine_is_noise():
    data, attention, signal, cosines = planted(120, cosine_names_relevant=False)
    dev = torch.arange(40, 120)
    choice = choose_bi_encoder_weight(attention, signal, None, cosines, GIVEN, data, dev)
    assert choice.bi_encoder.weight == min(BI_ENCODER_WEIGHT_GRID)
    assert choice.bi_encoder.model == GIVEN.model and choice.bi_encoder.mode == "global"
    assert "dev queries (80)" in choice.bi_encoder.chosen_by
    for weight in (*BI_ENCODER_WEIGHT_GRID, GIVEN.weight):
        values = per_query_ndcg(data, attention, cosines, dev, weight)
        assert choice.dev[weight] == pytest.approx(sum(values) / len(values), abs=1e-9)
    expected_p = paired_randomization_test(per_query_ndcg(data, attention, cosines, dev, choice.bi_encoder.weight),
                                           per_query_ndcg(data, attention, cosines, dev, GIVEN.weight))
    assert choice.p_value == pytest.approx(expected_p) and choice.p_value < SIGNIFICANCE
    assert GIVEN.weight == 40.0  # the caller's config is not touched


def test_the_given_weight_stays_where_dev_cannot_tell():
    data, attention, signal, cosines = planted(120, cosine_names_relevant=False)
    few = torch.arange(40, 43)  # three dev queries: no difference is significant
    choice = choose_bi_encoder_weight(attention, signal, None, cosines, GIVEN, data, few)
    assert choice.bi_encoder is GIVEN
    best = max(choice.dev.values())
    if best > choice.dev[GIVEN.weight]:  # dev prefers another, but not significantly
        assert choice.p_value is not None and choice.p_value >= SIGNIFICANCE


def test_ties_keep_the_given_weight():
    data, attention, signal, cosines = planted(60, cosine_names_relevant=True)
    dev = torch.arange(0, 60)
    choice = choose_bi_encoder_weight(attention, signal, None, cosines, GIVEN, data, dev)
    # attention and cosine agree on every query: several weights rank perfectly, the given one among them
    assert choice.dev[GIVEN.weight] == max(choice.dev.values())
    assert choice.bi_encoder is GIVEN and choice.p_value is None


@pytest.mark.parametrize("candidates", [(), (0.0, 40.0), (-5.0,), (2000.0,)])
def test_bad_candidates_are_refused_by_value(candidates):
    data, attention, signal, cosines = planted(10, cosine_names_relevant=True)
    with pytest.raises(ValueError, match="candidates"):
        choose_bi_encoder_weight(attention, signal, None, cosines, GIVEN, data, torch.arange(5), candidates)


def test_run_fit_refuses_weights_without_a_bi_encoder_and_bad_weights(tmp_path):
    from routehead_rag.fit.pipeline import run_fit

    with pytest.raises(ValueError, match="pass bi_encoder too"):
        run_fit(None, [], tmp_path / "r", bi_encoder_weights=(10.0,))
    with pytest.raises(ValueError, match=r"bi_encoder_weights=\[0.0\]"):
        run_fit(None, [], tmp_path / "r", bi_encoder=GIVEN, bi_encoder_weights=(0.0,))
