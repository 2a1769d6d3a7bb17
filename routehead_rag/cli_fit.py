"""``routehead-rag select-heads`` and ``fit``: the commands of the training side (both need the ``fit`` extra).

Registered on the one app of :mod:`.cli_shared` when :mod:`.cli` imports this module; the same rules as
every command (arguments checked before any model loads, one-line errors).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_shared import (
    CacheDir,
    Candidates,
    Device,
    Dtype,
    Instruction,
    MaxQueries,
    Model,
    Quiet,
    Ray,
    RayWorkers,
    SetInstruction,
    app,
    check_ray,
    console,
    escape,
    load_model,
    prepare_model,
    progress_display,
    ray_executor,
    usage_errors,
    warn_deprecated_flags,
)


@app.command("select-heads")
def select_heads(
    data: list[str] = typer.Argument(..., help="Labelled BEIR-layout folders or set names."),
    k: int = typer.Option(4, help="How many heads to keep."),
    out: Path = typer.Option(..., help="Write the heads (JSON) here."),
    model: Model = "smollm2-135m",
    dtype: Dtype = "auto",
    device: Device = None,
    split: str = typer.Option(
        "fit", help="The labelled queries to learn from: 'fit' (the set's fit split, as `fit` uses: the protocol's fit "
        "queries for a protocol set, else qrels/train.tsv), or a qrels split by name (train, dev, test, ...)."
    ),
    top_k: Candidates = 20,
    max_queries: MaxQueries = None,
    cache_dir: CacheDir = None,
    instruction: SetInstruction = Instruction.auto,
    as_json: bool = typer.Option(False, "--json", help="Print what --out holds as one JSON object instead of a line."),
    quiet: Quiet = False,
):
    """QRHead-style static heads: the top-k heads by single-head nDCG@10 on labelled data (the sets' fit split).

    Examples:

        routehead-rag select-heads beir-scifact --k 4 --out heads.json

        routehead-rag select-heads beir-scifact trec-dl-2019 --k 8 --out heads.json --json
    """
    from .extras import ensure

    ensure("fit", "routehead-rag select-heads")
    with usage_errors():
        from .fit.sources import eval_set_source
        from .model.devices import parse_device, parse_dtype

        if k < 1:
            raise ValueError(f"--k must be at least 1, got {k}")
        parse_dtype(dtype), parse_device(device)
        sources = [eval_set_source(_labelled_set(item, split, max_queries, top_k), instruction.value) for item in data]
    from .fit.pipeline import select_static_heads
    from .paths import default_cache_dir

    backbone = load_model(model, dtype, device, quiet)
    with progress_display(quiet) as report:
        chosen, queries = select_static_heads(backbone, sources, k, cache_dir=cache_dir or default_cache_dir(), progress=report)
    summary = {"heads": [str(h) for h, _ in chosen], "ndcg@10": [v for _, v in chosen],
               "sets": [s.name for s in sources], "split": split, "queries": queries}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    typer.echo(json.dumps(summary) if as_json else ", ".join(f"{h} ({v:.3f})" for h, v in chosen))


def _labelled_set(item: str, split: str, max_queries: Optional[int], top_k: int):
    """``select-heads``' queries of one set: its fit split (``split="fit"``), else the named qrels split."""
    from .data.beir import resolve_data_dir
    from .data.protocol import PROTOCOL, Role
    from .eval.harness import prepare_set

    if split != "fit":
        return prepare_set(item, split=split, max_queries=max_queries, top_k=top_k)
    try:
        PROTOCOL.entry(resolve_data_dir(item).name, Role.FIT)
    except KeyError:  # not a protocol set: its own train split, as `fit` reads it
        return prepare_set(item, split="train", max_queries=max_queries, top_k=top_k)
    return prepare_set(item, role=Role.FIT, max_queries=max_queries, top_k=top_k)


@app.command()
def fit(
    data: list[str] = typer.Argument(..., help="BEIR-layout folders or set names (their fit split) or JSONL query logs."),
    out: Path = typer.Option(..., help="Write the router artifact here (a directory)."),
    model: Model = "smollm2-135m",
    top_k: Candidates = 20,
    max_queries: MaxQueries = None,
    seed: int = typer.Option(0, help="Seed of the train/dev split and of training."),
    epochs: int = typer.Option(300, help="Most training epochs per candidate setting (early stopping on dev)."),
    layer: Optional[int] = typer.Option(None, help="Query-embedding layer (default: the middle layer)."),
    cache_dir: CacheDir = None,
    instruction: SetInstruction = Instruction.auto,
    dtype: Dtype = "auto",
    device: Device = None,
    pool_size: list[int] = typer.Option([64], help="Head-search pool size K; repeat to try several (chosen on dev)."),
    max_heads: list[int] = typer.Option(
        [8], help="Most heads P in a query's label; repeat to try several. (The routed k is chosen on dev from 1, 2, 4, 8.)"
    ),
    margin: list[float] = typer.Option([0.01], help="Least nDCG gain to add a head to a label; repeat to try several."),
    report_dir: Optional[Path] = typer.Option(None, help="Where the fit report and heatmap go (default: beside --out)."),
    fuse_first_stage: bool = typer.Option(
        True, "--fuse-first-stage/--no-fuse-first-stage", "--fusion/--no-fusion",
        help="Fit first-stage fusion on dev, what eval's and rank's --fuse-first-stage apply (off: the paper's "
        "RouteHead). --fusion: deprecated alias.",
    ),
    scale_score: bool = typer.Option(
        True, "--scale-score/--no-scale-score", "--calibrate/--no-calibrate",
        help="Fit the map of scores to probabilities of relevance on dev, what --scale-score applies. --calibrate: "
        "deprecated alias (calibrate= in the Python API is the content-free subtraction).",
    ),
    depth_cost: list[float] = typer.Option(
        [0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
        help="Depth-cost candidates (a logit penalty on deep heads, so the forward pass stops earlier); repeat to set "
        "the grid. Chosen on dev: the fewest layers run within --depth-tolerance of no cost. --depth-cost 0: off.",
    ),
    depth_tolerance: float = typer.Option(0.005, help="Most dev nDCG@10 the depth cost may give up (0.005 = half a point)."),
    storage_dtype: str = typer.Option(
        "float16", help="Precision of the extraction cache and of the labelled set: float16 (half the disk and memory; "
        "fit results move by noise, see benchmarks/results/archive/storage_precision.md) or float32."
    ),
    lora: bool = typer.Option(
        False, "--lora/--no-lora", "--adapter/--no-adapter",
        help="Also train a LoRA for the router (kept only if it beats the router on dev). Off by default: left out one "
        "domain at a time, no LoRA beat the router (benchmarks/results/lora_lodo.md). --adapter: deprecated alias.",
    ),
    lora_scope: str = typer.Option(
        "query", help="What the LoRA reads with: 'query' (the query part only; the passages' pass stays the base "
        "model's) or 'prompt' (passages and query)."
    ),
    lora_rank: list[int] = typer.Option([8], "--lora-rank", "--adapter-rank",
                                        help="LoRA rank to try (alpha = 2 x rank); repeat to try several."),
    lora_lr: list[float] = typer.Option([1e-3], "--lora-lr", "--adapter-lr",
                                        help="LoRA learning rate to try; repeat to try several."),
    lora_epochs: int = typer.Option(3, "--lora-epochs", "--adapter-epochs",
                                    help="LoRA epochs per rank and learning rate (best epoch on dev)."),
    lora_train_queries: int = typer.Option(
        240, "--lora-train-queries", "--adapter-train-queries",
        help="Train queries the LoRA learns from, sampled from the router's train split (0: all)."
    ),
    lora_dev_queries: int = typer.Option(
        120, "--lora-dev-queries", "--adapter-dev-queries",
        help="Dev queries the LoRA is chosen on, sampled from the router's dev split (0: all)."
    ),
    lora_mlp: bool = typer.Option(True, "--lora-mlp/--no-lora-mlp", "--adapter-mlp/--no-adapter-mlp",
                                  help="Adapt the MLP projections too (off: the attention projections only)."),
    lora_batch_queries: int = typer.Option(1, help="Train queries per LoRA optimizer step (their mean loss)."),
    bi_encoder: str = typer.Option(
        "all-MiniLM-L6-v2", help="The bi-encoder whose cosine the router adds to its score: 'all-MiniLM-L6-v2' (packaged, "
        "offline), a sentence-transformers folder or id, or 'none' (attention alone)."
    ),
    bi_encoder_weight: str = typer.Option(
        "dev", help="What one unit of the bi-encoder's cosine adds (the attention part is a z-score): a number, kept as "
        "given, or 'dev': 40 (chosen for all-MiniLM-L6-v2 by leaving each fit domain out, "
        "benchmarks/results/bi_encoder_weight.md) unless this fit's dev queries prefer another of 5, 10, 20, 30, 60, 80 "
        "significantly (paired test, p < 0.05; e.g. multi-hop questions want less: benchmarks/results/in_domain.md)."
    ),
    bi_encoder_head: bool = typer.Option(
        False, "--bi-encoder-head/--no-bi-encoder-head",
        help="Also train the router to scale the bi-encoder weight per query (from the query embedding, on the train "
        "queries' cosines), kept where it beats the one weight on dev. Off by default: see "
        "benchmarks/results/bi_encoder_head.md (leave one domain out)."
    ),
    teacher: Optional[str] = typer.Option(
        None, help="Label the data with a local sentence-transformers model instead of its judgments (a bi-encoder or "
        "cross-encoder folder, or 'minilm' for the packaged all-MiniLM-L6-v2): for query "
        "logs without relevance labels. Graded labels: the teacher's best candidate 2, the next two 1."
    ),
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    as_json: bool = typer.Option(False, "--json", help="Accepted for symmetry: fit's summary is JSON anyway."),
    quiet: Quiet = False,
):
    """Fit a router: extract (cached, resumable), search head labels, train, write the artifact + report.

    Prints a JSON summary on stdout (the artifact, the routed k and the dev metrics), with or without --json.

    Examples:

        routehead-rag fit beir-scifact my-query-log.jsonl --out my-router

        routehead-rag fit beir-scifact --out my-router --lora --no-fuse-first-stage --pool-size 32 --pool-size 64

        routehead-rag fit my-unlabelled-log.jsonl --teacher minilm --out my-router
    """
    import itertools

    from .extras import ensure

    ensure("fit", "routehead-rag fit")
    check_ray(ray, ray_workers)
    with usage_errors():
        from .engine.embedding import QueryEmbeddingConfig
        from .engine.scorer import ScoringConfig
        from .fit.search import SearchConfig
        from .fit.training import TrainingConfig
        from .model.devices import parse_device, parse_dtype

        parse_dtype(dtype), parse_device(device)
        from .offline.extraction import storage_dtype_of

        storage_dtype_of(storage_dtype)
        searches = [SearchConfig(pool_size=p, max_heads=h, margin=m) for p, h, m in itertools.product(pool_size, max_heads, margin)]
        training = TrainingConfig(seed=seed, epochs=epochs, depth_costs=tuple(depth_cost), depth_tolerance=depth_tolerance)
        warn_deprecated_flags()
        lora_training = None
        if lora:
            from .fit.lora import LoraTrainingConfig

            for flag, value in (("--lora-train-queries", lora_train_queries),
                                ("--lora-dev-queries", lora_dev_queries)):
                if value < 0:
                    raise ValueError(f"{flag} {value} is negative: pass a number of queries, or 0 for all of them")
            lora_training = LoraTrainingConfig(
                ranks=tuple(lora_rank), learning_rates=tuple(lora_lr), epochs=lora_epochs, mlp=lora_mlp,
                scope=lora_scope, train_queries=lora_train_queries or None, dev_queries=lora_dev_queries or None,
                batch_queries=lora_batch_queries, seed=seed)
        scoring = ScoringConfig().with_instruction("relevance" if instruction is Instruction.auto else instruction.value)
        from .bi_encoder import CHOSEN_BY, DEFAULT_WEIGHT, BiEncoderConfig
        from .fit.term_weights import BI_ENCODER_WEIGHT_GRID

        on_dev = bi_encoder_weight.strip().lower() == "dev"
        try:
            weight = DEFAULT_WEIGHT if on_dev else float(bi_encoder_weight)
        except ValueError:
            raise ValueError(f"--bi-encoder-weight {bi_encoder_weight!r} is neither a number nor 'dev': pass e.g. 40, or "
                             "'dev' to let this fit's dev queries choose") from None
        bi_encoder_config = None if bi_encoder.strip().lower() == "none" else BiEncoderConfig(
            model=bi_encoder, weight=weight,
            chosen_by=CHOSEN_BY if weight == DEFAULT_WEIGHT else "given (--bi-encoder-weight)")
        bi_encoder_weights = BI_ENCODER_WEIGHT_GRID if on_dev and bi_encoder_config is not None else None
        if bi_encoder_head and bi_encoder_config is None:
            raise ValueError("--bi-encoder-head scales the bi-encoder's weight per query, but --bi-encoder is 'none': "
                             "name a bi-encoder, or leave --bi-encoder-head out")
        from .fit.sources import sources_from_arguments

        sources = sources_from_arguments(data, top_k, max_queries, instruction.value)
        labeller = None
        if teacher is not None:
            from .fit.teacher import Teacher

            labeller = Teacher(teacher)
        from .model.architecture import peek_shape

        prepare_model(model, quiet)
        shape = peek_shape(model, convert=True)
        if layer is not None and shape is not None and not -1 <= layer < shape.num_layers:
            raise ValueError(f"--layer {layer} does not exist: {model} has layers -1..{shape.num_layers - 1}")
    from .fit.pipeline import run_fit
    from .paths import default_cache_dir

    backbone = load_model(model, dtype, device, quiet)
    with usage_errors():
        embedding = QueryEmbeddingConfig(layer=backbone.num_layers // 2 if layer is None else layer)
        if embedding.layer >= backbone.num_layers:
            raise ValueError(f"--layer {layer} does not exist: {model} has layers -1..{backbone.num_layers - 1}")
    with progress_display(quiet) as report:
        if labeller is not None:
            from .fit.teacher import label_with_teacher

            sources = [label_with_teacher(source, labeller, report) for source in sources]
        result = run_fit(
            backbone, sources, out, scoring=scoring, query_embedding=embedding, search=searches, training=training,
            cache_dir=cache_dir or default_cache_dir(), command=_command(), progress=report, report_dir=report_dir,
            fusion=fuse_first_stage, calibrate=scale_score, executor=ray_executor(ray, ray_workers, model, backbone),
            storage_dtype=storage_dtype, lora=lora_training, bi_encoder=bi_encoder_config,
            bi_encoder_head=bi_encoder_head, bi_encoder_weights=bi_encoder_weights,
        )
    if not quiet:
        console().print(escape(f"wrote {result.artifact} (report {result.report}, heatmap {result.heatmap})"))
    typer.echo(json.dumps({"artifact": str(result.artifact), "k": result.config.selection.k, **result.config.dev_metrics}))


def _command() -> str | None:
    """The command line as typed, for the model card (arguments after the program name)."""
    return "routehead-rag " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if len(sys.argv) > 2 else None
