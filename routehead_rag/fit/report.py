"""What a fit writes besides the weights: the model card (also the fit report) and the routed-heads heatmap."""

from __future__ import annotations

from pathlib import Path

import torch

from ..router.artifact import RouterArtifactConfig
from .records import FitRecords


def model_card(config: RouterArtifactConfig) -> str:
    metrics = config.dev_metrics
    records = FitRecords.of(config)
    training = records.training
    lines = [
        "# RouteHead router",
        "",
        f"Backbone: `{config.backbone_name}` ({config.backbone_fingerprint.model_type}, "
        f"{config.router.num_layers} layers x {config.router.num_heads} heads).",
        "",
        "## Fit data",
        "",
        "| source | queries | prompt instruction |",
        "|---|---|---|",
        *[f"| {d.name} (`{d.origin}`) | {d.queries} | {d.instruction} |" for d in records.data],
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
            f"| {g.settings.pool_size} | {g.settings.max_heads} | {g.settings.margin} | {g.settings.pool_weight} | "
            f"{g.k} | {g.dev_ndcg:.4f} |"
            for g in records.search.grid
        ],
        "",
        f"Chosen on dev: k = {training.chosen_k}, sparsity weight = {training.chosen_sparsity}, "
        f"epoch {training.chosen_epoch}. Query embedding: layer {config.query_embedding.layer}, "
        f"{config.query_embedding.pooling} pooling. Backbone dtype during the fit: {config.fit_dtype}; "
        f"extractions kept in {training.storage_dtype}. Static baseline heads: {', '.join(config.static_heads)}.",
        "",
        *_depth_lines(config, training),
        *_lora_lines(config, training),
        "## First-stage fusion, bi-encoder and calibration (fitted on dev)",
        "",
        *_fusion_lines(config),
        "",
        "## Reproduce",
        "",
        f"```\n{config.command or 'routehead-rag fit ...'}\n```",
    ]
    return "\n".join(lines) + "\n"


def _lora_lines(config: RouterArtifactConfig, training) -> list[str]:
    trained, given = training.lora, training.extraction_lora_sha256
    if given and config.lora is not None:
        return [f"## LoRA ({config.lora.scope} scope; given, not trained here)", "",
                f"The router was fitted on scores made with a given LoRA on (weights sha256 {given}), "
                "which ships with it (files `adapter_model.safetensors`, `adapter_config.json`: PEFT's layout).", ""]
    if trained is None:
        return []
    scope = trained.settings.scope
    reads = "the query part only" if scope == "query" else "the whole prompt, passages included"
    lines = [
        f"## LoRA ({scope} scope: {reads}; chosen on dev)",
        "",
        f"Trained on {trained.train_queries} train queries, chosen on {trained.dev_queries} dev queries "
        "(nDCG@10 of the final, fused scores; epoch 0 is the router without a LoRA). The ideal ranking here is "
        "over the judged candidates, so these figures sit above the router's dev nDCG@10 elsewhere in this card, "
        "whose ideal counts every judged document; compare them with each other.",
        "",
        "| rank | learning rate | dev nDCG@10 by epoch | best epoch |",
        "|---|---|---|---|",
        *[f"| {run.rank} | {run.lr:g} | {', '.join(format(h.dev_ndcg, '.4f') for h in run.history)} | "
          f"{run.best_epoch} |" for run in trained.runs],
        "",
    ]
    if config.lora is not None:
        a = config.lora
        lines.append(f"Kept: rank {a.rank}, alpha {a.alpha:g}, layers {a.layers[0]}-{a.layers[-1]}, "
                     f"{', '.join(a.targets)}; dev nDCG@10 {trained.base_dev_ndcg:.4f} without, "
                     f"{trained.dev_ndcg:.4f} with (files `adapter_model.safetensors`, `adapter_config.json`: "
                     "PEFT's layout).")
    else:
        lines.append(f"Not kept: no epoch beat the router without a LoRA on dev ({trained.base_dev_ndcg:.4f}).")
    return [*lines, ""]


def _depth_lines(config: RouterArtifactConfig, training) -> list[str]:
    if not training.depth_curve:
        return []
    chosen = config.selection.depth_cost
    return [
        "## Depth cost (chosen on dev: the fewest layers run within "
        f"{100 * training.settings.depth_tolerance:g} points of no cost)",
        "",
        "| depth cost | dev nDCG@10 | mean deepest routed layer | share of layers run |",
        "|---|---|---|---|",
        *[f"| {row.depth_cost:g}{' (chosen)' if row.depth_cost == chosen else ''} | {row.dev_ndcg:.4f} | "
          f"{row.mean_deepest_layer:.1f} | {row.layer_share:.2f} |" for row in training.depth_curve],
        "",
    ]


def _fusion_lines(config: RouterArtifactConfig) -> list[str]:
    metrics, fusion = config.dev_metrics, config.fusion
    tried = {m: metrics.get(f"fusion_{m}_ndcg@10") for m in ("off", "global", "per_query")}
    lines = []
    if any(v is not None for v in tried.values()):
        lines += ["| fusion | dev nDCG@10 |", "|---|---|",
                  *[f"| {m} | {v:.4f} |" for m, v in tried.items() if v is not None], ""]
    chosen = {"off": "off (attention alone)", "global": f"one global first-stage weight w = {fusion.weight:g}",
              "per_query": "a first-stage weight the router predicts per query"}[fusion.mode]
    lines.append(f"Fusion: {chosen}.")
    if fusion.level_weight:
        lines.append(f"Attention level: the score adds {fusion.level_weight:g} x the heads' mass x the list's size (what "
                     "a passage draws against an even split), so it carries across lists.")
    if config.bi_encoder is not None:
        with_it = metrics.get("bi_encoder_routed_ndcg@10")
        scaled = " (scaled per query by the router's bi-encoder head)" if config.bi_encoder.mode == "per_query" else ""
        tried = [f"{name} {metrics[f'bi_encoder_{m}_ndcg@10']:.4f}" for m, name in (("global", "one weight"),
                 ("per_query", "per query")) if f"bi_encoder_{m}_ndcg@10" in metrics]
        by_weight = sorted((float(key[len("bi_encoder_v"):-len("_ndcg@10")]), value) for key, value in metrics.items()
                           if key.startswith("bi_encoder_v") and key.endswith("_ndcg@10"))
        if by_weight:  # the weight was chosen on dev: every weight tried (before the level term)
            tried.insert(0, "by weight " + ", ".join(f"{weight:g}: {value:.4f}" for weight, value in by_weight))
        lines.append(f"Bi-encoder: the score adds {config.bi_encoder.weight:g}{scaled} x the cosine of "
                     f"{config.bi_encoder.model} (weight chosen by {config.bi_encoder.chosen_by or 'the caller'}; "
                     "calibrated with it"
                     + (f"; dev nDCG@10 {', '.join(tried)}" if tried else "") + ")"
                     + (f"; dev nDCG@10 of the routed heads with it {with_it:.4f}, without "
                        f"{metrics['routed_ndcg@10']:.4f}." if with_it is not None and "routed_ndcg@10" in metrics else "."))
    if config.calibration is None:
        lines.append("Calibration: none (raw attention scores).")
    else:
        ece = metrics.get("calibration_ece")
        lines.append(f"Calibration: p = {_formula(config.calibration)} for {config.calibration.target}"
                     + (f"; expected calibration error on dev lists of 1, 5 and every candidate {ece:.4f}."
                        if ece is not None else "."))
        if config.calibration_unfused is not None:
            lines.append(f"Without the first stage (fuse_first_stage=False): p = {_formula(config.calibration_unfused)}.")
        single = (metrics.get("calibration_single_relevant_mean_p"), metrics.get("calibration_single_irrelevant_mean_p"))
        if None not in single:
            lines.append(f"A passage alone on dev: mean p {single[0]:.3f} when relevant, {single[1]:.3f} when not.")
    return lines


def _formula(c) -> str:
    intercept = f"{'-' if c.intercept < 0 else '+'} {abs(c.intercept):.4g}"
    count = f" {'-' if c.count_slope < 0 else '+'} {abs(c.count_slope):.4g} * log(n)" if c.count_slope else ""
    return f"sigmoid({c.slope:.4g} * score{count} {intercept})"


def heatmap(counts: torch.Tensor, path: Path, title: str) -> None:
    from ..extras import require

    matplotlib = require("matplotlib", "fit")
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
