"""``routehead-rag fit``: extract -> head search -> router training -> artifact + fit report.

Training side only; never imported by inference code.  Fit data is any mix of
BEIR-layout folders (their fit split) and JSONL query logs, one line per query::

    {"query": "...", "candidates": [{"id": "d1", "text": "..."}, ...], "relevance": {"d1": 2}}

(``"id"`` optional; clicks count as grade 1).  Extraction is cached per query, so an
interrupted fit resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import RouterArtifactConfig, save_artifact
from .evaluation import extract
from .query_embedding import QueryEmbeddingConfig, embed_query
from .router import SelectionConfig
from .scoring import AttentionScorer, ScoringConfig
from .search import SearchConfig, build_labelled_set, search_heads, single_head_quality
from .training import TrainingConfig, train_router


@dataclass
class FitSource:
    """One source of labelled queries, with the passages of each query's candidates."""

    name: str
    queries: dict[str, str]
    candidates: dict[str, list[str]]
    qrels: dict[str, dict[str, int]]
    passages: Callable[[str, list[str]], list[str]]  # (qid, doc ids) -> passage texts
    origin: str
    key: dict = field(default_factory=dict)
    instruction: str | None = None  # a named prompt instruction for this source; None: the fit's scoring prompt


def read_query_log(path: str | Path, max_queries: int | None = None) -> FitSource:
    """A JSONL query log as a :class:`FitSource`; a bad line is an error naming the line."""
    path = Path(path)
    queries: dict[str, str] = {}
    candidates: dict[str, list[str]] = {}
    qrels: dict[str, dict[str, int]] = {}
    texts: dict[str, dict[str, str]] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not record["query"].strip():
                raise ValueError(f"{where}: each line needs a non-empty string 'query'")
            items = record.get("candidates")
            if not isinstance(items, list) or not items:
                raise ValueError(f"{where}: 'candidates' must be a non-empty list of {{'id': ..., 'text': ...}}")
            relevance = record.get("relevance", {})
            if not isinstance(relevance, dict):
                raise ValueError(f"{where}: 'relevance' must map candidate ids to integer grades")
            qid = str(record.get("id", f"line{number}"))
            if qid in queries:
                raise ValueError(f"{where}: query id {qid!r} repeats an earlier line")
            per_query: dict[str, str] = {}
            for index, item in enumerate(items):
                if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}: candidate {index} needs an 'id' and a string 'text'")
                doc_id = str(item["id"])
                if doc_id in per_query:
                    raise ValueError(f"{where}: candidate id {doc_id!r} repeats within the query")
                per_query[doc_id] = item["text"]
            unknown = [d for d in relevance if str(d) not in per_query]
            if unknown:
                raise ValueError(f"{where}: 'relevance' names ids that are not candidates: {unknown[:3]}")
            try:
                grades = {str(d): int(g) for d, g in relevance.items()}
            except (TypeError, ValueError):
                raise ValueError(f"{where}: relevance grades must be integers (a click counts as 1)") from None
            queries[qid], candidates[qid], qrels[qid], texts[qid] = record["query"], list(per_query), grades, per_query
            if max_queries is not None and len(queries) >= max_queries:
                break
    if not queries:
        raise ValueError(f"{path} holds no queries")
    return FitSource(
        name=path.stem, queries=queries, candidates=candidates, qrels=qrels,
        passages=lambda qid, ids: [texts[qid][d] for d in ids],
        origin=str(path), key={"log": str(path.resolve()), "bytes": path.stat().st_size},
    )


def beir_source(name_or_path: str, top_k: int = 20, max_queries: int | None = None,
                data_dir: str | None = None, max_words: int = 100, instruction: str | None = "auto") -> FitSource:
    """A BEIR-layout folder's fit split: the protocol's for a protocol set, else ``qrels/train.tsv``.

    ``instruction="auto"`` takes the protocol's wording for a protocol set (``question`` for
    the multi-hop QA sets) and ``relevance`` otherwise; ``None`` keeps the fit's own prompt.
    """
    from .data import PROTOCOL, Role, build_candidates, load_beir, protocol_queries, resolve_data_dir, select_queries
    from .evaluation import dataset_key

    folder = resolve_data_dir(name_or_path, data_dir)
    name = folder.name
    try:
        entry = PROTOCOL.entry(name, Role.FIT)
    except KeyError:
        entry = None
    if entry is not None:
        dataset = load_beir(folder, split=entry.split)
        qids = protocol_queries(dataset, Role.FIT)
    else:
        if not (folder / "qrels" / "train.tsv").is_file():
            raise ValueError(
                f"{folder} has no qrels/train.tsv: `fit` learns only from a fit split; add one, "
                "or pass a JSONL query log"
            )
        dataset = load_beir(folder, split="train")
        qids = select_queries(dataset)
    if max_queries is not None:
        qids = qids[:max_queries]
    if instruction == "auto":
        instruction = PROTOCOL.spec(name).instruction
    candidates = build_candidates(dataset, qids, top_k)
    return FitSource(
        name=name, queries={q: dataset.queries[q] for q in qids}, candidates=candidates,
        qrels={q: dataset.qrels.get(q, {}) for q in qids},
        passages=lambda qid, ids: dataset.passages(ids, max_words),
        origin=str(folder), key=dataset_key(folder, max_words), instruction=instruction,
    )


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
) -> FitResult:
    """Fit a router on ``sources`` and write the artifact and its fit report to ``out``.

    ``search`` may be a list of settings (e.g. pool sizes K and label sizes P): each gets its
    own head search and router, and the one with the best dev nDCG@10 of the routed
    aggregation wins (the dev queries are the same for all).  ``progress(stage, done, total)``
    is called as extraction, embedding, search and training advance.
    """
    scoring = scoring or ScoringConfig()
    query_embedding = query_embedding or QueryEmbeddingConfig(layer=backbone.num_layers // 2)
    searches = [search or SearchConfig()] if search is None or isinstance(search, SearchConfig) else list(search)
    if not searches:
        raise ValueError("search is an empty list: pass at least one SearchConfig")
    if len({s.depth for s in searches}) != 1:
        raise ValueError("every search setting must use the same nDCG depth")
    training = training or TrainingConfig()
    report = progress or (lambda stage, done, total: None)
    scorers: dict[str | None, AttentionScorer] = {}

    per_query, doc_ids, qrels, texts = {}, {}, {}, {}
    total = sum(len(s.candidates) for s in sources)
    done = 0
    for source in sources:
        def tick(n, _source=source):
            nonlocal done
            done += n
            report("extract", done, total)

        if source.instruction not in scorers:
            scorers[source.instruction] = AttentionScorer(
                backbone, scoring if source.instruction is None else scoring.with_instruction(source.instruction)
            )
        extractions = extract(
            scorers[source.instruction], source.name, source.queries, source.candidates, source.passages, cache_dir,
            progress=tick, key_extra=source.key,
        )
        for qid, extraction in extractions.items():
            key = f"{source.name}/{qid}"
            per_query[key] = extraction.calibrated
            doc_ids[key] = extraction.doc_ids
            qrels[key] = source.qrels.get(qid, {})
            texts[key] = source.queries[qid]
    data = build_labelled_set(per_query, doc_ids, qrels, depth=searches[0].depth)
    embeddings = []
    for index, key in enumerate(data.qids):
        embeddings.append(embed_query(backbone, texts[key], query_embedding))
        report("embed", index + 1, len(data.qids))
    embeddings = torch.stack(embeddings)  # [query, hidden]
    best = None
    grid = []
    for index, setting in enumerate(searches):
        report("search + train", index, len(searches))
        found = search_heads(data, setting)
        trained = train_router(embeddings, found.labels, data, training)
        grid.append({**setting.model_dump(mode="json"), "dev_routed_ndcg@10": trained.dev_ndcg, "k": trained.k})
        if best is None or trained.dev_ndcg > best[2].dev_ndcg + 1e-12:
            best = (setting, found, trained)
    report("search + train", len(searches), len(searches))
    search, found, trained = best

    quality = single_head_quality(data, search.depth)
    static = torch.argsort(quality, descending=True, stable=True)[: trained.k].tolist()
    static_heads = [str(data.head(i)) for i in static]
    with torch.no_grad():
        routed = trained.router(embeddings).topk(trained.k, dim=1).indices  # [query, k]
    counts = torch.zeros(data.num_layers * data.num_heads)
    counts.index_add_(0, routed.flatten(), torch.ones(routed.numel()))
    config = RouterArtifactConfig(
        backbone_name=str(backbone.name),
        backbone_fingerprint=backbone.fingerprint(),
        scoring=scoring,
        query_embedding=query_embedding,
        router=trained.router.config,
        selection=SelectionConfig(mode="top_k", k=trained.k, max_heads=max(trained.k, 1)),
        search={**search.model_dump(mode="json"), "grid": grid},
        training={**training.model_dump(mode="json"), "chosen_k": trained.k, "chosen_sparsity": trained.sparsity,
                  "chosen_epoch": trained.epoch},
        data=[
            {"name": s.name, "origin": s.origin, "queries": len(s.candidates),
             "instruction": s.instruction or "the scoring prompt's"}
            for s in sources
        ],
        dev_metrics={
            "routed_ndcg@10": trained.dev_ndcg,
            "static_ndcg@10": trained.dev_static_ndcg,
            "oracle_label_ndcg@10": float(found.query_ndcg[torch.tensor(trained.dev_rows)].mean()),
            "train_queries": float(len(trained.train_rows)),
            "dev_queries": float(len(trained.dev_rows)),
        },
        static_heads=static_heads,
        command=command,
        fit_dtype=str(backbone.dtype).removeprefix("torch."),
    )
    out = Path(out)
    card = _model_card(config)
    save_artifact(out, trained.router, config, card)
    report_dir = Path(report_dir) if report_dir is not None else out.parent
    report_dir.mkdir(parents=True, exist_ok=True)
    heatmap = report_dir / f"{out.name}-routed-heads.png"
    _heatmap(counts.reshape(data.num_layers, data.num_heads), heatmap, title=f"routed heads over {len(data.qids)} fit queries")
    report_path = report_dir / f"{out.name}-fit-report.md"
    report_path.write_text(card + f"\n![routed heads]({heatmap.name})\n", encoding="utf-8")
    return FitResult(artifact=out, config=config, report=report_path, heatmap=heatmap)


def _model_card(config: RouterArtifactConfig) -> str:
    metrics = config.dev_metrics
    lines = [
        "# RouteHead router",
        "",
        f"Backbone: `{config.backbone_name}` ({config.backbone_fingerprint.get('model_type')}, "
        f"{config.router.num_layers} layers x {config.router.num_heads} heads).",
        "",
        "## Fit data",
        "",
        "| source | queries | prompt instruction |",
        "|---|---|---|",
        *[f"| {d['name']} (`{d['origin']}`) | {d['queries']} | {d.get('instruction', '')} |" for d in config.data],
        "",
        "## Dev metrics (nDCG@10 on held-out fit queries)",
        "",
        "| routed | static top-k (same k) | search labels (hindsight) |",
        "|---|---|---|",
        f"| {metrics['routed_ndcg@10']:.4f} | {metrics['static_ndcg@10']:.4f} | {metrics['oracle_label_ndcg@10']:.4f} |",
        "",
        "## Head-search settings tried (chosen by dev nDCG@10 of the routed aggregation)",
        "",
        "| pool K | max heads P | margin | pool weight | routed k | dev routed nDCG@10 |",
        "|---|---|---|---|---|---|",
        *[
            f"| {g['pool_size']} | {g['max_heads']} | {g['margin']} | {g['pool_weight']} | {g['k']} | "
            f"{g['dev_routed_ndcg@10']:.4f} |"
            for g in config.search.get("grid", [])
        ],
        "",
        f"Chosen on dev: k = {config.training['chosen_k']}, sparsity weight = {config.training['chosen_sparsity']}, "
        f"epoch {config.training['chosen_epoch']}. Query embedding: layer {config.query_embedding.layer}, "
        f"{config.query_embedding.pooling} pooling. Backbone dtype during the fit: {config.fit_dtype}. "
        f"Static baseline heads: {', '.join(config.static_heads)}.",
        "",
        "## Reproduce",
        "",
        f"```\n{config.command or 'routehead-rag fit ...'}\n```",
    ]
    return "\n".join(lines) + "\n"


def _heatmap(counts: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, counts.shape[1] * 0.5), max(3, counts.shape[0] * 0.25)))
    image = ax.imshow(counts.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="queries routed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
