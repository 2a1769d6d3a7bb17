"""The router's bi-encoder head: a per-query scale of the bi-encoder weight, trained listwise, kept where dev says.

References: the score is the formula restated here (``z(mass) + v(q) * cosine``, ``v(q) = v * exp(<t, ln(q)> + e)``
computed from the router's own parameters with plain tensor ops), the cosines are sentence-transformers' own (the
``reference`` fixture of :mod:`tests.unit.test_bi_encoder`), and the fit's dev figures are recomputed with an
nDCG written here.
"""

from __future__ import annotations

import math

import pytest
import torch

from routehead_rag.bi_encoder import BiEncoderConfig
from routehead_rag.engine.scorer import aggregate
from routehead_rag.fit.calibration import Lists, fit_calibration
from routehead_rag.fit.labelled import build_labelled_set
from routehead_rag.fit.term_weights import cosine_weights, fit_bi_encoder_weight
from routehead_rag.fusion import FusionConfig
from routehead_rag.recipe import final_scores
from routehead_rag.router.model import MAX_LOG_SCALE, Router, RouterConfig
from tests.unit.test_bi_encoder import DOCS, QUERY, make, reference, shared, z  # noqa: F401  (fixtures)
from tests.unit.test_setting import FUSED, UNFUSED
from tests.unit.test_setting import write_router as write_setting_router

V = 4.0


def reference_ndcg(scores: list[float], gains: list[float], depth: int = 10) -> float:
    """nDCG@depth with linear gains, ties broken by position (as a stable sort does)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    dcg = sum(gains[i] / math.log2(rank + 2) for rank, i in enumerate(order[:depth]))
    ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(gains, reverse=True)[:depth]))
    return dcg / ideal if ideal else 0.0


def planted(queries=160, passages=8, seed=0):
    """Half the queries (embedding [1, 0, .5]) have a cosine that names the relevant passage and attention that is
    noise; the other half ([-1, 0, .5]) the reverse, with a cosine that points at a wrong passage."""
    generator = torch.Generator().manual_seed(seed)
    per_query, doc_ids, qrels, cosines, embeddings = {}, {}, {}, [], []
    for q in range(queries):
        relevant = int(torch.randint(0, passages, (1,), generator=generator))
        trust = q % 2 == 0
        scores = torch.randn(1, 1, passages, generator=generator) * 0.3
        cosine = torch.rand(passages, generator=generator, dtype=torch.float64) * 0.2
        if trust:
            cosine[relevant] += 0.3
        else:
            scores[0, 0, relevant] += 1.5
            cosine[(relevant + 1) % passages] += 0.3
        qid = f"q{q}"
        per_query[qid], doc_ids[qid], qrels[qid] = scores, [f"d{i}" for i in range(passages)], {f"d{relevant}": 1}
        cosines.append(cosine)
        embeddings.append(torch.tensor([1.0 if trust else -1.0, 0.0, 0.5]))
    return build_labelled_set(per_query, doc_ids, qrels), torch.stack(cosines), torch.stack(embeddings)


def fit(epochs=200, queries=160):
    data, cosines, embeddings = planted(queries)
    router = Router(RouterConfig(input_dim=3, num_layers=1, num_heads=1, dim=4, hidden=8))
    attention = data.scores[:, 0, :].double()  # [query, passage] the one head's scores
    signal = -torch.arange(cosines.shape[1], dtype=torch.float64).expand_as(cosines)
    train, dev = torch.arange(0, queries - 40), torch.arange(queries - 40, queries)
    fitted = fit_bi_encoder_weight(router, embeddings, attention, signal, None, cosines, BiEncoderConfig(weight=V),
                                   data, train, dev, epochs=epochs, learning_rate=1e-2)  # three inputs: a large step
    return fitted, data, cosines, embeddings, attention, dev


def test_the_head_learns_which_queries_to_trust_the_bi_encoder_for():
    fitted, data, cosines, embeddings, attention, dev = fit()
    assert fitted.bi_encoder.mode == "per_query" and fitted.router.config.bi_encoder_head
    assert fitted.dev["per_query"] > fitted.dev["global"] + 0.05
    scales = fitted.router.bi_encoder_scales(embeddings[:2]).detach()
    assert float(scales[0]) > 1.0 > float(scales[1])  # trusting queries get the larger weight
    # the recorded dev figures, recomputed here from the formula and the weights the router gives
    weights = cosine_weights(fitted.router, fitted.bi_encoder, embeddings)
    assert torch.equal(weights, fitted.weights)
    for mode, per_query in (("global", torch.full_like(weights, V)), ("per_query", weights)):
        values = []
        for row in dev.tolist():
            mass = attention[row]
            score = z(mass) + float(per_query[row]) * cosines[row]
            values.append(reference_ndcg(score.tolist(), data.gains[row].tolist()))
        assert fitted.dev[mode] == pytest.approx(sum(values) / len(values), abs=1e-9)


def test_with_no_training_the_global_weight_is_kept_and_the_router_is_untouched():
    fitted, *_ = fit(epochs=0)
    assert fitted.dev["per_query"] == fitted.dev["global"]  # epoch 0 is the global weight
    assert fitted.bi_encoder.mode == "global" and not fitted.router.config.bi_encoder_head
    assert torch.equal(fitted.weights, torch.full_like(fitted.weights, V))


def test_the_scale_starts_at_one_is_clamped_and_needs_the_head():
    head = Router(RouterConfig(input_dim=3, num_layers=1, num_heads=1, bi_encoder_head=True))
    with torch.no_grad():
        head.bi_encoder.weight.zero_()
        head.bi_encoder.bias.zero_()
    assert torch.equal(head.bi_encoder_scales(torch.randn(5, 3)), torch.ones(5))
    with torch.no_grad():
        head.bi_encoder.bias.fill_(100.0)
    assert float(head.bi_encoder_scales(torch.randn(1, 3))[0]) == pytest.approx(math.exp(MAX_LOG_SCALE), rel=1e-6)
    with pytest.raises(ValueError, match="no bi-encoder head"):
        Router(RouterConfig(input_dim=3, num_layers=1, num_heads=1)).bi_encoder_scales(torch.randn(1, 3))


def test_a_weight_per_list_is_the_float_weight_list_by_list():
    generator = torch.Generator().manual_seed(3)
    attention, cosine = torch.rand(4, 6, generator=generator), torch.rand(4, 6, generator=generator)
    weights = torch.tensor([0.5, 2.0, 10.0, 40.0], dtype=torch.float64)
    batched = final_scores(attention, level_weight=0.3, cosine=cosine, cosine_weight=weights)
    for row in range(4):
        one = final_scores(attention[row], level_weight=0.3, cosine=cosine[row], cosine_weight=float(weights[row]))
        assert torch.allclose(batched[row], one, atol=1e-12)


def test_calibrating_with_weights_per_list_is_calibrating_weighted_cosines():
    """Per-list weights against an independent route to the same scores: the cosines multiplied by the weights
    beforehand, at weight 1."""
    generator = torch.Generator().manual_seed(2)
    attention = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    cosine = torch.rand(60, 8, generator=generator, dtype=torch.float64)
    gains = (torch.rand(60, 8, generator=generator) < 0.2).double()
    valid = torch.ones(60, 8, dtype=torch.bool)
    weights = torch.rand(60, generator=generator, dtype=torch.float64) * 5
    signal = -torch.arange(8.0, dtype=torch.float64).expand(60, 8)
    ideal = torch.ones(60, dtype=torch.float64)
    per_list = Lists(attention, signal, gains, valid, None, ideal, cosine, weights)
    premultiplied = Lists(attention, signal, gains, valid, None, ideal, cosine * weights[:, None],
                          torch.ones(60, dtype=torch.float64))
    assert fit_calibration(per_list, None, fused=False) == fit_calibration(premultiplied, None, fused=False)
    with pytest.raises(ValueError, match="cosine and Lists.cosine_weights go together"):
        fit_calibration(Lists(attention, signal, gains, valid, None, ideal, cosine), None, fused=False)


@pytest.fixture(scope="module")
def head_router(shared, tmp_path_factory):  # noqa: F811
    """A router whose bi-encoder head gives a query-dependent scale (random head weights)."""
    from routehead_rag.router.artifact import load_artifact, save_artifact

    folder = write_setting_router(shared, tmp_path_factory.mktemp("head") / "plain",
                                  FusionConfig(mode="global", weight=0.7, level_weight=0.5), FUSED, UNFUSED,
                                  BiEncoderConfig(weight=V))
    router, config = load_artifact(folder)
    with_head = Router(RouterConfig(**{**router.config.model_dump(), "bi_encoder_head": True}))
    with_head.load_state_dict(router.state_dict(), strict=False)
    torch.manual_seed(0)
    with torch.no_grad():
        with_head.bi_encoder.weight.normal_(0.0, 0.05)
        with_head.bi_encoder.bias.fill_(0.3)
    config = config.model_copy(update={"router": with_head.config,
                                       "bi_encoder": config.bi_encoder.model_copy(update={"mode": "per_query"})})
    return save_artifact(folder.parent / "head", with_head, config, "card"), with_head


def test_the_reranker_scores_with_the_routers_weight_for_this_query(shared, head_router, reference):  # noqa: F811
    folder, head = head_router
    reranker = make(shared, heads=folder, fuse_first_stage=False, scale_score=False)
    recipe = reranker.resolved_strategy.route(reranker.scorer.backbone, QUERY)
    from routehead_rag.engine.embedding import embed_query

    embedding = embed_query(reranker.scorer.backbone, QUERY, reranker.resolved_strategy.config.query_embedding).float()
    ln = torch.nn.functional.layer_norm(embedding, embedding.shape, head.bi_encoder_norm.weight,
                                        head.bi_encoder_norm.bias, head.bi_encoder_norm.eps)
    logit = float(head.bi_encoder.weight[0] @ ln + head.bi_encoder.bias[0])
    assert abs(logit) < MAX_LOG_SCALE  # inside the clamp: the scale is exp(logit), restated by hand
    weight = V * math.exp(logit)
    assert recipe.cosine_weight == pytest.approx(weight, rel=1e-5) and abs(weight - V) > 1e-3
    mass = aggregate(reranker.scorer.head_scores(QUERY, DOCS).debiased, recipe.head_list).double()
    expected = z(mass) + 0.5 * mass * len(DOCS) + weight * torch.from_numpy(reference(QUERY, DOCS))
    for r in reranker.rank(QUERY, DOCS):
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-5)
    explained = reranker.explain(QUERY, DOCS)
    cosine = reference(QUERY, DOCS)
    for passage in explained:
        assert passage.bi_encoder_part == pytest.approx(weight * cosine[passage.document.index], abs=1e-5)


def test_a_config_whose_mode_and_head_disagree_is_refused(head_router):
    from routehead_rag.router.artifact import RouterArtifactConfig, read_artifact_config

    folder, _ = head_router
    config = read_artifact_config(folder).model_dump()
    config["bi_encoder"]["mode"] = "global"
    with pytest.raises(ValueError, match="bi_encoder.mode is 'global' but router.bi_encoder_head is True"):
        RouterArtifactConfig.model_validate(config)
    config["bi_encoder"] = None
    with pytest.raises(ValueError, match="no bi_encoder but router.bi_encoder_head is True"):
        RouterArtifactConfig.model_validate(config)


def test_fit_with_the_head_trains_it_on_cached_cosines_and_calibrates_with_its_weights(tmp_path):
    """A fit with ``bi_encoder_head``: both dev figures recorded; the artifact's router has the head exactly when dev
    kept it; the cosines of every train and dev query are cached (a second fit reads them, the encoder never runs)."""
    from routehead_rag.bi_encoder import load_bi_encoder
    from routehead_rag.engine.embedding import QueryEmbeddingConfig
    from routehead_rag.fit.pipeline import run_fit
    from routehead_rag.fit.search import SearchConfig
    from routehead_rag.fit.sources import read_query_log
    from routehead_rag.fit.training import TrainingConfig
    from tests.tiny_models import tiny_backbone
    from tests.unit.test_fit import write_log

    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(tmp_path / "log.jsonl", count=30))
    settings = dict(query_embedding=QueryEmbeddingConfig(layer=0), search=SearchConfig(pool_size=8, max_heads=3),
                    training=TrainingConfig(epochs=20, ks=(1, 2)), cache_dir=tmp_path / "cache",
                    bi_encoder=BiEncoderConfig(weight=V))
    with pytest.raises(ValueError, match="bi_encoder_head=True scales a bi-encoder's weight per query: pass "
                                         "bi_encoder too"):
        run_fit(backbone, [source], tmp_path / "none", **{**settings, "bi_encoder": None}, bi_encoder_head=True)
    first = run_fit(backbone, [source], tmp_path / "first", bi_encoder_head=True, **settings)
    metrics = first.config.dev_metrics
    kept = metrics["bi_encoder_per_query_ndcg@10"] > metrics["bi_encoder_global_ndcg@10"]
    assert (first.config.bi_encoder.mode == "per_query") == kept == first.config.router.bi_encoder_head
    assert len(list((tmp_path / "cache" / "cosines").rglob("*.pt"))) >= int(metrics["train_queries"])
    encoder = load_bi_encoder("all-MiniLM-L6-v2")
    calls = []
    original = encoder.cosines
    encoder.cosines = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        second = run_fit(backbone, [source], tmp_path / "second", bi_encoder_head=True, **settings)
    finally:
        del encoder.cosines
    assert calls == []  # every cosine came from the cache
    assert second.config.dev_metrics == pytest.approx(metrics)
    assert second.config.calibration == first.config.calibration
