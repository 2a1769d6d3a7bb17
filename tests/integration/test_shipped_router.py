"""The default router that ships in the package, on the embedded SmolLM2-135M."""

import pytest

from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.recipe import final_scores
from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.router.artifact import SHIPPED_ROUTERS, load_artifact, read_artifact_config, shipped_router_for
from tests.integration.test_embedded_scoring import DOCS, QUERY

pytestmark = pytest.mark.integration

SHIPPED = SHIPPED_ROUTERS / "smollm2-135m"


def test_the_shipped_router_is_found_by_fingerprint(embedded_backbone):
    assert shipped_router_for(embedded_backbone.fingerprint()) == SHIPPED
    _router, config = load_artifact(SHIPPED, embedded_backbone.fingerprint())
    assert config.backbone_name == "smollm2-135m"
    names = {d["name"] for d in config.data}  # fitted on the protocol's fit splits only, never a test split
    assert names and names <= {e.name for e in PROTOCOL.entries_for(Role.FIT)}, names
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
    # unfused and unscaled, without its LoRA and bi-encoder, the routed score is the sum of the routed heads'
    # debiased scores of the base model's all-heads pass (standardised, plus the level term, when the router has one)
    raw = RouteHeadReranker(model=embedded_backbone.model, tokenizer=embedded_backbone.tokenizer,
                            fuse_first_stage=False, scale_score=False, lora=False, bi_encoder=False)
    assert raw.heads_for(QUERY) == heads
    results = raw.rank(QUERY, DOCS)
    everything = raw.scorer.head_scores(QUERY, DOCS)
    mass = everything.debiased[[h.layer for h in heads], [h.head for h in heads]].sum(dim=0)  # [passage]
    expected = final_scores(mass, level_weight=config.fusion.level_weight)
    for r in results:
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-5)
    if config.bi_encoder is not None:  # with it: plus its weight times the cosine, by sentence-transformers itself
        import torch
        from sentence_transformers import SentenceTransformer

        from routehead_rag.model.packaged import packaged_minilm_path

        assert config.bi_encoder.model == "all-MiniLM-L6-v2"
        from routehead_rag.bi_encoder import CPU_BATCH_SIZE
        from routehead_rag.model.devices import choose_dtype

        encoder = SentenceTransformer(str(packaged_minilm_path()), device="cpu")  # in the dtype "auto" picks here
        encoder.to(choose_dtype("auto", torch.device("cpu")))
        embedded = encoder.encode([QUERY, *DOCS], batch_size=CPU_BATCH_SIZE, normalize_embeddings=True,
                                  convert_to_tensor=True).double()
        cosine = embedded[1:] @ embedded[0]
        with_cosine = RouteHeadReranker(model=embedded_backbone.model, tokenizer=embedded_backbone.tokenizer,
                                        fuse_first_stage=False, scale_score=False, lora=False)
        expected = final_scores(mass, level_weight=config.fusion.level_weight, cosine=cosine,
                                cosine_weight=config.bi_encoder.weight)
        for r in with_cosine.rank(QUERY, DOCS):
            assert r.score == pytest.approx(float(expected[r.index]), abs=1e-3)


def test_the_shipped_lora_moves_the_scores_not_the_generator(embedded_backbone):
    """With its LoRA the shipped router's scores move; the generator's logits do not (the LoRA is switched on
    only inside the scorer's own passes, never in the shared model's weights)."""
    import torch

    config = read_artifact_config(SHIPPED)
    if config.lora is None:
        pytest.skip("the shipped router has no LoRA")
    model, tokenizer = embedded_backbone.model, embedded_backbone.tokenizer
    ids = torch.tensor([tokenizer.encode("The moon pulls the sea, and the tides follow it.")])
    with torch.no_grad():
        logits = model(ids).logits
    kwargs = dict(model=model, tokenizer=tokenizer, fuse_first_stage=False, scale_score=False)
    on = RouteHeadReranker(**kwargs)
    off = RouteHeadReranker(lora=False, **kwargs)
    heads = on.heads_for(QUERY)
    lora = on.resolved_strategy.lora
    assert lora is not None and lora.config == config.lora and off.resolved_strategy.lora is None
    mass = on.scorer.passage_scores(QUERY, DOCS, heads, lora)  # [passage] the engine's own path, LoRA on
    expected = final_scores(mass, level_weight=config.fusion.level_weight)
    results = on.rank(QUERY, DOCS)
    for r in results:
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-5)
    assert [r.score for r in results] != [r.score for r in off.rank(QUERY, DOCS)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)
