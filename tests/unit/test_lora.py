"""The scoring LoRA: PEFT's LoRA as the reference, the prefix untouched in the query scope and adapted in the prompt
scope (merged into our own model, hooked per call into a shared one), the owner's model left alone, the artifact's
files trusted only when their checksums hold, and training that learns and resumes."""

import dataclasses
import threading

import pytest
import torch
from transformers import DynamicCache

from routehead_rag.engine.embedding import QueryEmbeddingConfig
from routehead_rag.engine.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    Lora,
    LoraConfig,
    decoder_path,
    lora_bytes,
    lora_targets,
    merge_into,
)
from routehead_rag.engine.scorer import AttentionScorer
from routehead_rag.fit.lora import LoraTrainingConfig, train_lora
from routehead_rag.fit.pipeline import lora_queries, run_fit
from routehead_rag.fit.records import FitRecords
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import read_query_log
from routehead_rag.fit.training import TrainingConfig
from routehead_rag.heads import Head
from routehead_rag.recipe import final_scores
from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.router.artifact import RouterArtifactError, load_artifact, read_artifact_config, save_artifact
from routehead_rag.strategy import RoutedHeads
from tests.tiny_models import tiny_backbone, tiny_causal_lm, tiny_tokenizer
from tests.unit.test_fit import write_log

DOCS = ["the moon pulls the sea", "stock prices fell", "tides follow the moon", "five players a team"]
ALL = [Head(layer, head) for layer in range(2) for head in range(4)]  # every head of the 2-layer tiny models


def every_head(backbone):
    return [Head(layer, head) for layer in range(backbone.num_layers) for head in range(backbone.num_heads)]


def random_lora(backbone, rank=4, seed=3, mlp=True, scale=0.5) -> Lora:
    """A LoRA with non-zero B (a trained one's stand-in), on every layer."""
    layers, targets = lora_targets(backbone.decoder, backbone.num_layers - 1, mlp=mlp)
    config = LoraConfig(rank=rank, alpha=2.0 * rank, layers=layers, targets=targets,
                                decoder_path=decoder_path(backbone.model, backbone.decoder))
    torch.manual_seed(seed)
    adapter = Lora.for_decoder(backbone.decoder, config)
    with torch.no_grad():
        for b in adapter.lora_B.values():
            b.normal_(0.0, scale)
    return adapter.requires_grad_(False)


def test_targets_are_found_in_the_model():
    backbone = tiny_backbone("llama")
    layers, targets = lora_targets(backbone.decoder, 1)
    assert layers == (0, 1)
    assert set(targets) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert set(lora_targets(backbone.decoder, 0, mlp=False)[1]) == {t for t in targets if t.startswith("self_attn")}
    with pytest.raises(ValueError, match="deepest layer 5"):
        lora_targets(backbone.decoder, 5)
    config = LoraConfig(rank=2, alpha=4.0, layers=(0,), targets=("self_attn.nope",))
    with pytest.raises(ValueError, match="self_attn.nope"):
        Lora.for_decoder(backbone.decoder, config)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_query_part_equals_peft_lora_on_a_base_prefix_cache(tmp_path, arch):
    """Reference: PEFT's own LoRA (PeftModel.from_pretrained on our files), adapters disabled for the
    prefix pass and enabled for the query part, eager output_attentions; our scorer must give the
    same per-head passage scores."""
    peft = pytest.importorskip("peft")
    backbone = tiny_backbone(arch)
    adapter = random_lora(backbone)
    weights, config_text = lora_bytes(adapter, backbone.fingerprint(), "tiny")
    (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes(weights)
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(config_text)
    scorer = AttentionScorer(backbone)
    ours = scorer.head_scores("where is the moon", DOCS, every_head(backbone), adapter)

    reference_model = tiny_causal_lm(arch)  # the same seed: the same weights, a separate object
    reference_model.set_attn_implementation("eager")
    peft_model = peft.PeftModel.from_pretrained(reference_model, tmp_path)
    layout = scorer.prompts.layout(DOCS)
    expected = []
    for text in ("where is the moon", scorer.config.prompt.content_free_query):
        part = scorer.prompts.query_part(text, layout.prefix_length)
        cache = DynamicCache()
        with torch.no_grad():
            with peft_model.disable_adapter():
                peft_model(torch.tensor([layout.prefix_ids]), past_key_values=cache, use_cache=True)
            out = peft_model(torch.tensor([part.ids]), past_key_values=cache, use_cache=True, output_attentions=True)
        per_layer = []
        for attention in out.attentions:  # [1, heads, rows, keys]
            rows = attention[0].mean(dim=1)[:, : layout.prefix_length]  # [heads, keys]
            per_layer.append(torch.stack([rows[:, s.start : s.end].sum(dim=-1) for s in layout.passage_spans], dim=-1))
        expected.append(torch.stack(per_layer))  # [layer, head, passage]
    torch.testing.assert_close(ours.real, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.content_free, expected[1], atol=1e-5, rtol=0)
    base = scorer.head_scores("where is the moon", DOCS, every_head(backbone))
    assert (ours.real - base.real).abs().max() > 1e-4  # the adapter does change the query's reading


def test_prefix_pass_is_the_base_models_bitwise_and_only_the_query_part_changes():
    """Every projection output of the prefix pass (what fills the KV cache) equals the base model's exactly."""
    backbone = tiny_backbone("llama")
    adapter = random_lora(backbone)
    scorer = AttentionScorer(backbone)
    probe = backbone.decoder.layers[1].self_attn.k_proj
    calls = {}
    for name, chosen in (("base", None), ("adapted", adapter)):
        outputs = []
        handle = probe.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
        try:
            scorer.head_scores("where is the moon", DOCS, [Head(1, 0)], chosen)
        finally:
            handle.remove()
        calls[name] = outputs
    assert len(calls["base"]) == len(calls["adapted"]) == 2  # the prefix, then the real query and "N/A" side by side
    assert torch.equal(calls["base"][0], calls["adapted"][0])  # the prefix: bitwise
    assert calls["base"][1].shape[0] == 2  # [real, N/A] query parts
    assert not torch.allclose(calls["base"][1][0], calls["adapted"][1][0])  # the real query part: adapted
    assert not torch.allclose(calls["base"][1][1], calls["adapted"][1][1])  # the N/A part too


def test_zero_adapter_is_exactly_the_base_model():
    backbone = tiny_backbone("qwen2")
    layers, targets = lora_targets(backbone.decoder, 1)
    fresh = Lora.for_decoder(backbone.decoder, LoraConfig(rank=2, alpha=4.0, layers=layers, targets=targets))
    scorer = AttentionScorer(backbone)
    base = scorer.head_scores("moon", DOCS, ALL)
    same = scorer.head_scores("moon", DOCS, ALL, fresh)
    assert torch.equal(base.real, same.real) and torch.equal(base.content_free, same.content_free)


def test_owner_model_tree_and_parameters_are_the_same_objects_and_hooks_are_gone():
    backbone = tiny_backbone("llama")
    adapter = random_lora(backbone)
    model = backbone.model
    modules = [(n, id(m)) for n, m in model.named_modules()]
    parameters = [(n, id(p)) for n, p in model.named_parameters()]
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    AttentionScorer(backbone).head_scores("moon", DOCS, ALL, adapter)
    with pytest.raises(RuntimeError):  # an error inside the scope still removes every hook
        with adapter.attached(backbone.decoder):
            raise RuntimeError("boom")
    assert [(n, id(m)) for n, m in model.named_modules()] == modules
    assert [(n, id(p)) for n, p in model.named_parameters()] == parameters
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())
    assert all(not m._forward_hooks for m in model.modules())


def adapted_router(tmp_path, backbone):
    """A fitted router (tiny log) with a random non-zero adapter saved beside it (PEFT files, checksums)."""
    source = read_query_log(write_log(tmp_path / "log.jsonl"))
    result = run_fit(backbone, [source], tmp_path / "router", query_embedding=QueryEmbeddingConfig(layer=0),
                     search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=20, ks=(1, 2)),
                     cache_dir=tmp_path / "cache")
    router, config = load_artifact(result.artifact, backbone.fingerprint())
    adapter = random_lora(backbone)
    config = config.model_copy(update={"lora": adapter.config})
    save_artifact(tmp_path / "adapted", router, config, "card", adapter)
    return result.artifact, tmp_path / "adapted", source


@pytest.fixture(scope="module")
def routers(tmp_path_factory):
    backbone = tiny_backbone("llama")
    plain, adapted, source = adapted_router(tmp_path_factory.mktemp("adapter"), backbone)
    return backbone, plain, adapted, source


def test_artifact_holds_peft_files_with_checksums(routers):
    backbone, _, adapted, _ = routers
    config = read_artifact_config(adapted)
    assert {ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME} <= set(config.files)
    strategy = RoutedHeads.from_folder(adapted).resolve(backbone)
    assert strategy.lora is not None and strategy.lora.config == config.lora
    assert "query LoRA" in strategy.describe()


@pytest.mark.parametrize("damage", ["flip", "missing", "other_backbone"])
def test_damaged_adapter_files_are_refused(routers, tmp_path, damage):
    import shutil

    backbone, _, adapted, _ = routers
    folder = tmp_path / "copy"
    shutil.copytree(adapted, folder)
    if damage == "flip":
        data = bytearray((folder / ADAPTER_WEIGHTS_NAME).read_bytes())
        data[-3] ^= 0xFF
        (folder / ADAPTER_WEIGHTS_NAME).write_bytes(bytes(data))
        match = "is not the file config.json records"
    elif damage == "missing":
        (folder / ADAPTER_CONFIG_NAME).unlink()
        match = "has no adapter_config.json"
    else:  # a valid adapter file, but fitted on another backbone: rewritten with its checksum
        import hashlib
        import json

        _router, _config = load_artifact(folder, backbone.fingerprint())
        weights, _ = lora_bytes(random_lora(backbone), {"other": 1}, "x")
        (folder / ADAPTER_WEIGHTS_NAME).write_bytes(weights)
        raw = json.loads((folder / "config.json").read_text())
        raw["files"][ADAPTER_WEIGHTS_NAME] = {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)}
        (folder / "config.json").write_text(json.dumps(raw))
        match = "fitted on another backbone"
    with pytest.raises(RouterArtifactError, match=match):
        RoutedHeads.from_folder(folder).resolve(backbone)


def test_reranker_uses_the_adapter_and_can_leave_it_off(routers):
    backbone, plain, adapted, source = routers
    model, tokenizer = backbone.model, backbone.tokenizer
    query, passages = source.queries["q0"], source.passages("q0", source.candidates["q0"])
    kwargs = dict(model=model, tokenizer=tokenizer, fuse_first_stage=False, scale_score=False)
    with_adapter = RouteHeadReranker(heads=adapted, **kwargs).rank(query, passages)
    without = RouteHeadReranker(heads=adapted, lora=False, **kwargs).rank(query, passages)
    router_alone = RouteHeadReranker(heads=plain, **kwargs).rank(query, passages)
    assert [r.score for r in without] == [r.score for r in router_alone]
    assert [r.score for r in with_adapter] != [r.score for r in without]
    reranker = RouteHeadReranker(heads=adapted, **kwargs)
    heads = reranker.heads_for(query)
    adapter = reranker.resolved_strategy.lora
    mass = reranker.scorer.passage_scores(query, passages, heads, adapter)  # the engine's own path
    level = reranker.resolved_strategy.config.fusion.level_weight  # unfused: z(mass) + level * mass * n, or the mass
    expected = final_scores(mass, level_weight=level)
    assert sorted(r.score for r in with_adapter) == pytest.approx(sorted(expected.tolist()), abs=1e-6)
    batch = reranker.rank_batch([query, query], [passages, passages[::-1]], batch_size=2)
    single = [reranker.rank(query, passages), reranker.rank(query, passages[::-1])]
    for got, want in zip(batch, single):
        assert [r.id for r in got] == [r.id for r in want]
        assert [r.score for r in got] == pytest.approx([r.score for r in want], abs=1e-5)


def generator_logits_unchanged_while_ranking(model, tokenizer, reranker):
    """The generator's logits stay bitwise the same on this thread while another thread ranks with ``reranker``;
    returns the generator's input ids and logits for the caller's own checks afterwards."""
    ids = torch.tensor([tokenizer.encode("the moon pulls the sea and the tides follow")])
    with torch.no_grad():
        expected = model(ids).logits
    stop, errors, count = threading.Event(), [], [0]

    def rank_loop():
        try:
            while not stop.is_set():
                reranker.rank("sea", DOCS)
                count[0] += 1
        except Exception as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=rank_loop)
    thread.start()
    try:
        for _ in range(30):
            with torch.no_grad():
                assert torch.equal(model(ids).logits, expected)
    finally:
        stop.set()
        thread.join()
    assert not errors and count[0] > 0
    return ids, expected


def test_shared_generator_logits_unchanged_while_another_thread_ranks_with_the_adapter(routers):
    backbone, _, adapted, _ = routers
    model, tokenizer = backbone.model, backbone.tokenizer
    reranker = RouteHeadReranker(model=model, tokenizer=tokenizer, heads=adapted)
    ids, expected = generator_logits_unchanged_while_ranking(model, tokenizer, reranker)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert all(not m._forward_hooks for m in model.modules())


def test_two_rankers_with_their_own_adapters_in_two_threads_each_see_their_own():
    backbone = tiny_backbone("llama")
    adapters = {"a": random_lora(backbone, seed=1), "b": random_lora(backbone, seed=2)}
    scorer = AttentionScorer(backbone)
    alone = {name: scorer.head_scores("moon", DOCS, ALL, a).real for name, a in adapters.items()}
    barrier, results, errors = threading.Barrier(2), {}, []

    def work(name):
        try:
            barrier.wait()
            results[name] = [scorer.head_scores("moon", DOCS, ALL, adapters[name]).real for _ in range(5)]
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in adapters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name in adapters:
        for got in results[name]:
            torch.testing.assert_close(got, alone[name], atol=1e-6, rtol=0)


def adapter_setup(tmp_path):
    """The fit pipeline's adapter inputs for a tiny log, train = dev (a learning test, not a quality claim)."""
    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(tmp_path / "log.jsonl", count=10))
    from routehead_rag.engine.scorer import ScoringConfig
    from routehead_rag.fit.extract import extract_sources
    from routehead_rag.fusion import FusionConfig
    from routehead_rag.router.model import Router, RouterConfig

    pooled = extract_sources(backbone, [source], ScoringConfig(), None, storage_dtype="float32")
    data = pooled.labelled_set()
    routed = torch.tensor([[4, 1]] * len(data.qids))  # flat indices in the 2 x 4 grid: L1.H0 and L0.H1
    router = Router(RouterConfig(num_layers=data.num_layers, num_heads=data.num_heads, input_dim=backbone.hidden_size))
    rows = torch.arange(len(data.qids))
    config = LoraTrainingConfig(ranks=(4,), learning_rates=(2e-2,), epochs=3, train_queries=None, dev_queries=None)
    queries, train, dev = lora_queries(backbone, [source], ScoringConfig(), pooled, data, routed, router,
                                          FusionConfig(), None, rows, rows, config)
    return backbone, queries, train, dev, config


def test_training_learns_the_train_queries(tmp_path):
    backbone, queries, train, dev, config = adapter_setup(tmp_path)
    fit = train_lora(backbone, queries, train, dev, config)
    history = fit.runs[0]["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert fit.dev_ndcg > fit.base_dev_ndcg + 0.02, history  # it learns what it is shown
    assert fit.lora is not None and fit.epoch >= 1
    assert all(p.grad is None for p in backbone.model.parameters())  # the base model is never trained


def test_training_and_the_dev_choice_score_with_the_routers_bi_encoder_term(tmp_path):
    """Where the router has a bi-encoder, the LoRA's loss and its dev scores include ``v * cosine`` as users get it:
    the loss is restated here, and a cosine equal to the grades at a large weight makes the dev ranking perfect."""
    from routehead_rag.fit.lora import listwise_loss, routed_attention

    backbone, queries, train, dev, config = adapter_setup(tmp_path)
    key = train[0]
    attention = routed_attention(queries[key], None).double()
    cosine = torch.linspace(-0.3, 0.8, len(queries[key].passages), dtype=torch.float64)
    with_cosine = dataclasses.replace(queries[key], cosine=cosine, cosine_weight=3.0)
    z = (attention - attention.mean()) / attention.std(unbiased=False)
    gains = queries[key].gains / queries[key].gains.sum()
    expected = -(gains * torch.log_softmax(z + 3.0 * cosine, dim=0)).sum()
    assert float(listwise_loss(with_cosine, attention)) == pytest.approx(float(expected), abs=1e-9)
    assert float(listwise_loss(queries[key], attention)) != pytest.approx(float(expected), abs=1e-3)

    oracle = {k: dataclasses.replace(q, cosine=q.gains.clone(), cosine_weight=1e4) for k, q in queries.items()}
    assert train_lora(backbone, oracle, train, dev, config.model_copy(update={"epochs": 1})).base_dev_ndcg == 1.0
    plain = train_lora(backbone, queries, train, dev, config.model_copy(update={"epochs": 1})).base_dev_ndcg
    assert plain < 1.0


@pytest.mark.parametrize("with_bi_encoder", [False, True])
def test_a_lora_for_a_fitted_router_is_the_one_its_fit_would_train(tmp_path, with_bi_encoder):
    """``train_lora_for_router`` (a LoRA for a router already fitted, without refitting it) rebuilds the fit's split,
    routes, cosines and scores from the artifact: its runs equal those of the fit that trained one with the router."""
    from routehead_rag.bi_encoder import BiEncoderConfig
    from routehead_rag.fit.pipeline import train_lora_for_router

    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(tmp_path / "log.jsonl"))
    lora = LoraTrainingConfig(ranks=(2,), learning_rates=(1e-2,), epochs=2, train_queries=6, dev_queries=3)
    fitted = run_fit(backbone, [source], tmp_path / "router", query_embedding=QueryEmbeddingConfig(layer=0),
                     search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=20, ks=(1, 2)),
                     cache_dir=tmp_path / "cache", storage_dtype="float32", calibrate=False, lora=lora,
                     bi_encoder=BiEncoderConfig(weight=3.0) if with_bi_encoder else None)
    record = FitRecords.of(fitted.config).training.lora
    again = train_lora_for_router(backbone, fitted.artifact, [source], lora)
    assert again.base_dev_ndcg == pytest.approx(record.base_dev_ndcg, abs=1e-9)
    got = [h["dev_ndcg"] for h in again.runs[0]["history"]]
    assert got == pytest.approx([h.dev_ndcg for h in record.runs[0].history], abs=1e-6)


def test_killed_training_resumes_to_the_same_adapter(tmp_path):
    backbone, queries, train, dev, config = adapter_setup(tmp_path)
    uninterrupted = train_lora(backbone, queries, train, dev, config, tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_in_epoch_3(stage, done, total):
        if "epoch 3" in stage and done == 2:
            raise Killed

    with pytest.raises(Killed):
        train_lora(backbone, queries, train, dev, config, tmp_path / "b", progress=kill_in_epoch_3)
    resumed = train_lora(backbone, queries, train, dev, config, tmp_path / "b")
    assert resumed.runs[0]["history"] == uninterrupted.runs[0]["history"]
    assert resumed.epoch == uninterrupted.epoch
    for name, value in uninterrupted.lora.state_dict().items():
        assert torch.equal(resumed.lora.state_dict()[name], value), name


def test_fit_with_adapter_records_it_and_writes_it_only_when_it_wins_on_dev(tmp_path):
    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(tmp_path / "log.jsonl"))
    result = run_fit(backbone, [source], tmp_path / "router", query_embedding=QueryEmbeddingConfig(layer=0),
                     search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=20, ks=(1, 2)),
                     cache_dir=tmp_path / "cache", storage_dtype="float32",
                     lora=LoraTrainingConfig(ranks=(2,), learning_rates=(1e-2,), epochs=2))
    config = result.config
    record = FitRecords.of(config).training.lora
    # every train / dev query (caps not reached)
    assert record.train_queries + record.dev_queries == 20 and record.dev_queries == config.dev_metrics["dev_queries"]
    assert len(record.runs[0].history) == 3
    # epoch 0 is the router without a LoRA, scored live: the fit's own dev figure from the cache (no level term here)
    mode = config.fusion.mode
    if not config.fusion.level_weight:
        assert record.base_dev_ndcg == pytest.approx(config.dev_metrics[f"fusion_{mode}_ndcg@10"], abs=1e-6)
    files = {p.name for p in result.artifact.iterdir()}
    if record.dev_ndcg > record.base_dev_ndcg:
        assert config.lora is not None and {ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME} <= files
    else:
        assert config.lora is None and ADAPTER_WEIGHTS_NAME not in files
    assert "LoRA" in (result.artifact / "README.md").read_text()


def test_bad_adapter_settings_are_named():
    with pytest.raises(ValueError, match="ranks"):
        LoraTrainingConfig(ranks=(0,))
    with pytest.raises(ValueError, match="learning rates"):
        LoraTrainingConfig(learning_rates=(2.0,))
    with pytest.raises(ValueError, match="layers"):
        LoraConfig(rank=2, alpha=4.0, layers=(1, 1), targets=("self_attn.q_proj",))
    with pytest.raises(TypeError, match="lora"):
        RouteHeadReranker(model=tiny_causal_lm("llama"), tokenizer=tiny_tokenizer(), lora="yes")


def test_both_framework_adapters_rank_with_the_adapter(routers):
    from haystack import Document
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    from haystack_integrations.components.rankers.routehead import RouteHeadRanker
    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    backbone, _, adapted, source = routers
    model, tokenizer = backbone.model, backbone.tokenizer
    query, passages = source.queries["q1"], source.passages("q1", source.candidates["q1"])
    engine = {flag: RouteHeadReranker(model=model, tokenizer=tokenizer, heads=adapted, lora=flag)
              for flag in (True, False)}
    expected = {flag: [(r.index, r.score) for r in engine[flag].rank(query, passages)] for flag in engine}
    assert expected[True] != expected[False]
    for flag in (True, False):
        ranker = RouteHeadRanker(model=model, tokenizer=tokenizer, heads=adapted, top_k=None, lora=flag)
        documents = [Document(id=str(i), content=text) for i, text in enumerate(passages)]
        ranked = ranker.run(query=query, documents=documents)["documents"]
        assert [int(d.id) for d in ranked] == [i for i, _ in expected[flag]]
        assert [d.score for d in ranked] == pytest.approx([v for _, v in expected[flag]], abs=1e-6)
        post = RouteHeadPostprocessor(model=model, tokenizer=tokenizer, heads=adapted, top_n=len(passages),
                                      lora=flag)
        nodes = [NodeWithScore(node=TextNode(id_=str(i), text=text)) for i, text in enumerate(passages)]
        out = post.postprocess_nodes(nodes, query_bundle=QueryBundle(query))
        assert [int(n.node.node_id) for n in out] == [i for i, _ in expected[flag]]
        assert [n.score for n in out] == pytest.approx([v for _, v in expected[flag]], abs=1e-6)


def test_eval_ranks_a_router_with_a_lora_live_exactly_as_rank_does(routers, tmp_path):
    """The cached extraction is the base model's: eval must not sum it for a router with a LoRA."""
    from routehead_rag.eval.harness import can_use_extraction, evaluate_on_set, prepare_set, read_trec_run
    from tests.unit.test_cli import write_tiny_beir

    backbone, _, adapted, _ = routers
    (tmp_path / "beir").mkdir()
    folder = write_tiny_beir(tmp_path / "beir")
    eval_set = prepare_set(str(folder), top_k=5)
    reranker = RouteHeadReranker(model=backbone, heads=adapted)
    assert not can_use_extraction(reranker)
    evaluate_on_set(eval_set, reranker, cache_dir=tmp_path / "cache", run_output=tmp_path / "run.txt")
    run = read_trec_run(tmp_path / "run.txt")
    for qid in eval_set.qids:
        ranked = reranker.rank(eval_set.dataset.queries[qid], eval_set.documents(qid),
                               first_stage_scores=eval_set.candidates[qid].scores)
        assert [d for d, _, _ in run[qid]] == ranked.ids()
        assert [score for _, _, score in run[qid]] == pytest.approx([r.score for r in ranked], abs=1e-9)
    without = RouteHeadReranker(model=backbone, heads=adapted, lora=False)
    assert can_use_extraction(without)


def test_fit_on_extractions_made_with_a_given_adapter_caches_them_apart_and_ships_it(tmp_path):
    from routehead_rag.engine.scorer import ScoringConfig
    from routehead_rag.fit.extract import extract_sources

    backbone = tiny_backbone("llama")
    source = read_query_log(write_log(tmp_path / "log.jsonl", count=12))
    adapter = random_lora(backbone)
    cache = tmp_path / "cache"
    base = extract_sources(backbone, [source], ScoringConfig(), cache, storage_dtype="float32")
    result = run_fit(backbone, [source], tmp_path / "router", query_embedding=QueryEmbeddingConfig(layer=0),
                     search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=10, ks=(1, 2)),
                     cache_dir=cache, storage_dtype="float32", extraction_lora=adapter)
    assert len(list((cache / "extractions").iterdir())) == 2  # the adapted scores are cached apart from the base ones
    adapted = extract_sources(backbone, [source], ScoringConfig(), cache, storage_dtype="float32", lora=adapter)
    key = next(iter(adapted.scores))
    qid = key.split("/", 1)[1]
    live = AttentionScorer(backbone).head_scores(source.queries[qid], source.passages(qid, adapted.doc_ids[key]),
                                                None, adapter)
    torch.testing.assert_close(adapted.scores[key], live.debiased.float(), atol=1e-6, rtol=0)  # the adapter's, live
    assert not torch.allclose(adapted.scores[key], base.scores[key])  # not the base model's
    shipped = RoutedHeads.from_folder(result.artifact).resolve(backbone).lora
    for name, value in adapter.peft_state_dict().items():
        assert torch.equal(shipped.peft_state_dict()[name], value), name
    assert "given, not trained here" in (result.artifact / "README.md").read_text()
    with pytest.raises(ValueError, match="not both"):
        run_fit(backbone, [source], tmp_path / "other", extraction_lora=adapter,
                lora=LoraTrainingConfig(ranks=(2,)))
    with pytest.raises(ValueError, match="in this process"):
        extract_sources(backbone, [source], ScoringConfig(), None, executor=object(), lora=adapter)


# -- the prompt scope: the passages read with the LoRA too -------------------------------------------------
def prompt_lora(backbone, seed=3):
    lora = random_lora(backbone, seed=seed)
    return Lora.from_peft_state_dict(lora.config.model_copy(update={"scope": "prompt"}), lora.peft_state_dict())


def test_prompt_scope_adapts_the_passages_pass_too():
    backbone = tiny_backbone("llama")
    query_scope, prompt_scope = random_lora(backbone), prompt_lora(backbone)
    probe = backbone.decoder.layers[1].self_attn.k_proj
    outputs = {}
    for name, chosen in (("base", None), ("query", query_scope), ("prompt", prompt_scope)):
        seen = []
        handle = probe.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        try:
            AttentionScorer(backbone).head_scores("where is the moon", DOCS, [Head(1, 0)], chosen)
        finally:
            handle.remove()
        outputs[name] = seen
    assert torch.equal(outputs["base"][0], outputs["query"][0])  # query scope: the passages' keys are the base's
    assert not torch.allclose(outputs["base"][0], outputs["prompt"][0])  # prompt scope: relevance-aware keys


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_merging_a_prompt_lora_into_our_own_model_scores_as_the_hooks_do(arch):
    hooked_backbone, merged_backbone = tiny_backbone(arch), tiny_backbone(arch)  # two copies of the same weights
    lora = prompt_lora(hooked_backbone)
    heads = every_head(hooked_backbone)
    hooked = AttentionScorer(hooked_backbone).head_scores("where is the moon", DOCS, heads, lora)
    merge_into(merged_backbone.decoder, lora)
    merged = AttentionScorer(merged_backbone).head_scores("where is the moon", DOCS, heads)
    torch.testing.assert_close(merged.real, hooked.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged.content_free, hooked.content_free, atol=1e-5, rtol=0)


def test_a_prompt_lora_router_merges_into_an_owned_model_and_never_into_a_shared_one(routers, tmp_path):
    backbone, plain, _, _ = routers
    router, config = load_artifact(plain, backbone.fingerprint())
    lora = prompt_lora(backbone)
    save_artifact(tmp_path / "prompt", router, config.model_copy(update={"lora": lora.config}), "card", lora)
    weights = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    shared = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=tmp_path / "prompt")
    shared_scores = [r.score for r in shared.rank("sea", DOCS)]
    assert shared.resolved_strategy.lora is not None and not shared.resolved_strategy.lora_merged  # hooks, per call
    for name, p in backbone.model.named_parameters():
        assert torch.equal(p, weights[name]), name  # the caller's model is untouched
    owned = dataclasses.replace(tiny_backbone("llama"), owned=True)
    strategy = RoutedHeads.from_folder(tmp_path / "prompt").resolve(owned).ready(owned)
    assert strategy.lora is None and strategy.lora_merged  # merged once into our own weights
    merged = RouteHeadReranker(model=owned, heads=strategy)
    assert [r.score for r in merged.rank("sea", DOCS)] == pytest.approx(shared_scores, abs=1e-5)


def test_shared_generator_logits_unchanged_while_another_thread_ranks_with_a_prompt_lora(routers, tmp_path):
    backbone, plain, _, _ = routers
    router, config = load_artifact(plain, backbone.fingerprint())
    lora = prompt_lora(backbone)
    save_artifact(tmp_path / "prompt", router, config.model_copy(update={"lora": lora.config}), "card", lora)
    model, tokenizer = backbone.model, backbone.tokenizer
    reranker = RouteHeadReranker(model=model, tokenizer=tokenizer, heads=tmp_path / "prompt")
    generator_logits_unchanged_while_ranking(model, tokenizer, reranker)
    assert all(not m._forward_hooks for m in model.modules())


def test_prompt_scope_training_learns_in_batches_of_queries(tmp_path):
    backbone, queries, train, dev, config = adapter_setup(tmp_path)
    config = config.model_copy(update={"scope": "prompt", "batch_queries": 2})
    fit = train_lora(backbone, queries, train, dev, config)
    assert fit.dev_ndcg > fit.base_dev_ndcg + 0.02, fit.runs[0]["history"]
    assert fit.lora is not None and fit.lora.config.scope == "prompt"
    assert all(p.grad is None for p in backbone.model.parameters())
