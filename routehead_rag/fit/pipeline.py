"""``routehead-rag fit``: extract -> head search -> router training -> artifact + fit report.

Training side only; never imported by inference code.  Fit data is any mix of
BEIR-layout folders (their fit split) and JSONL query logs, one line per query::

    {"query": "...", "candidates": [{"id": "d1", "text": "..."}, ...], "relevance": {"d1": 2}}

(``"id"`` optional; clicks count as grade 1).  Extraction is cached per query, so an
interrupted fit resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bi_encoder import BiEncoderConfig
from ..engine.embedding import QueryEmbeddingConfig, embed_query
from ..engine.lora import Lora, lora_digest
from ..engine.scorer import AttentionScorer, ScoringConfig
from ..fusion import FusionConfig
from ..heads import Head
from ..measures import batched_ndcg
from ..offline.extraction import storage_dtype_of
from ..recipe import final_scores
from ..router.artifact import RouterArtifactConfig, save_artifact
from ..router.model import SelectionConfig
from .calibration import calibrate_router
from .extract import PooledExtractions, extract_sources, passage_cosines
from .labelled import LabelledSetBuilder, grades, labelled_queries, rank_heads, scratch_tensor
from .lora import LoraFit, LoraQuery, LoraTrainingConfig, train_lora
from .records import DataRecord, FitRecords, LoraRecord, SearchGridRow, SearchRecord, TrainingRecord
from .report import heatmap, model_card
from .search import SearchConfig, search_heads
from .sources import FitSource
from .term_weights import (
    check_bi_encoder_weights,
    choose_bi_encoder_weight,
    fit_bi_encoder_weight,
    fit_fusion,
    query_weights,
)
from .training import TrainingConfig, choose_depth_cost, route_top_k, train_router


def select_static_heads(
    backbone, sources: Sequence[FitSource], k: int, scoring: ScoringConfig | None = None,
    cache_dir: str | Path | None = None, progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[tuple[Head, float]], int]:
    """QRHead-style static heads: the ``k`` best by mean single-head nDCG@10 over the sources' labelled queries.

    Returns ``([(head, quality), ...], number of labelled queries)``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    data = extract_sources(backbone, sources, scoring or ScoringConfig(), cache_dir, progress).labelled_set()
    return rank_heads(data)[:k], len(data.qids)


def _sample_rows(rows: Sequence, count: int | None, rng) -> list:
    return sorted(rng.sample(list(rows), count)) if count is not None and count < len(rows) else list(rows)


def _lora_query(key: str, pooled: PooledExtractions, source: FitSource, scorers: dict, scoring: ScoringConfig,
                backbone, heads: Sequence[Head], fusion_weight: float | None, level_weight: float,
                cosine: torch.Tensor | None, cosine_weight: float) -> LoraQuery:
    """One query as LoRA training sees it; ``scorers`` caches one scorer per prompt wording."""
    if source.instruction not in scorers:
        scorers[source.instruction] = AttentionScorer(
            backbone, scoring if source.instruction is None else scoring.with_instruction(source.instruction))
    doc_ids = pooled.doc_ids[key]
    return LoraQuery(
        key=key, text=pooled.texts[key], passages=source.passages(key.split("/", 1)[1], doc_ids),
        gains=grades(doc_ids, pooled.qrels.get(key, {})), scorer=scorers[source.instruction], heads=list(heads),
        first_stage=torch.tensor(pooled.first_stage[key], dtype=torch.float64), fusion_weight=fusion_weight,
        level_weight=level_weight, cosine=cosine, cosine_weight=cosine_weight)


def lora_queries(backbone, sources, scoring, pooled, data, routed, router, fusion, embeddings, train_rows, dev_rows,
                 config: LoraTrainingConfig, bi_encoder: BiEncoderConfig | None = None,
                 cosines: torch.Tensor | None = None, cosine_weights: torch.Tensor | None = None,
                 cache_dir: str | Path | None = None) -> tuple[dict[str, LoraQuery], list[str], list[str]]:
    """The LoRA training's view of the sampled train and dev queries: text, passages, grades, routed heads, fusion
    weight, and the bi-encoder's cosines where the router has one (``cosines`` ``[query, passage]``: rows already
    computed, e.g. the dev rows; the sampled rows it lacks are computed here) at each query's weight
    (``cosine_weights`` ``[query]``; ``None``: the bi-encoder's own)."""
    import random

    rng = random.Random(config.seed)
    train = _sample_rows(train_rows.tolist(), config.train_queries, rng)
    dev = _sample_rows(dev_rows.tolist(), config.dev_queries, rng)
    if bi_encoder is not None:
        missing = [r for r in [*train, *dev] if cosines is None or not bool(cosines[r].any())]
        if missing:
            computed = passage_cosines(bi_encoder, sources, pooled, data, missing,  # 0 outside the missing rows
                                       cache_dir=cache_dir)
            cosines = computed if cosines is None else cosines + computed
    scorers: dict[str | None, AttentionScorer] = {}
    source_of = {source.name: source for source in sources}
    weights = None
    if fusion.mode == "per_query":
        with torch.no_grad():
            weights = router.fusion_weights(embeddings).double()
    queries = {}
    for row in [*train, *dev]:
        key = data.qids[row]
        count = len(pooled.doc_ids[key])
        weight = None if fusion.mode == "off" else fusion.weight if fusion.mode == "global" else float(weights[row])
        queries[key] = _lora_query(
            key, pooled, source_of[key.split("/", 1)[0]], scorers, scoring, backbone,
            [Head(int(i) // data.num_heads, int(i) % data.num_heads) for i in routed[row].tolist()], weight,
            fusion.level_weight, None if bi_encoder is None else cosines[row, :count].clone(),
            0.0 if bi_encoder is None else bi_encoder.weight if cosine_weights is None else float(cosine_weights[row]))
    return queries, [data.qids[r] for r in train], [data.qids[r] for r in dev]


def train_lora_for_router(backbone, router: str | Path, sources: Sequence[FitSource], config: LoraTrainingConfig,
                          checkpoint_dir: str | Path | None = None,
                          progress: Callable[[str, int, int], None] | None = None) -> LoraFit:
    """Train a LoRA for an already-fitted router (its folder) on ``sources``, without refitting it: its train and
    dev split of their labelled queries (the fit's rule, :func:`~routehead_rag.fit.training.split_train_dev`, with
    the router's recorded seed and dev fraction), its routed heads, first-stage weight, level weight and bi-encoder
    term per query, as the scores users get. The router's own fusion and calibration are not refitted: for
    comparing LoRA choices on one router (``benchmarks/lora_lodo.py``); ``run_fit(lora=...)`` is the fit that
    ships one."""
    import random

    from ..strategy import RoutedHeads
    from .records import FitRecords
    from .training import split_train_dev

    strategy = RoutedHeads.from_folder(router).resolve(backbone).without_lora()
    settings = FitRecords.of(strategy.config).training.settings
    pooled = PooledExtractions.of_sources(sources)
    keys = labelled_queries(pooled.doc_ids, pooled.qrels)
    train_rows, dev_rows = split_train_dev([pooled.groups[k] for k in keys], settings.dev_fraction, settings.seed)
    rng = random.Random(config.seed)
    train = [keys[r] for r in _sample_rows(train_rows.tolist(), config.train_queries, rng)]
    dev = [keys[r] for r in _sample_rows(dev_rows.tolist(), config.dev_queries, rng)]
    bi_encoder = strategy.config.bi_encoder
    encoder = None
    if bi_encoder is not None:
        from ..bi_encoder import load_bi_encoder

        encoder = load_bi_encoder(bi_encoder.model)
    scoring = strategy.config.scoring
    source_of = {source.name: source for source in sources}
    scorers: dict[str | None, AttentionScorer] = {}
    queries = {}
    for done, key in enumerate([*train, *dev], start=1):
        recipe = strategy.route(backbone, pooled.texts[key])
        query = _lora_query(key, pooled, source_of[key.split("/", 1)[0]], scorers, scoring, backbone,
                            recipe.head_list, recipe.fusion_weight, recipe.level_weight, None, 0.0)
        if encoder is not None:
            query.cosine, query.cosine_weight = encoder.cosines(query.text, query.passages), recipe.cosine_weight
        queries[key] = query
        if progress is not None:
            progress("route", done, len(train) + len(dev))
    return train_lora(backbone, queries, train, dev, config, checkpoint_dir, progress)


@dataclass
class FitResult:
    artifact: Path
    config: RouterArtifactConfig
    report: Path
    heatmap: Path


def run_fit(
    backbone,
    sources: list[FitSource],
    out: str | Path,
    *,
    scoring: ScoringConfig | None = None,
    query_embedding: QueryEmbeddingConfig | None = None,
    search: SearchConfig | Sequence[SearchConfig] | None = None,
    training: TrainingConfig | None = None,
    cache_dir: str | Path | None = None,
    command: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    report_dir: str | Path | None = None,
    fusion: bool = True,
    calibrate: bool = True,
    executor=None,
    storage_dtype: str = "float16",
    lora: LoraTrainingConfig | None = None,
    extraction_lora: Lora | None = None,
    bi_encoder: BiEncoderConfig | None = None,
    bi_encoder_head: bool = False,
    bi_encoder_weights: Sequence[float] | None = None,
) -> FitResult:
    """Fit a router on ``sources`` and write the artifact and its fit report to ``out``.

    ``search`` may be a list of settings (e.g. pool sizes K and label sizes P): each gets its
    own head search and router, and the one with the best dev nDCG@10 of the routed
    aggregation wins (the dev queries are the same for all).  ``progress(stage, done, total)``
    is called as extraction, embedding, search and training advance.

    On top of the router, ``fusion`` fits the first-stage weight (off, global or per query, on dev)
    and ``calibrate`` a map of the final score to a probability of relevance (on dev); both off is
    the paper's RouteHead.

    ``storage_dtype`` is the precision of the extraction cache and of the labelled set, which is
    kept in a memory-mapped temporary file (in ``cache_dir`` when given), so the memory a fit needs
    grows with heads x candidates per piece of queries, not with the log.

    ``lora`` trains a LoRA for the fitted router (:mod:`routehead_rag.fit.lora`), kept only if it beats
    the router on dev; the calibration is then refitted on its dev scores. ``extraction_lora`` instead
    fits the router on scores made with a given LoRA (e.g. a previous fit's) and ships that LoRA with
    it, so the router is chosen for the scores it will be used with.

    ``bi_encoder`` adds a bi-encoder's cosine at its given weight (:mod:`routehead_rag.bi_encoder`; the default was
    chosen across domains, ``benchmarks/bi_encoder_weight.py``): the level term and both calibrations are fitted
    with it, and the dev metrics report the routed heads with it. ``bi_encoder_weights`` lets this fit's dev queries
    replace the given weight by one of these where they prefer it significantly
    (:func:`~routehead_rag.fit.term_weights.choose_bi_encoder_weight`; ``None``: the given weight stays). ``bi_encoder_head`` also
    trains the router to scale that weight per query (:func:`~routehead_rag.fit.term_weights.fit_bi_encoder_weight`,
    on the train queries' cosines), kept where it beats the global weight on dev.
    """
    if bi_encoder_head and bi_encoder is None:
        raise ValueError("bi_encoder_head=True scales a bi-encoder's weight per query: pass bi_encoder too")
    if bi_encoder_weights is not None:
        if bi_encoder is None:
            raise ValueError("bi_encoder_weights are weights of a bi-encoder to choose on dev: pass bi_encoder too, or "
                             "leave bi_encoder_weights out")
        bi_encoder_weights = check_bi_encoder_weights(bi_encoder_weights, "bi_encoder_weights")  # before any extraction
    if lora is not None and extraction_lora is not None:
        raise ValueError("pass lora (train a LoRA for the router) or extraction_lora (fit the router on scores made "
                         "with a given one), not both")
    scoring = scoring or ScoringConfig()
    query_embedding = query_embedding or QueryEmbeddingConfig(layer=backbone.num_layers // 2)
    searches = [search or SearchConfig()] if search is None or isinstance(search, SearchConfig) else list(search)
    if not searches:
        raise ValueError("search is an empty list: pass at least one SearchConfig")
    if len({s.depth for s in searches}) != 1:
        raise ValueError("every search setting must use the same nDCG depth")
    training = training or TrainingConfig()
    report = progress or (lambda stage, done, total: None)
    pooled = PooledExtractions.of_sources(sources)
    builder = LabelledSetBuilder(pooled.doc_ids, pooled.qrels, backbone.num_layers, backbone.num_heads,
                                 depth=searches[0].depth, dtype=storage_dtype_of(storage_dtype),
                                 on_disk=Path(cache_dir) if cache_dir is not None else True)
    extract_sources(backbone, sources, scoring, cache_dir, report, executor=executor, storage_dtype=storage_dtype,
                    pooled=pooled, sink=builder.put, lora=extraction_lora)
    data = builder.finish()
    embeddings = None  # [query, hidden] float32, beside the scores in a memory-mapped temporary file
    for index, key in enumerate(data.qids):
        embedding = embed_query(backbone, pooled.texts[key], query_embedding)
        if embeddings is None:
            embeddings, _embeddings_backing = scratch_tensor((len(data.qids), embedding.shape[0]), torch.float32,
                                                            Path(cache_dir) if cache_dir is not None else True)
        embeddings[index] = embedding
        report("embed", index + 1, len(data.qids))
    best = None
    grid = []
    for index, setting in enumerate(searches):
        report("search + train", index, len(searches))
        found = search_heads(data, setting)
        trained = train_router(embeddings, found.labels, data, training, [pooled.groups[key] for key in data.qids])
        grid.append(SearchGridRow(settings=setting, k=trained.k, dev_ndcg=trained.dev_ndcg))
        if best is None or trained.dev_ndcg > best[2].dev_ndcg + 1e-12:
            best = (setting, found, trained)
    report("search + train", len(searches), len(searches))
    search, found, trained = best

    static_heads = [str(head) for head, _ in rank_heads(data, search.depth)[: trained.k]]
    train_rows, dev_rows = torch.tensor(trained.train_rows), torch.tensor(trained.dev_rows)
    depth = choose_depth_cost(trained.router, embeddings, data, dev_rows, trained.k, training.depth_costs,
                              training.depth_tolerance)
    routed = route_top_k(trained.router, embeddings, trained.k, [depth.depth_cost])[0]  # [query, k]
    routed_dev = float(batched_ndcg(data.sum_heads(routed[dev_rows], dev_rows), data.gains[dev_rows],
                                    data.valid[dev_rows], data.ideal_dcg[dev_rows], search.depth).mean())
    report("fusion + calibration", 0, 1)
    attention, signal = data.sum_heads(routed).double(), pooled.first_stage_signal(data)  # [query, passage] each
    router, fusion_config = trained.router, FusionConfig()
    fusion_dev: dict[str, float] = {}
    if fusion:
        fitted = fit_fusion(trained.router, embeddings, attention, signal, data, train_rows,
                            dev_rows, seed=training.seed)
        router, fusion_config, fusion_dev = fitted.router, fitted.fusion, fitted.dev
    # what the weight was fitted with (a log's own order counts as "order"); any first stage's ranks are used alike
    fusion_config = fusion_config.model_copy(
        update={"first_stages": tuple(sorted({s.first_stage_kind or "order" for s in sources}))})
    weights = query_weights(router, fusion_config, embeddings)  # [query] or None
    # [query, passage] the bi-encoder's cosines (dev rows; train rows too for its head), [query] each one's weight
    cosines, cosine_weights, bi_encoder_dev = None, None, {}
    if bi_encoder is not None:
        rows = torch.cat([train_rows, dev_rows]) if bi_encoder_head else dev_rows
        cosines = passage_cosines(bi_encoder, sources, pooled, data, rows.tolist(), report, cache_dir)
        if bi_encoder_weights is not None:
            choice = choose_bi_encoder_weight(attention, signal, weights, cosines, bi_encoder, data, dev_rows,
                                              bi_encoder_weights)
            bi_encoder = choice.bi_encoder
            bi_encoder_dev.update({f"bi_encoder_v{weight:g}_ndcg@10": value for weight, value in choice.dev.items()})
            bi_encoder_dev["bi_encoder_weight"] = bi_encoder.weight
        cosine_weights = torch.full((len(data.qids),), bi_encoder.weight, dtype=torch.float64)
        if bi_encoder_head:
            report("bi-encoder head", 0, 1)
            scaled = fit_bi_encoder_weight(router, embeddings, attention, signal, weights, cosines, bi_encoder, data,
                                           train_rows, dev_rows, seed=training.seed)
            router, bi_encoder, cosine_weights = scaled.router, scaled.bi_encoder, scaled.weights
            bi_encoder_dev.update({f"bi_encoder_{mode}_ndcg@10": value for mode, value in scaled.dev.items()})
            report("bi-encoder head", 1, 1)
        with_cosine = final_scores(data.sum_heads(routed[dev_rows], dev_rows), None, None, None, data.valid[dev_rows],
                                   cosine=cosines[dev_rows], cosine_weight=cosine_weights[dev_rows])
        bi_encoder_dev["bi_encoder_routed_ndcg@10"] = float(batched_ndcg(
            with_cosine, data.gains[dev_rows], data.valid[dev_rows], data.ideal_dcg[dev_rows], search.depth).mean())
    calibration_kwargs = dict(cache_dir=cache_dir, progress=report, executor=executor, storage_dtype=storage_dtype,
                              seed=training.seed)
    calibration = calibration_unfused = None
    calibration_dev: dict[str, float] = {}
    if calibrate:
        level, calibration, calibration_unfused, calibration_dev = calibrate_router(
            backbone, sources, scoring, pooled, data, routed, weights, dev_rows.tolist(), lora=extraction_lora,
            cosines=cosines, bi_encoder=bi_encoder, cosine_weights=cosine_weights, **calibration_kwargs)
        fusion_config = fusion_config.model_copy(update={"level_weight": level})
    report("fusion + calibration", 1, 1)
    lora_fit, lora_record, lora_dev = None, None, {}
    if lora is not None:
        queries, train_keys, dev_keys = lora_queries(backbone, sources, scoring, pooled, data, routed, router,
                                                     fusion_config, embeddings, train_rows, dev_rows, lora,
                                                     bi_encoder, cosines, cosine_weights, cache_dir)
        lora_fit = train_lora(backbone, queries, train_keys, dev_keys, lora,
                              Path(cache_dir) if cache_dir is not None else None, report)
        lora_record = LoraRecord(
            settings=lora, train_queries=len(train_keys), dev_queries=len(dev_keys), runs=lora_fit.runs,
            base_dev_ndcg=lora_fit.base_dev_ndcg, dev_ndcg=lora_fit.dev_ndcg, chosen_rank=lora_fit.rank,
            chosen_lr=lora_fit.learning_rate, chosen_epoch=lora_fit.epoch,
            seconds_per_train_query=lora_fit.seconds_per_train_query,
            seconds_per_dev_query=lora_fit.seconds_per_dev_query)
        lora_dev = {"lora_base_ndcg@10": lora_fit.base_dev_ndcg, "lora_ndcg@10": lora_fit.dev_ndcg,
                    "lora_dev_queries": float(len(dev_keys))}
        if lora_fit.lora is not None and calibrate:  # the scores users get changed: calibrate those
            rows = {key: row for row, key in enumerate(data.qids)}
            level, calibration, calibration_unfused, calibration_dev = calibrate_router(
                backbone, sources, scoring, pooled, data, routed, weights, [rows[k] for k in dev_keys],
                lora=lora_fit.lora, full_attention=lora_fit.dev_attention, cosines=cosines, bi_encoder=bi_encoder,
                cosine_weights=cosine_weights, **calibration_kwargs)
            fusion_config = fusion_config.model_copy(update={"level_weight": level})
    shipped_lora = lora_fit.lora if lora_fit is not None else extraction_lora
    counts = torch.zeros(data.num_layers * data.num_heads)
    counts.index_add_(0, routed.flatten(), torch.ones(routed.numel()))
    config = RouterArtifactConfig(
        backbone_name=str(backbone.name),
        backbone_fingerprint=backbone.fingerprint(),
        scoring=scoring,
        query_embedding=query_embedding,
        router=router.config,
        selection=SelectionConfig(mode="top_k", k=trained.k, max_heads=max(trained.k, 1), depth_cost=depth.depth_cost),
        fusion=fusion_config,
        calibration=calibration,
        calibration_unfused=calibration_unfused,
        **FitRecords(
            search=SearchRecord(chosen=search, grid=grid),
            training=TrainingRecord(
                settings=training, chosen_k=trained.k, chosen_sparsity=trained.sparsity, chosen_epoch=trained.epoch,
                chosen_depth_cost=depth.depth_cost, depth_curve=depth.curve, storage_dtype=storage_dtype,
                lora=lora_record, extraction_lora_sha256=lora_digest(extraction_lora) if extraction_lora else None),
            data=[DataRecord(name=s.name, origin=s.origin, queries=len(s.candidates),
                             instruction=s.instruction or "the scoring prompt's") for s in sources],
        ).config_fields(),
        dev_metrics={
            "routed_ndcg@10": routed_dev,
            "routed_no_depth_cost_ndcg@10": trained.dev_ndcg,
            "static_ndcg@10": trained.dev_static_ndcg,
            "oracle_label_ndcg@10": float(found.query_ndcg[torch.tensor(trained.dev_rows)].mean()),
            "train_queries": float(len(trained.train_rows)),
            "dev_queries": float(len(trained.dev_rows)),
            **{f"fusion_{mode}_ndcg@10": value for mode, value in fusion_dev.items()},
            **bi_encoder_dev,
            **{f"calibration_{name}": value for name, value in calibration_dev.items()},
            **lora_dev,
        },
        static_heads=static_heads,
        command=command,
        fit_dtype=str(backbone.dtype).removeprefix("torch."),
        lora=shipped_lora.config if shipped_lora is not None else None,
        bi_encoder=bi_encoder,
    )
    out = Path(out)
    card = model_card(config)
    save_artifact(out, router, config, card, shipped_lora)
    report_dir = Path(report_dir) if report_dir is not None else out.parent
    report_dir.mkdir(parents=True, exist_ok=True)
    heatmap_path = report_dir / f"{out.name}-routed-heads.png"
    heatmap(counts.reshape(data.num_layers, data.num_heads), heatmap_path,
            title=f"routed heads over {len(data.qids)} fit queries")
    report_path = report_dir / f"{out.name}-fit-report.md"
    report_path.write_text(card + f"\n![routed heads]({heatmap_path.name})\n", encoding="utf-8")
    return FitResult(artifact=out, config=config, report=report_path, heatmap=heatmap_path)
