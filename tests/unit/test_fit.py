"""fit -> artifact -> routed inference on a tiny model and a tiny query log."""

import json
import os
import stat

import pytest

from routehead_rag.engine.embedding import QueryEmbeddingConfig, embed_query
from routehead_rag.engine.scorer import aggregate
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.records import FitRecords
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import read_query_log
from routehead_rag.fit.training import TrainingConfig
from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.router.artifact import RouterArtifactError, load_artifact, read_artifact_config
from routehead_rag.strategy import AllHeads
from tests.tiny_models import tiny_backbone

TOPICS = ["moon tides sea", "stock market prices", "basketball players court", "bread bananas recipe", "rain clouds storm"]


def write_log(path, count=20):
    lines = []
    for q in range(count):
        topic = TOPICS[q % len(TOPICS)]
        candidates = [{"id": f"d{i}", "text": f"{TOPICS[i]} passage number {q}"} for i in range(len(TOPICS))]
        lines.append(json.dumps({"id": f"q{q}", "query": f"tell me about {topic}", "candidates": candidates,
                                 "relevance": {f"d{q % len(TOPICS)}": 1}}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit")
    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(folder / "log.jsonl"))
    result = run_fit(
        backbone, [source], folder / "router", query_embedding=QueryEmbeddingConfig(layer=0),
        search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=30, ks=(1, 2)),
        cache_dir=folder / "cache", command="routehead-rag fit log.jsonl --out router",
    )
    return backbone, source, result, folder


def test_artifact_files_and_config(fitted):
    backbone, _, result, _folder = fitted
    assert {p.name for p in result.artifact.iterdir()} == {"config.json", "router.safetensors", "README.md"}
    config = read_artifact_config(result.artifact)
    assert config.backbone_fingerprint.model_dump() == backbone.fingerprint()
    assert config.selection.k in (1, 2) and len(config.static_heads) == config.selection.k
    assert 0.0 <= config.dev_metrics["routed_ndcg@10"] <= 1.0
    # the depth cost is chosen on dev, within the tolerance of no cost, from the recorded curve
    training = FitRecords.of(config).training  # the typed records the fit wrote
    curve = training.depth_curve
    assert [row.depth_cost for row in curve] == sorted(TrainingConfig().depth_costs)
    assert config.selection.depth_cost == training.chosen_depth_cost in [row.depth_cost for row in curve]
    assert config.dev_metrics["routed_ndcg@10"] >= config.dev_metrics["routed_no_depth_cost_ndcg@10"] - 0.005 - 1e-9
    assert "Depth cost" in (result.artifact / "README.md").read_text()
    assert result.report.is_file() and result.heatmap.is_file()
    assert "routehead-rag fit log.jsonl" in (result.artifact / "README.md").read_text()
    assert (result.artifact / "router.safetensors").stat().st_size < 5 * 2**20
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(result.artifact.stat().st_mode) == 0o777 & ~umask  # readable by others, like any folder
    for path in result.artifact.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_routed_reranker_scores_with_the_routed_heads(fitted):
    backbone, source, result, _ = fitted
    reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=result.artifact,
                                 fuse_first_stage=False, scale_score=False)  # the attention score alone
    query = source.queries["q0"]
    passages = source.passages("q0", source.candidates["q0"])
    heads = reranker.heads_for(query)
    router, config = load_artifact(result.artifact, backbone.fingerprint())
    assert heads == router.select(embed_query(backbone, query, config.query_embedding), config.selection)
    # routed scoring equals static scoring over the same heads
    static = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=heads, prompt=config.scoring.prompt)
    routed_results = reranker.rank(query, passages)
    static_results = static.rank(query, passages)
    assert [r.index for r in routed_results] == [r.index for r in static_results]
    everything = reranker.scorer.head_scores(query, passages)
    mass = aggregate(everything.debiased, heads).double()  # [passage]
    for a in static_results:
        assert a.score == pytest.approx(float(mass[a.index]), abs=1e-5)  # static heads: the mass itself
    level = config.fusion.level_weight
    if level:  # a router with an attention-level term: z(mass) + level * mass * n, without the first stage
        n = mass.numel()
        z = (mass - mass.mean()) / mass.std(unbiased=False)
        mass = z + level * mass * n
    for r in routed_results:
        assert r.score == pytest.approx(float(mass[r.index]), abs=1e-5)


def test_router_on_another_backbone_is_a_clear_error(fitted):
    _, _, result, _ = fitted
    other = tiny_backbone("qwen2")
    with pytest.raises(RouterArtifactError, match="fingerprint"):
        load_artifact(result.artifact, other.fingerprint())
    reranker = RouteHeadReranker(model=other.model, tokenizer=other.tokenizer, heads=result.artifact)
    with pytest.raises(RouterArtifactError, match="fitted on backbone"):
        reranker.rank("sea", ["a passage"])


def test_corrupt_and_partial_artifacts_are_errors(fitted, tmp_path):
    import shutil

    _, _, result, _ = fitted
    broken = tmp_path / "broken"
    shutil.copytree(result.artifact, broken)
    (broken / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(RouterArtifactError, match="corrupt"):
        load_artifact(broken)
    (broken / "router.safetensors").unlink()
    with pytest.raises(RouterArtifactError, match="partial"):
        load_artifact(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(RouterArtifactError, match="not valid JSON"):
        read_artifact_config(broken)
    (broken / "config.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(RouterArtifactError, match="not a valid router config"):
        read_artifact_config(broken)
    (broken / "config.json").unlink()
    with pytest.raises(RouterArtifactError, match="no config.json"):
        read_artifact_config(broken)


def test_refit_reuses_the_extraction_cache(fitted, monkeypatch):
    backbone, source, _, folder = fitted
    import routehead_rag.engine.scorer as scoring

    calls = []
    original = scoring.AttentionScorer.head_scores_batch
    monkeypatch.setattr(scoring.AttentionScorer, "head_scores_batch", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    run_fit(
        backbone, [source], folder / "router2", query_embedding=QueryEmbeddingConfig(layer=0),
        search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=5, ks=(1,)),
        cache_dir=folder / "cache",
    )
    assert calls == []  # every query came from the per-query cache (an interrupted fit resumes the same way)


def test_interrupted_fit_resumes_where_it_stopped(tmp_path, monkeypatch):
    import routehead_rag.engine.scorer as scoring

    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(tmp_path / "log.jsonl", count=10))
    original = scoring.AttentionScorer.head_scores_batch
    calls = []

    def interrupted_after_four(self, *args, **kwargs):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the fifth query
        calls.append(1)
        return original(self, *args, **kwargs)

    settings = dict(query_embedding=QueryEmbeddingConfig(layer=0), search=SearchConfig(pool_size=8, max_heads=3),
                    training=TrainingConfig(epochs=5, ks=(1,)), cache_dir=tmp_path / "cache", calibrate=False)
    monkeypatch.setattr(scoring.AttentionScorer, "head_scores_batch", interrupted_after_four)
    with pytest.raises(KeyboardInterrupt):
        run_fit(backbone, [source], tmp_path / "router", **settings)
    assert not (tmp_path / "router").exists()  # no partial artifact
    resumed = []
    monkeypatch.setattr(scoring.AttentionScorer, "head_scores_batch", lambda self, *a, **k: resumed.append(1) or original(self, *a, **k))
    result = run_fit(backbone, [source], tmp_path / "router", **settings)
    assert len(resumed) == 6  # only the queries the interrupted run had not finished
    assert read_artifact_config(result.artifact).data[0]["queries"] == 10


def test_search_settings_are_chosen_on_dev(fitted):
    backbone, source, _, folder = fitted
    grid = [SearchConfig(pool_size=4, max_heads=1), SearchConfig(pool_size=8, max_heads=3, margin=0.0)]
    result = run_fit(
        backbone, [source], folder / "router-grid", query_embedding=QueryEmbeddingConfig(layer=0), search=grid,
        training=TrainingConfig(epochs=20, ks=(1, 2)), cache_dir=folder / "cache",
    )
    search = FitRecords.of(result.config).search
    assert [(g.settings.pool_size, g.settings.max_heads) for g in search.grid] == [(4, 1), (8, 3)]
    best = max(search.grid, key=lambda g: g.dev_ndcg)
    assert search.chosen == best.settings
    assert result.config.dev_metrics["routed_no_depth_cost_ndcg@10"] == pytest.approx(best.dev_ndcg)
    assert "Head-search settings tried" in (result.artifact / "README.md").read_text()


def test_auto_heads_use_the_router_shipped_for_the_backbone(fitted, tmp_path, monkeypatch):
    import shutil

    import routehead_rag.router.artifact as artifact

    backbone, source, result, _ = fitted
    shipped = tmp_path / "routers"
    shutil.copytree(result.artifact, shipped / "tiny-llama")
    monkeypatch.setattr(artifact, "SHIPPED_ROUTERS", shipped)
    query = source.queries["q1"]
    auto = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer)  # heads="auto" by default
    routed = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=result.artifact)
    assert auto.heads_for(query) == routed.heads_for(query)
    assert auto.resolved_strategy.folder == shipped / "tiny-llama"
    # another backbone has no shipped router: every head (ICR), not an error
    other = tiny_backbone("qwen2")
    fallback = RouteHeadReranker(model=other.model, tokenizer=other.tokenizer)
    assert fallback.heads_for(query) is None and isinstance(fallback.resolved_strategy, AllHeads)


def test_query_log_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "candidates": [{"id": "a", "text": "x"}], "relevance": {"zzz": 1}}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: 'relevance' names ids"):
        read_query_log(bad)
    bad.write_text('{"query": "", "candidates": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_query_log(bad)


def test_query_log_is_streamed_and_its_passages_read_again_from_the_file(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        '{"id": "a", "query": "moon", "candidates": [{"id": "d1", "text": "tides"}, {"id": "d2", "text": "stocks"}], '
        '"relevance": {"d1": 1}}\r\n\n'
        '{"id": "b", "query": "sea", "candidates": [{"id": "d3", "text": "caf\\u00e9 \\u00e9t\\u00e9"}]}\n',
        encoding="utf-8",
    )
    source = read_query_log(log)
    assert source.queries == {"a": "moon", "b": "sea"} and source.candidates == {"a": ["d1", "d2"], "b": ["d3"]}
    assert source.passages("a", ["d2", "d1"]) == ["stocks", "tides"]
    assert source.passages("b", ["d3"]) == ["café été"]
    assert "tides" not in repr(vars(source.passages))  # only offsets are held, not the texts
    log.write_text('{"id": "zzz", "query": "other", "candidates": [{"id": "d1", "text": "x"}]}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="changed while it was being read: line 1 no longer holds query 'a'"):
        source.passages("a", ["d1"])
