"""``routehead-rag`` command line: parse, call one library function, print.

Every command checks its arguments before any model loads.  A user error is one red line
on stderr naming the bad value and the fix, never a traceback: exit code 2 for usage errors
(bad options, unknown heads, a missing data set or file), 1 for failures while running (a
model that cannot be loaded offline, a missing extra).  ``ROUTEHEAD_DEBUG=1`` shows the
traceback instead.  ``--help`` and ``--version`` import neither torch nor transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from . import __version__

HELP = "Re-rank passages with an LLM's own attention (ICR, static heads, routed heads)."


def _console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def _error(message: str) -> None:
    from rich.markup import escape

    _console().print(f"[bold red]error:[/bold red] {escape(' '.join(message.split()))}", highlight=False)


# click's UsageError, whether typer vendors click (recent releases) or uses it (older ones)
UsageError = typer.BadParameter.__mro__[1]


class _Cli(TyperGroup):
    """Turns every user-facing error into one line and an exit code (2: usage, 1: runtime)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        debug = os.environ.get("ROUTEHEAD_DEBUG", "").strip() not in ("", "0")
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(
                args=argv, prog_name=prog_name or "routehead-rag", complete_var=complete_var,
                standalone_mode=False, **extra,
            )
            code = result if isinstance(result, int) else 0
        except typer.Abort:
            _error("aborted")
            code = 1
        except typer.TyperException as err:  # click's errors: bad options, missing arguments, ...
            command = "routehead-rag" + (f" {argv[0]}" if argv and argv[0] in self.commands else "")
            hint = f" (see '{command} --help')" if isinstance(err, UsageError) else ""
            _error(err.format_message() + hint)
            code = getattr(err, "exit_code", 1)
        except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
            if debug:
                raise
            _error(str(err) or type(err).__name__)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=_Cli, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=HELP)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"routehead-rag {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Re-rank passages with an LLM's own attention (ICR, static heads, routed heads)."""


@contextlib.contextmanager
def _usage() -> Iterator[None]:
    """Argument checks: a bad value raised inside is a usage error (exit code 2)."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


class Instruction(str, Enum):
    auto = "auto"
    relevance = "relevance"
    question = "question"


class Strategy(str, Enum):
    bm25 = "bm25"
    all = "all"
    static = "static"
    routed = "routed"


INSTRUCTION_HELP = (
    "Prompt wording: 'relevance' (search queries), 'question' (QA); 'auto' takes the protocol's "
    "choice for a known set, else 'relevance'."
)
DTYPE_HELP = "auto (default: bfloat16 on CUDA and on CPUs with native bfloat16, else float32), float32, bfloat16 or float16."
DEVICE_HELP = "cpu, cuda, cuda:1, ... (default: CUDA when available)."
QUIET_HELP = "No progress display (for scripts and notebooks)."
MODEL_HELP = "Backbone: 'smollm2-135m' (embedded), a Hugging Face id or a folder."


# Options several commands share, declared once.
Model = Annotated[str, typer.Option(help=MODEL_HELP)]
Dtype = Annotated[str, typer.Option(help=DTYPE_HELP)]
Device = Annotated[Optional[str], typer.Option(help=DEVICE_HELP)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)]
CacheDir = Annotated[Optional[Path], typer.Option(help="Extraction cache (default: $ROUTEHEAD_CACHE).")]
SetInstruction = Annotated[Instruction, typer.Option(help=INSTRUCTION_HELP)]
Candidates = Annotated[int, typer.Option(help="Candidates per query.")]
MaxQueries = Annotated[Optional[int], typer.Option(help="First N judged queries of each set (ids sorted as strings).")]
Ray = Annotated[Optional[str], typer.Option(
    "--ray", help="Extract on a Ray cluster: 'local' (start one here), 'auto' (the running one) or its address "
    "(needs the 'ray' extra)."
)]
RayWorkers = Annotated[Optional[int], typer.Option(help="Ray actors to start (default: the cluster's CPUs).")]


def _check_ray(ray: Optional[str], workers: Optional[int]) -> None:
    if ray is not None:
        from .fit.distributed import check_ray_arguments

        check_ray_arguments(workers)


def _executor(ray: Optional[str], workers: Optional[int], model: str, backbone):
    if ray is None:
        return None
    from .fit.distributed import RayExtractor

    return RayExtractor.for_backbone(model, backbone, address=ray, workers=workers)


def _heads_argument(heads: Optional[str]):
    """``--heads`` as the core takes it: a path, 'auto'/'all', or a comma/space-separated head list."""
    if heads is None:
        return "auto"
    if heads in ("auto", "all") or Path(heads).exists():
        return heads
    return [h for h in heads.replace(",", " ").split() if h]


def _progress(quiet: bool) -> contextlib.AbstractContextManager:
    """A rich progress display (stderr) yielding ``report(stage, done, total)``; a no-op with ``quiet``."""

    @contextlib.contextmanager
    def display() -> Iterator[Callable[[str, int, int], None]]:
        if quiet:
            yield lambda stage, done, total: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=_console(), transient=False) as progress:
            tasks: dict[str, int] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=total)
                progress.update(tasks[stage], completed=done, total=total)

            yield report

    return display()


def _load(model: str, dtype: Optional[str], device: Optional[str], quiet: bool):
    from .model.backbone import load_backbone

    if quiet:
        return load_backbone(model, dtype=dtype, device=device)
    with _console().status(f"loading {model}"):
        return load_backbone(model, dtype=dtype, device=device)


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
    with _usage():
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
            model=model, heads=_heads_argument(heads), instruction=instruction.value if instruction else None,
            max_prompt_tokens=max_prompt_tokens, dtype=dtype, device=device,
        )
        reranker.check_model()
    if quiet:
        results = reranker.rank(query, documents, top_k=top_k)
    else:
        with _console().status(f"loading {model} and scoring {len(documents)} passages"):
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
    _console(stderr=False).print(table)


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
    _check_ray(ray, ray_workers)
    with _usage():
        from .eval.harness import eval_strategy, evaluate_on_set, prepare_set
        from .model.devices import parse_device, parse_dtype

        for name, value in (("--top-k", top_k), ("--max-words", max_words)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        parse_dtype(dtype), parse_device(device)
        chosen = eval_strategy(strategy.value, None if heads is None else _heads_argument(heads), router)
        if chosen is not None:
            from .strategy import check_against_model

            check_against_model(chosen, model)
        eval_set = prepare_set(data, split=split, max_queries=max_queries, top_k=top_k, max_words=max_words)
    backbone = _load(model, dtype, device, quiet) if chosen is not None else None
    with _progress(quiet) as report:
        result = evaluate_on_set(
            eval_set, chosen, backbone, instruction=instruction.value, router=router, cache_dir=cache_dir, progress=report,
            executor=_executor(ray, ray_workers, model, backbone) if chosen is not None else None,
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
        _console(stderr=False).print(table)
    if output is not None and not quiet:
        _console().print(f"wrote {output}")


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
    with _usage():
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

    backbone = _load(model, dtype, device, quiet)
    with _progress(quiet) as report:
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
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    quiet: Quiet = False,
):
    """Fit a router: extract (cached, resumable), search head labels, train, write the artifact + report."""
    import itertools

    from .extras import ensure

    ensure("fit", "routehead-rag fit")
    _check_ray(ray, ray_workers)
    with _usage():
        from .engine.embedding import QueryEmbeddingConfig
        from .engine.scorer import ScoringConfig
        from .fit.search import SearchConfig
        from .fit.training import TrainingConfig
        from .model.devices import parse_device, parse_dtype

        parse_dtype(dtype), parse_device(device)
        searches = [SearchConfig(pool_size=p, max_heads=h, margin=m) for p, h, m in itertools.product(pool_size, max_heads, margin)]
        training = TrainingConfig(seed=seed, epochs=epochs)
        scoring = ScoringConfig().with_instruction("relevance" if instruction is Instruction.auto else instruction.value)
        from .fit.sources import sources_from_arguments

        sources = sources_from_arguments(data, top_k, max_queries, instruction.value)
        from .model.architecture import peek_shape

        shape = peek_shape(model, convert=True)
        if layer is not None and shape is not None and not -1 <= layer < shape.num_layers:
            raise ValueError(f"--layer {layer} does not exist: {model} has layers -1..{shape.num_layers - 1}")
    from .fit.pipeline import run_fit
    from .paths import default_cache_dir

    backbone = _load(model, dtype, device, quiet)
    with _usage():
        embedding = QueryEmbeddingConfig(layer=backbone.num_layers // 2 if layer is None else layer)
        if embedding.layer >= backbone.num_layers:
            raise ValueError(f"--layer {layer} does not exist: {model} has layers -1..{backbone.num_layers - 1}")
    with _progress(quiet) as report:
        result = run_fit(
            backbone, sources, out, scoring=scoring, query_embedding=embedding, search=searches, training=training,
            cache_dir=cache_dir or default_cache_dir(), command=_command(), progress=report, report_dir=report_dir,
            fusion=fusion, calibrate=calibrate, executor=_executor(ray, ray_workers, model, backbone),
        )
    if not quiet:
        _console().print(f"wrote {result.artifact} (report {result.report}, heatmap {result.heatmap})")
    typer.echo(json.dumps({"artifact": str(result.artifact), "k": result.config.selection.k, **result.config.dev_metrics}))


def _command() -> str | None:
    """The command line as typed, for the model card (arguments after the program name)."""
    return "routehead-rag " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if len(sys.argv) > 2 else None


def main() -> None:  # pragma: no cover
    app(prog_name="routehead-rag")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
