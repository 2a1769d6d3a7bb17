"""Extraction on a local Ray cluster: the same cache files and the same artifact as a run without Ray."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from routehead_rag.engine.embedding import QueryEmbeddingConfig  # noqa: E402
from routehead_rag.engine.scorer import AttentionScorer  # noqa: E402
from routehead_rag.fit.pipeline import run_fit  # noqa: E402
from routehead_rag.fit.search import SearchConfig  # noqa: E402
from routehead_rag.fit.sources import read_query_log  # noqa: E402
from routehead_rag.fit.training import TrainingConfig  # noqa: E402
from routehead_rag.model.backbone import load_backbone  # noqa: E402
from routehead_rag.offline.distributed import RayExtractor  # noqa: E402
from routehead_rag.offline.extraction import extract  # noqa: E402
from tests.tiny_models import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from tests.unit.test_fit import write_log  # noqa: E402

SETTINGS = dict(query_embedding=QueryEmbeddingConfig(layer=0), search=SearchConfig(pool_size=8, max_heads=3),
                training=TrainingConfig(epochs=20, ks=(1, 2)), command="routehead-rag fit log.jsonl --out router")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A 2-CPU local Ray cluster and a tiny model folder every worker loads."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_causal_lm("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield folder
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The driver computes with one thread, as each Ray worker does: the same arithmetic, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_fit_on_ray_gives_the_same_artifact_as_one_without(cluster, tmp_path, one_thread):
    backbone = load_backbone(str(cluster), dtype="float32")
    source = read_query_log(write_log(tmp_path / "log.jsonl", count=12))
    plain = run_fit(backbone, [source], tmp_path / "plain" / "router", cache_dir=tmp_path / "plain-cache", **SETTINGS)
    executor = RayExtractor.for_backbone(str(cluster), backbone, address="auto", workers=2)
    on_ray = run_fit(backbone, [source], tmp_path / "ray" / "router", cache_dir=tmp_path / "ray-cache",
                     executor=executor, **SETTINGS)
    for name in ("config.json", "router.safetensors", "README.md"):
        assert (on_ray.artifact / name).read_bytes() == (plain.artifact / name).read_bytes(), name
    plain_files = sorted(p.relative_to(tmp_path / "plain-cache") for p in (tmp_path / "plain-cache").rglob("*.pt"))
    ray_files = sorted(p.relative_to(tmp_path / "ray-cache") for p in (tmp_path / "ray-cache").rglob("*.pt"))
    assert plain_files == ray_files  # the same cache files, keyed the same way
    executor.shutdown()


def test_a_run_resumes_from_the_other_modes_cache(cluster, tmp_path, one_thread, monkeypatch):
    backbone = load_backbone(str(cluster), dtype="float32")
    scorer = AttentionScorer(backbone)
    source = read_query_log(write_log(tmp_path / "log.jsonl", count=8))
    half = dict(list(source.candidates.items())[:4])
    executor = RayExtractor.for_backbone(str(cluster), backbone, address="auto", workers=2)
    first = extract(scorer, source.name, source.queries, half, source.passages, tmp_path / "cache", executor=executor)
    computed = []
    original = AttentionScorer.head_scores_batch
    monkeypatch.setattr(AttentionScorer, "head_scores_batch", lambda self, *a, **k: computed.append(1) or original(self, *a, **k))
    everything = extract(scorer, source.name, source.queries, source.candidates, source.passages, tmp_path / "cache")
    assert len(computed) == 4  # the Ray run's four came from the cache; only the others were computed here
    assert list(everything) == list(source.candidates)  # candidates order, whatever order they arrived in
    for qid in half:
        assert torch.equal(everything[qid].real, first[qid].real)
    executor.shutdown()


def test_a_worker_with_another_model_is_refused(cluster, tmp_path):
    other = tmp_path / "other"
    tiny_causal_lm("qwen2").save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    backbone = load_backbone(str(cluster), dtype="float32")
    executor = RayExtractor(str(other), "float32", address="auto", workers=1,
                            expected_fingerprint={**backbone.fingerprint(), "dtype": str(backbone.dtype)})
    source = read_query_log(write_log(tmp_path / "log.jsonl", count=2))
    with pytest.raises(RuntimeError, match="must load the same model"):
        extract(AttentionScorer(backbone), source.name, source.queries, source.candidates, source.passages, None,
                executor=executor)
