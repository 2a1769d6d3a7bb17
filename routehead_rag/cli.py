"""``routehead-rag`` command line: parse, call one library function, print.

Every command checks its arguments before any model loads.  A user error is one red line
on stderr naming the bad value and the fix, never a traceback: exit code 2 for usage errors
(bad options, unknown heads, a missing data set or file), 1 for failures while running (a
model that cannot be loaded offline, a missing extra).  ``ROUTEHEAD_DEBUG=1`` shows the
traceback instead.  ``--help`` and ``--version`` import neither torch nor transformers.
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
    MaxPassageTokens,
    MaxQueries,
    Model,
    Quiet,
    Ray,
    RayWorkers,
    SetInstruction,
    Strategy,
    app,
    check_ray,
    console,
    default_cache,
    escape,
    load_model,
    parse_heads_option,
    progress_display,
    rank_query_batch,
    ray_executor,
    read_query_batch,
    usage_errors,
    warn_deprecated_flags,
)


@app.command()
def rerank(
    query: Optional[str] = typer.Argument(None, help="The query (or --queries FILE)."),
    passages: list[str] = typer.Argument(None, help="Passages in first-stage order (best first)."),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="Read passages from a file: JSONL with 'text' (and 'id', 'meta'), or one per line."
    ),
    queries: Optional[Path] = typer.Option(
        None, help="Many queries: a JSONL file, one {'query': ..., 'documents': [...], 'first_stage_scores': [...]?} "
        "per line (documents as strings or {'id', 'text', 'meta'}); writes one JSON line per query (rank_batch)."
    ),
    model: Model = "smollm2-135m",
    heads: Optional[str] = typer.Option(
        None, help="'all', a heads file, heads like 'L12.H5,L3.H1', or a router folder (default: the router shipped "
        "for the backbone, else all)."
    ),
    keep: Optional[int] = typer.Option(None, "--keep", help="Print only the best N."),
    top_k: Optional[int] = typer.Option(None, "--top-k", hidden=True, help="Deprecated alias of --keep."),
    score_threshold: Optional[float] = typer.Option(None, help="Print only passages scoring at least this."),
    instruction: Optional[Instruction] = typer.Option(
        None, help="Prompt wording: 'relevance' (search queries) or 'question' (QA); default: the router's, else relevance."
    ),
    max_passage_tokens: MaxPassageTokens = None,
    chunk_long_documents: bool = typer.Option(
        False, help="Score a passage longer than the budget in chunks (it takes its best chunk's score)."
    ),
    dtype: Dtype = "auto",
    device: Device = None,
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Token budget of one prompt; more passages go in windows."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table (one object per query)."),
    quiet: Quiet = False,
):
    """Re-rank passages for a query and print the ranking.

    Examples:

        routehead-rag rerank "What causes tides?" "The Moon pulls the oceans." "Stocks fell."

        routehead-rag rerank "What causes tides?" --file passages.jsonl --keep 3 --json

        routehead-rag rerank --queries batch.jsonl > ranked.jsonl
    """
    with usage_errors():
        from .documents import read_documents

        if top_k is not None:
            if keep is not None:
                raise ValueError("pass --keep only (--top-k is its deprecated alias)")
            console().print("--top-k is deprecated in rerank: use --keep (same meaning)", style="yellow")
            keep = top_k
        if queries is not None:
            if query is not None or passages or file is not None:
                raise ValueError("--queries FILE takes every query from the file: give no query, passages or --file")
            batch = read_query_batch(queries)
        else:
            if query is None:
                raise ValueError("no query: give it as the first argument, or many with --queries FILE")
            documents: list = list(passages or [])
            if file is not None:
                documents += read_documents(file)
            if not documents:
                raise ValueError("no passages: give passages as arguments or with --file")
            batch = None
        if instruction is Instruction.auto:
            raise ValueError("--instruction auto needs a known data set; rerank takes 'relevance' or 'question'")
        if keep is not None and keep < 1:
            raise ValueError(f"--keep must be at least 1, got {keep}")
        from .reranker import RouteHeadReranker

        reranker = RouteHeadReranker(
            model=model, heads=parse_heads_option(heads), instruction=instruction.value if instruction else None,
            max_prompt_tokens=max_prompt_tokens, max_passage_tokens=max_passage_tokens,
            chunk_long_documents=chunk_long_documents, dtype=dtype, device=device,
        )
        reranker.check_model()
    if batch is not None:
        rank_query_batch(reranker, batch, keep, score_threshold, quiet)
        return
    if quiet:
        results = reranker.rank(query, documents, top_k=keep, score_threshold=score_threshold)
    else:
        with console().status(escape(f"loading {model} and scoring {len(documents)} passages")):
            results = reranker.rank(query, documents, top_k=keep, score_threshold=score_threshold)
    if as_json:
        typer.echo(json.dumps({"query": query, "results": results.to_records()}))
        return
    from rich.table import Table

    table = Table(title=escape(f"Query: {query}"))
    for column in ("rank", "id", "score", "passage"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(str(r.rank), escape(str(r.id)), f"{r.score:+.4f}", escape(r.text[:200]))
    console(stderr=False).print(table)


@app.command("eval")
def evaluate_command(
    data: str = typer.Argument(..., help="A BEIR-layout folder, or a set name looked up in $ROUTEHEAD_DATA."),
    strategy: Strategy = typer.Option(
        Strategy.all, help="bm25 (first stage), all (ICR), static (--heads, or --router's baseline) or routed (--router)."
    ),
    heads: Optional[str] = typer.Option(None, help="Heads file or list for --strategy static."),
    router: Optional[Path] = typer.Option(
        None, help="Router folder (routehead-rag fit) for routed or static (routed default: the router shipped for the backbone)."
    ),
    model: Model = "smollm2-135m",
    dtype: Dtype = "auto",
    device: Device = None,
    top_k: Candidates = 20,
    first_stage: str = typer.Option("bm25", help="Where the candidates come from: bm25, or dense (the packaged "
                                    "all-MiniLM-L6-v2 bi-encoder; the 'dense' extra)."),
    max_queries: MaxQueries = None,
    split: str = typer.Option("test", help="qrels split: test or train."),
    max_passage_tokens: MaxPassageTokens = None,
    fuse_first_stage: bool = typer.Option(True, help="Fuse with the first stage where the router was fitted with fusion."),
    scale_score: bool = typer.Option(True, help="Probabilities where the router has a calibration."),
    lora: bool = typer.Option(True, help="Score with the router's LoRA where it has one."),
    output: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here."),
    run_output: Optional[Path] = typer.Option(
        None, help="Write the ranking scored as a TREC run file (qid Q0 docid rank score tag)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout instead of a table."),
    cache_dir: CacheDir = None,
    instruction: SetInstruction = Instruction.auto,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    quiet: Quiet = False,
):
    """Evaluate a configuration on a labelled BEIR-layout set (nDCG@10, recall of the candidates), ranking every query
    exactly as RouteHeadReranker.rank does."""
    from .extras import ensure

    ensure("fit", "routehead-rag eval")
    check_ray(ray, ray_workers)
    with usage_errors():
        from .data.protocol import instruction_for
        from .eval.harness import prepare_set, strategy_heads
        from .options import RerankerOptions

        if top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {top_k}")
        heads_value = strategy_heads(strategy.value, None if heads is None else parse_heads_option(heads), router)
        eval_set = prepare_set(data, split=split, max_queries=max_queries, top_k=top_k, first_stage=first_stage)
        options = None
        if heads_value is not None:
            from .strategy import RoutedHeads

            # a router's static baseline is scored in the router's own prompt
            prompt = RoutedHeads.from_folder(router).scoring.prompt if strategy is Strategy.static and router else None
            options = RerankerOptions.of(
                instruction=instruction_for(instruction.value, eval_set.name), max_passage_tokens=max_passage_tokens,
                fuse_first_stage=fuse_first_stage, scale_score=scale_score, lora=lora, dtype=dtype, device=device,
                prompt=prompt)
            from .strategy import check_against_model, parse_strategy

            check_against_model(parse_strategy(heads_value), model)
    reranker = None
    if heads_value is not None:
        from .reranker import RouteHeadReranker

        backbone = load_model(model, dtype, device, quiet)
        reranker = RouteHeadReranker(model=backbone, heads=heads_value, options=options)
    from .eval.harness import evaluate_on_set

    with progress_display(quiet) as report:
        result = evaluate_on_set(
            eval_set, reranker, cache_dir=cache_dir or default_cache(), progress=report, run_output=run_output, router=router,
            executor=ray_executor(ray, ray_workers, model, reranker.scorer.backbone) if reranker is not None else None,
        )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(result))
    else:
        from rich.table import Table

        recall = f"recall@{top_k}"
        table = Table(title=escape(f"{result['dataset']} ({result['queries']} queries)"))
        for column in ("configuration", "nDCG@10", f"{recall} (candidates)"):
            table.add_column(column)
        table.add_row(escape(result["heads"] or result["strategy"]), f"{result['ndcg@10']:.4f}", f"{result[recall]:.4f}")
        console(stderr=False).print(table)
    if not quiet:
        for path in (output, run_output):
            if path is not None:
                console().print(f"wrote {escape(str(path))}")


@app.command("select-heads")
def select_heads(
    data: list[str] = typer.Argument(..., help="Labelled BEIR-layout folders or set names."),
    k: int = typer.Option(4, help="How many heads to keep."),
    out_file: Path = typer.Option(..., "--out", help="Write the heads (JSON) here."),
    model: Model = "smollm2-135m",
    dtype: Dtype = "auto",
    device: Device = None,
    split: str = typer.Option("test", help="qrels split to learn from (use a fit split)."),
    top_k: Candidates = 20,
    max_queries: MaxQueries = None,
    cache_dir: CacheDir = None,
    instruction: SetInstruction = Instruction.auto,
    quiet: Quiet = False,
):
    """QRHead-style static heads: the top-k heads by single-head nDCG@10 on labelled data."""
    from .extras import ensure

    ensure("fit", "routehead-rag select-heads")
    with usage_errors():
        from .eval.harness import prepare_set
        from .fit.sources import eval_set_source
        from .model.devices import parse_device, parse_dtype

        if k < 1:
            raise ValueError(f"--k must be at least 1, got {k}")
        parse_dtype(dtype), parse_device(device)
        sources = [
            eval_set_source(prepare_set(item, split=split, max_queries=max_queries, top_k=top_k), instruction.value)
            for item in data
        ]
    from .fit.pipeline import select_static_heads
    from .paths import default_cache_dir

    backbone = load_model(model, dtype, device, quiet)
    with progress_display(quiet) as report:
        chosen, queries = select_static_heads(backbone, sources, k, cache_dir=cache_dir or default_cache_dir(), progress=report)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(
        json.dumps({"heads": [str(h) for h, _ in chosen], "ndcg@10": [v for _, v in chosen],
                    "sets": [s.name for s in sources], "split": split, "queries": queries}, indent=2) + "\n",
        encoding="utf-8",
    )
    typer.echo(", ".join(f"{h} ({v:.3f})" for h, v in chosen))


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
    fusion: bool = typer.Option(True, help="Fit first-stage fusion on dev (off: the paper's RouteHead)."),
    calibrate: bool = typer.Option(True, help="Fit a map of scores to probabilities of relevance on dev."),
    depth_cost: list[float] = typer.Option(
        [0.0, 0.5, 1.0, 2.0, 4.0, 8.0],
        help="Depth-cost candidates (a logit penalty on deep heads, so the forward pass stops earlier); repeat to set "
        "the grid. Chosen on dev: the fewest layers run within --depth-tolerance of no cost. --depth-cost 0: off.",
    ),
    depth_tolerance: float = typer.Option(0.005, help="Most dev nDCG@10 the depth cost may give up (0.005 = half a point)."),
    storage_dtype: str = typer.Option(
        "float16", help="Precision of the extraction cache and of the labelled set: float16 (half the disk and memory; "
        "fit results move by noise, see benchmarks/results/storage_precision.md) or float32."
    ),
    lora: bool = typer.Option(
        False, "--lora/--no-lora", "--adapter/--no-adapter",
        help="Also train a LoRA for the router (kept only if it beats the router on dev). --adapter: deprecated alias.",
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
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    quiet: Quiet = False,
):
    """Fit a router: extract (cached, resumable), search head labels, train, write the artifact + report."""
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
                seed=seed)
        scoring = ScoringConfig().with_instruction("relevance" if instruction is Instruction.auto else instruction.value)
        from .fit.sources import sources_from_arguments

        sources = sources_from_arguments(data, top_k, max_queries, instruction.value)
        from .model.architecture import peek_shape

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
        result = run_fit(
            backbone, sources, out, scoring=scoring, query_embedding=embedding, search=searches, training=training,
            cache_dir=cache_dir or default_cache_dir(), command=_command(), progress=report, report_dir=report_dir,
            fusion=fusion, calibrate=calibrate, executor=ray_executor(ray, ray_workers, model, backbone),
            storage_dtype=storage_dtype, lora=lora_training,
        )
    if not quiet:
        console().print(f"wrote {result.artifact} (report {result.report}, heatmap {result.heatmap})")
    typer.echo(json.dumps({"artifact": str(result.artifact), "k": result.config.selection.k, **result.config.dev_metrics}))


def _command() -> str | None:
    """The command line as typed, for the model card (arguments after the program name)."""
    return "routehead-rag " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if len(sys.argv) > 2 else None


def main() -> None:  # pragma: no cover
    app(prog_name="routehead-rag")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
