"""The bi-encoder signal: a router's ``v * cosine`` term, against sentence-transformers used directly.

The reference for every cosine here is the packaged all-MiniLM-L6-v2 loaded with ``SentenceTransformer`` in the
test itself (not :mod:`routehead_rag.bi_encoder`), and the reference for every score is the formula restated here
(``z(mass) + w * z(-rank) + u * mass * n + v * cosine``, then the calibration). The re-rankers here run the
bi-encoder in float32 (``dtype="float32"``), as the reference does; ``dtype="auto"``'s bfloat16 is tested apart.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from routehead_rag import RouteHeadReranker
from routehead_rag.bi_encoder import CPU_BATCH_SIZE, BiEncoder, BiEncoderConfig, load_bi_encoder
from routehead_rag.engine.scorer import aggregate
from routehead_rag.fusion import FusionConfig
from routehead_rag.model.devices import cpu_has_native_bf16
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer
from tests.unit.test_setting import FUSED, UNFUSED
from tests.unit.test_setting import write_router as write_setting_router

QUERY = "what moves the sea"
DOCS = ["the moon pulls the sea", "stock prices fell", "tides follow the moon"]
RETRIEVAL = [0.2, 0.9, 0.4]  # -> first-stage ranks 3, 1, 2
V = 3.0


@pytest.fixture(scope="module")
def reference():
    """``cosine(query, passages)`` by sentence-transformers itself, on the packaged MiniLM folder."""
    from sentence_transformers import SentenceTransformer

    from routehead_rag.model.packaged import packaged_minilm_path

    model = SentenceTransformer(str(packaged_minilm_path()), device="cpu")

    def cosine(query: str, passages: list[str]) -> np.ndarray:
        q = model.encode([query], normalize_embeddings=True)[0]
        p = model.encode(passages, normalize_embeddings=True)
        return (p @ q).astype(np.float64)

    return cosine


@pytest.fixture(scope="module")
def shared():
    return tiny_causal_lm("llama"), tiny_tokenizer()


def write_router(shared, folder, bi_encoder: BiEncoderConfig | None):
    """A random router on the tiny backbone: global fusion, a level term, both calibrations, and ``bi_encoder``."""
    return write_setting_router(shared, folder, FusionConfig(mode="global", weight=0.7, level_weight=0.5), FUSED,
                                UNFUSED, bi_encoder)


@pytest.fixture(scope="module")
def router(shared, tmp_path_factory):
    return write_router(shared, tmp_path_factory.mktemp("bi") / "router", BiEncoderConfig(weight=V, chosen_by="a test"))


def make(shared, **options) -> RouteHeadReranker:
    model, tokenizer = shared
    return RouteHeadReranker(model=model, tokenizer=tokenizer, **{"dtype": "float32", **options})


def z(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / values.std(unbiased=False)


def expected_scores(reranker, reference, fuse: bool, scale: bool, cosine: bool = True) -> torch.Tensor:
    mass = aggregate(reranker.scorer.head_scores(QUERY, DOCS).debiased, reranker.heads_for(QUERY)).double()
    n = len(DOCS)
    signal = torch.tensor([-2.0, 0.0, -1.0], dtype=torch.float64)  # minus the first-stage rank
    score = z(mass) + 0.5 * mass * n + (0.7 * z(signal) if fuse else 0.0)
    if cosine:
        score = score + V * torch.from_numpy(reference(QUERY, DOCS))
    if scale:
        calibration = FUSED if fuse else UNFUSED
        score = torch.sigmoid(calibration.slope * score + calibration.count_slope * math.log(n) + calibration.intercept)
    return score


def test_cosines_are_sentence_transformers_cosines(reference):
    encoder = load_bi_encoder(dtype="float32")
    got = encoder.cosines(QUERY, DOCS)
    assert got.dtype == torch.float64 and got.shape == (len(DOCS),)
    assert np.allclose(got.numpy(), reference(QUERY, DOCS), atol=1e-5)
    assert encoder.cosines(QUERY, []).shape == (0,)
    assert encoder.batch_size == CPU_BATCH_SIZE  # on a CPU: small batches, little padding
    assert load_bi_encoder(dtype=torch.float32) is encoder  # one model per process and dtype, shared by every re-ranker
    one_at_a_time = BiEncoder("all-MiniLM-L6-v2", "cpu", batch_size=1, dtype="float32")
    assert np.allclose(one_at_a_time.cosines(QUERY, DOCS).numpy(), reference(QUERY, DOCS), atol=1e-5)  # batching: same


def test_auto_runs_in_bfloat16_where_the_cpu_has_it_and_stays_close(reference):
    auto = load_bi_encoder()
    got = auto.cosines(QUERY, DOCS)
    assert auto.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert np.allclose(got.numpy(), reference(QUERY, DOCS), atol=2e-2)
    half = BiEncoder("all-MiniLM-L6-v2", "cpu", dtype="bfloat16")  # a few texts: fine even where bf16 is emulated
    cosines = half.cosines(QUERY, DOCS)
    assert half.dtype == torch.bfloat16 and cosines.dtype == torch.float64
    assert np.allclose(cosines.numpy(), reference(QUERY, DOCS), atol=2e-2)
    assert not np.allclose(cosines.numpy(), reference(QUERY, DOCS), atol=1e-7)  # really computed in bfloat16


def test_the_rerankers_dtype_reaches_its_bi_encoder(shared, router):
    half_model = tiny_causal_lm("llama").to(torch.bfloat16)  # a shared model's dtype may only be restated
    explanation = make((half_model, shared[1]), heads=router, dtype="bfloat16").explain(QUERY, DOCS)
    cosines = BiEncoder("all-MiniLM-L6-v2", "cpu", dtype="bfloat16").cosines(QUERY, DOCS)
    for passage in explanation:
        assert passage.bi_encoder_part == pytest.approx(V * float(cosines[passage.document.index]), abs=1e-9)


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True])
def test_a_bad_batch_size_is_refused_by_name(batch_size):
    with pytest.raises(ValueError, match=rf"batch_size={batch_size!r}: pass a positive int"):
        BiEncoder("all-MiniLM-L6-v2", batch_size=batch_size)
    with pytest.raises(ValueError, match="float16"):
        BiEncoder("all-MiniLM-L6-v2", dtype="float8")


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_a_router_with_a_bi_encoder_adds_v_times_the_cosine(shared, router, reference, fuse, scale):
    reranker = make(shared, heads=router, fuse_first_stage=fuse, scale_score=scale)
    results = reranker.rank(QUERY, DOCS, first_stage_scores=RETRIEVAL)
    expected = expected_scores(reranker, reference, fuse, scale)
    assert [r.index for r in results] == torch.argsort(-expected, stable=True).tolist()
    for r in results:
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-5)
    assert [r.text for r in results] == [DOCS[r.index] for r in results]  # nothing mangled


def test_bi_encoder_false_scores_attention_alone_and_refuses_probabilities(shared, router, reference):
    with pytest.raises(ValueError, match=r"bi-encoder \(all-MiniLM-L6-v2\) only: with bi_encoder=False pass "
                                         r"scale_score=False"):
        make(shared, heads=router, bi_encoder=False).rank(QUERY, DOCS)
    alone = make(shared, heads=router, bi_encoder=False, scale_score=False)
    results = alone.rank(QUERY, DOCS, first_stage_scores=RETRIEVAL)
    expected = expected_scores(alone, reference, fuse=True, scale=False, cosine=False)
    for r in results:
        assert r.score == pytest.approx(float(expected[r.index]), abs=1e-7)
    with pytest.raises(ValueError, match="bi_encoder=False pass scale_score=False"):
        alone.rank(QUERY, DOCS, scale_score=True)  # asked for one call: refused, not raw scores as probabilities


def test_explain_shows_the_bi_encoders_part(shared, router, reference):
    reranker = make(shared, heads=router)
    explanation = reranker.explain(QUERY, DOCS, first_stage_scores=RETRIEVAL)
    assert [p.document.id for p in explanation] == [r.id for r in reranker.rank(QUERY, DOCS, first_stage_scores=RETRIEVAL)]
    cosine = reference(QUERY, DOCS)
    for passage in explanation:
        i = passage.document.index
        assert passage.bi_encoder_part == pytest.approx(V * cosine[i], abs=1e-5)
        assert passage.attention_part + passage.first_stage_part + passage.bi_encoder_part == pytest.approx(passage.fused)
        assert passage.to_dict()["bi_encoder_part"] == passage.bi_encoder_part
    assert f"bi-encoder {explanation.passages[0].bi_encoder_part:+.3f}" in explanation.to_html()


def test_the_frameworks_take_the_option_serialise_it_and_score_as_the_core(shared, router, reference):
    from haystack import Document
    from llama_index.core.schema import NodeWithScore, TextNode

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker
    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    model, tokenizer = shared
    core = {r.id: r.score for r in make(shared, heads=router).rank(
        QUERY, [(f"d{i}", t) for i, t in enumerate(DOCS)], first_stage_scores=RETRIEVAL)}
    ranker = RouteHeadRanker(model=model, tokenizer=tokenizer, heads=str(router), top_k=None, dtype="float32")
    documents = [Document(id=f"d{i}", content=t, score=s) for i, (t, s) in enumerate(zip(DOCS, RETRIEVAL))]
    got = {d.id: d.score for d in ranker.run(query=QUERY, documents=documents)["documents"]}
    assert got == pytest.approx(core, abs=1e-6)
    post = RouteHeadPostprocessor(model=model, tokenizer=tokenizer, heads=str(router), top_n=len(DOCS),
                                  dtype="float32")
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"d{i}"), score=s) for i, (t, s) in enumerate(zip(DOCS, RETRIEVAL))]
    got = {n.node.node_id: n.score for n in post.postprocess_nodes(nodes, query_str=QUERY)}
    assert got == pytest.approx(core, abs=1e-6)
    off = RouteHeadRanker(heads="all", bi_encoder=False, scale_score=False)  # by name: serialisable, loads nothing
    data = off.to_dict()
    assert data["init_parameters"]["bi_encoder"] is False
    assert RouteHeadRanker.from_dict(data).options.bi_encoder is False
    post = RouteHeadPostprocessor(heads="all", bi_encoder=False, scale_score=False)
    assert post.bi_encoder is False and RouteHeadPostprocessor.from_dict(post.to_dict()).bi_encoder is False


def test_a_router_config_without_a_bi_encoder_still_reads(shared, tmp_path):
    from routehead_rag.router.artifact import read_artifact_config

    plain = write_router(shared, tmp_path / "plain", None)
    assert read_artifact_config(plain).bi_encoder is None
    with_one = write_router(shared, tmp_path / "with", BiEncoderConfig(weight=2.5))
    assert read_artifact_config(with_one).bi_encoder == BiEncoderConfig(weight=2.5)
    with pytest.raises(ValueError, match="weight"):
        BiEncoderConfig(weight=float("inf"))
    with pytest.raises(ValueError, match="weight"):
        BiEncoderConfig(weight=0.0)


def test_fit_records_the_bi_encoder_and_calibrates_with_it(tmp_path, reference):
    """A fit with a bi-encoder: its dev metric is the routed heads plus v * cosine, recomputed here from the fit's own
    dev split; both calibrations fitted on scores with the term; eval ranks as rank() does."""
    from routehead_rag.engine.embedding import QueryEmbeddingConfig
    from routehead_rag.fit.pipeline import run_fit
    from routehead_rag.fit.search import SearchConfig
    from routehead_rag.fit.sources import read_query_log
    from routehead_rag.fit.training import TrainingConfig
    from routehead_rag.router.artifact import read_artifact_config
    from tests.tiny_models import tiny_backbone
    from tests.unit.test_fit import write_log

    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(tmp_path / "log.jsonl"))
    settings = dict(query_embedding=QueryEmbeddingConfig(layer=0), search=SearchConfig(pool_size=8, max_heads=3),
                    training=TrainingConfig(epochs=20, ks=(1, 2)), cache_dir=tmp_path / "cache")
    plain = run_fit(backbone, [source], tmp_path / "plain", **settings)
    with_cosine = run_fit(backbone, [source], tmp_path / "with", bi_encoder=BiEncoderConfig(weight=V), **settings)
    config = read_artifact_config(with_cosine.artifact)
    assert config.bi_encoder == BiEncoderConfig(weight=V)
    assert read_artifact_config(plain.artifact).bi_encoder is None
    assert config.calibration is not None and config.calibration != plain.config.calibration
    assert 0.0 <= config.dev_metrics["bi_encoder_routed_ndcg@10"] <= 1.0
    # the routed heads are the same fit either way: the bi-encoder changes the score, not the router
    assert config.selection == plain.config.selection and config.static_heads == plain.config.static_heads
    reranker = RouteHeadReranker(model=backbone, heads=with_cosine.artifact, dtype="float32")
    query = source.queries["q0"]
    ids = source.candidates["q0"]
    documents = list(zip(ids, source.passages("q0", ids)))
    ranked = reranker.rank(query, documents)
    unscaled = RouteHeadReranker(model=backbone, heads=with_cosine.artifact, scale_score=False)
    recipe = unscaled.resolved_strategy.route(backbone, query)
    mass = aggregate(unscaled.scorer.head_scores(query, [t for _, t in documents]).debiased, recipe.head_list).double()
    n = len(documents)
    level = config.fusion.level_weight
    score = z(mass) + level * mass * n + V * torch.from_numpy(reference(query, [t for _, t in documents]))
    if recipe.fusion_weight is not None:  # global or per query: the recipe holds this query's weight
        score = score + recipe.fusion_weight * z(-torch.arange(n, dtype=torch.float64))
    c = config.calibration
    probability = torch.sigmoid(c.slope * score + c.count_slope * math.log(n) + c.intercept)
    for r in ranked:
        assert r.score == pytest.approx(float(probability[r.index]), abs=1e-5)
