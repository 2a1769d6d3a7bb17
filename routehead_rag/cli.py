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
    CacheDir, Candidates, Device, Dtype, Instruction, MaxQueries, Model, Quiet, Ray, RayWorkers, SetInstruction,
    Strategy, app, check_ray, console, heads_argument, load_model, progress_display, ray_executor, usage_errors,
)


@app.command()
def rerank(
    query: str = typer.Argument(..., help="The query."),
    passages: list[str] = typer.Argument(None, help="Passages in first-stage order (best first)."),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="Read passages from a file: JSONL with 'text' (and 'id'), or one per line."
    ),
    model: Model = "smollm2-135m",
    heads: Optional[str] = typer.Option(
        None, help="'all', a heads file, heads like 'L12.H5,L3.H1', or a router folder (default: the router shipped "
        "for the backbone, else all)."
    ),
    top_k: Optional[int] = typer.Option(None, help="Keep the best K."),
    instruction: Optional[Instruction] = typer.Option(
        None, help="Prompt wording: 'relevance' (search queries) or 'question' (QA); default: the router's, else relevance."
    ),
    dtype: Dtype = "auto",
    device: Device = None,
    max_prompt_tokens: int = typer.Option(4096, help="Token budget of one prompt; more passages go in windows."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
    quiet: Quiet = False,
):
    """Re-rank passages for a query and print the ranking."""
    with usage_errors():
        from .documents import read_documents

        documents: list = list(passages or [])
        if file is not None:
            documents += read_documents(file)
        if not documents:
            raise ValueError("no passages: give passages as arguments or with --file")
        if instruction is Instruction.auto:
            raise ValueError("--instruction auto needs a known data set; rerank takes 'relevance' or 'question'")
        if top_k is not None and top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {top_k}")
        from .reranker import RouteHeadReranker

        reranker = RouteHeadReranker(
            model=model, heads=heads_argument(heads), instruction=instruction.value if instruction else None,
            max_prompt_tokens=max_prompt_tokens, dtype=dtype, device=device,
        )
        reranker.check_model()
    if quiet:
        results = reranker.rank(query, documents, top_k=top_k)
    else:
        with console().status(f"loading {model} and scoring {len(documents)} passages"):
            results = reranker.rank(query, documents, top_k=top_k)
    if as_json:
        for r in results:
            typer.echo(json.dumps({"rank": r.rank, "id": r.id, "score": r.score, "text": r.text}))
        return
    from rich.table import Table

    table = Table(title=f"Query: {query}")
    for column in ("rank", "id", "score", "passage"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(str(r.rank), str(r.id), f"{r.score:+.4f}", r.text[:200])
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
    max_queries: MaxQueries = None,
    split: str = typer.Option("test", help="qrels split: test or train."),
    max_words: int = typer.Option(100, help="Cut passages to their first N words (title included)."),
    output: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout instead of a table."),
    cache_dir: CacheDir = None,
    instruction: SetInstruction = Instruction.auto,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    quiet: Quiet = False,
):
    """Evaluate a strategy on a labelled BEIR-layout set (nDCG@10, recall of the candidates)."""
    from .extras import ensure

    ensure("fit", "routehead-rag eval")
    check_ray(ray, ray_workers)
    with usage_errors():
        from .eval.harness import eval_strategy, evaluate_on_set, prepare_set
        from .model.devices import parse_device, parse_dtype

        for name, value in (("--top-k", top_k), ("--max-words", max_words)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        parse_dtype(dtype), parse_device(device)
        chosen = eval_strategy(strategy.value, None if heads is None else heads_argument(heads), router)
        if chosen is not None:
            from .strategy import check_against_model

            check_against_model(chosen, model)
        eval_set = prepare_set(data, split=split, max_queries=max_queries, top_k=top_k, max_words=max_words)
    backbone = load_model(model, dtype, device, quiet) if chosen is not None else None
    with progress_display(quiet) as report:
        result = evaluate_on_set(
            eval_set, chosen, backbone, instruction=instruction.value, router=router, cache_dir=cache_dir, progress=report,
            executor=ray_executor(ray, ray_workers, model, backbone) if chosen is not None else None,
        )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(result))
    else:
        from rich.table import Table

        recall = f"recall@{top_k}"
        table = Table(title=f"{result['dataset']} ({result['queries']} queries)")
        for column in ("strategy", "nDCG@10", f"{recall} (candidates)"):
            table.add_column(column)
        table.add_row(result["heads"] or result["strategy"], f"{result['ndcg@10']:.4f}", f"{result[recall]:.4f}")
        console(stderr=False).print(table)
    if output is not None and not quiet:
        console().print(f"wrote {output}")


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
    adapter: bool = typer.Option(
        False, help="Also train a query-side LoRA adapter (the query part only; kept if it beats the router on dev)."
    ),
    adapter_rank: list[int] = typer.Option([8], help="LoRA rank to try (alpha = 2 x rank); repeat to try several."),
    adapter_lr: list[float] = typer.Option([1e-3], help="Adapter learning rate to try; repeat to try several."),
    adapter_epochs: int = typer.Option(3, help="Adapter epochs per rank and learning rate (best epoch on dev)."),
    adapter_train_queries: int = typer.Option(
        240, help="Train queries the adapter learns from, sampled from the router's train split (0: all)."
    ),
    adapter_dev_queries: int = typer.Option(
        120, help="Dev queries the adapter is chosen on, sampled from the router's dev split (0: all)."
    ),
    adapter_mlp: bool = typer.Option(True, help="Adapt the MLP projections too (off: the attention projections only)."),
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
        from .fit.extraction import storage_dtype_of

        storage_dtype_of(storage_dtype)
        searches = [SearchConfig(pool_size=p, max_heads=h, margin=m) for p, h, m in itertools.product(pool_size, max_heads, margin)]
        training = TrainingConfig(seed=seed, epochs=epochs, depth_costs=tuple(depth_cost), depth_tolerance=depth_tolerance)
        adapter_training = None
        if adapter:
            from .fit.adapter import AdapterTrainingConfig

            for flag, value in (("--adapter-train-queries", adapter_train_queries),
                                ("--adapter-dev-queries", adapter_dev_queries)):
                if value < 0:
                    raise ValueError(f"{flag} {value} is negative: pass a number of queries, or 0 for all of them")
            adapter_training = AdapterTrainingConfig(
                ranks=tuple(adapter_rank), learning_rates=tuple(adapter_lr), epochs=adapter_epochs, mlp=adapter_mlp,
                train_queries=adapter_train_queries or None, dev_queries=adapter_dev_queries or None, seed=seed)
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
            storage_dtype=storage_dtype, adapter=adapter_training,
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
