"""The default router that ships in the package, on the embedded SmolLM2-135M."""

import pytest

from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.router.artifact import SHIPPED_ROUTERS, load_artifact, read_artifact_config, shipped_router_for
from tests.integration.test_embedded_scoring import DOCS, QUERY

pytestmark = pytest.mark.integration

SHIPPED = SHIPPED_ROUTERS / "smollm2-135m"


def test_the_shipped_router_is_found_by_fingerprint(embedded_backbone):
    assert shipped_router_for(embedded_backbone.fingerprint()) == SHIPPED
    _router, config = load_artifact(SHIPPED, embedded_backbone.fingerprint())
    assert config.backbone_name == "smollm2-135m"
    assert {d["name"] for d in config.data} == {
        "beir-scifact", "musique-ans-train100", "hotpotqa-distractor-dev500", "trec-dl-2019"
    }
    assert config.command and config.command.startswith("routehead-rag fit")
    assert (SHIPPED / "router.safetensors").stat().st_size < 5 * 2**20


def test_default_reranker_routes_with_the_shipped_router(embedded_backbone):
    reranker = RouteHeadReranker(model=embedded_backbone.model, tokenizer=embedded_backbone.tokenizer)
    heads = reranker.heads_for(QUERY)
    config = read_artifact_config(SHIPPED)
    assert reranker.resolved_strategy.folder == SHIPPED
    assert len(heads) == config.selection.k
    results = reranker.rank(QUERY, DOCS)
    assert results[0].index == 1, results
    # unfused and unscaled, without its query adapter, the routed score is the sum of the routed heads'
    # calibrated scores of the base model's all-heads pass
    raw = RouteHeadReranker(model=embedded_backbone.model, tokenizer=embedded_backbone.tokenizer,
                            fuse_first_stage=False, scale_score=False, query_adapter=False)
    assert raw.heads_for(QUERY) == heads
    results = raw.rank(QUERY, DOCS)
    everything = raw.scorer.head_scores(QUERY, DOCS)
    for r in results:
        assert r.score == pytest.approx(float(everything.debiased[[h.layer for h in heads], [h.head for h in heads], r.index].sum()), abs=1e-5)


def test_the_shipped_query_adapter_reads_only_the_query(embedded_backbone):
    """With its adapter the shipped router's scores move; the generator's logits do not."""
    import torch

    config = read_artifact_config(SHIPPED)
    if config.query_adapter is None:
        pytest.skip("the shipped router has no query adapter")
    model, tokenizer = embedded_backbone.model, embedded_backbone.tokenizer
    ids = torch.tensor([tokenizer.encode("The moon pulls the sea, and the tides follow it.")])
    with torch.no_grad():
        logits = model(ids).logits
    kwargs = dict(model=model, tokenizer=tokenizer, fuse_first_stage=False, scale_score=False)
    on = RouteHeadReranker(**kwargs)
    off = RouteHeadReranker(query_adapter=False, **kwargs)
    heads = on.heads_for(QUERY)
    adapter = on.resolved_strategy.adapter
    assert adapter is not None and off.resolved_strategy.adapter is None
    expected = on.scorer.passage_scores(QUERY, DOCS, heads, adapter)
    results = on.rank(QUERY, DOCS)
    for r in results:
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-5)
    assert [r.score for r in results] != [r.score for r in off.rank(QUERY, DOCS)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
