"""``routehead-rag`` command line: thin wrappers over the library, no logic of its own."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Re-rank passages with an LLM's own attention (ICR, static heads, routed heads).",
)
console = Console(stderr=True)
out = Console()


class Strategy(str, Enum):
    bm25 = "bm25"
    all = "all"
    static = "static"
    routed = "routed"


class Instruction(str, Enum):
    auto = "auto"
    relevance = "relevance"
    question = "question"


INSTRUCTION_HELP = (
    "Prompt wording: 'relevance' (search queries), 'question' (QA); 'auto' takes the protocol's "
    "choice for a known set, else 'relevance'."
)


def _instruction_name(instruction: "Instruction", dataset_name: str | None = None) -> str:
    """The named wording: ``auto`` takes the protocol's choice for a known set, else ``relevance``."""
    from .data import PROTOCOL

    if instruction.value != "auto":
        return instruction.value
    return PROTOCOL.spec(dataset_name).instruction if dataset_name else "relevance"


def _scoring_config(instruction: "Instruction", dataset_name: str | None = None, base=None):
    """``base`` (default settings when ``None``) in the wording ``instruction`` resolves to."""
    from .scoring import ScoringConfig

    return (base or ScoringConfig()).with_instruction(_instruction_name(instruction, dataset_name))


@app.callback()
def _quiet_loading() -> None:
    """The CLI owns its process: keep transformers' loading bars out of the output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _heads_option(heads: Optional[str]):
    if heads is None:
        return "auto"
    return heads if Path(heads).exists() else [h for h in heads.replace(",", " ").split() if h]


@app.command()
def rerank(
    query: str = typer.Argument(..., help="The query."),
    passages: list[str] = typer.Argument(None, help="Passages in first-stage order (best first)."),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="Read passages from a file: JSONL with 'text' (and 'id'), or one per line."
    ),
    model: str = typer.Option("smollm2-135m", help="Backbone: 'smollm2-135m', a Hugging Face id or a folder."),
    heads: Optional[str] = typer.Option(None, help="'all', a heads file, heads like 'L12.H5,L3.H1', or a router folder (default: the router shipped for the backbone, else all)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the best K."),
    instruction: Instruction = typer.Option(Instruction.relevance, help=INSTRUCTION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
):
    """Re-rank passages for a query and print the ranking."""
    from .reranker import RouteHeadReranker

    documents: list = list(passages or [])
    if file is not None:
        documents += _read_passages(file)
    if not documents:
        raise typer.BadParameter("give passages as arguments or with --file")
    config = _scoring_config(instruction)
    reranker = RouteHeadReranker(model=model, heads=_heads_option(heads), prompt=config.prompt)
    with console.status(f"loading {model} and scoring {len(documents)} passages"):
        results = reranker.rank(query, documents, top_k=top_k)
    if as_json:
        for r in results:
            typer.echo(json.dumps({"rank": r.rank, "id": r.id, "score": r.score, "text": r.text}))
        return
    table = Table(title=f"Query: {query}")
    for column in ("rank", "id", "score", "passage"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(str(r.rank), str(r.id), f"{r.score:+.4f}", r.text[:200])
    out.print(table)


def _read_passages(path: Path) -> list:
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    documents: list = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise typer.BadParameter(f"{path}:{number}: invalid JSON ({err})") from None
            if "text" not in record:
                raise typer.BadParameter(f"{path}:{number}: a JSON line needs a 'text' field")
            documents.append((record["id"], record["text"]) if "id" in record else record["text"])
        else:
            documents.append(line)
    return documents


@app.command("eval")
def evaluate_command(
    data_dir: str = typer.Argument(..., help="A BEIR-layout folder, or a set name under the data dir."),
    strategy: Strategy = typer.Option(
        Strategy.all, help="bm25 (first stage), all (ICR), static (--heads, or --router's baseline) or routed (--router)."
    ),
    heads: Optional[str] = typer.Option(None, help="Heads file or list for --strategy static."),
    router: Optional[Path] = typer.Option(
        None, help="Router directory (routehead-rag fit) for routed or static (routed default: the router shipped for the backbone)."
    ),
    model: str = typer.Option("smollm2-135m", help="Backbone for the attention strategies."),
    dtype: Optional[str] = typer.Option(None, help="Backbone dtype: float32 (default) or bfloat16."),
    top_k: int = typer.Option(20, help="Candidates per query."),
    max_queries: Optional[int] = typer.Option(None, help="First N judged queries (ids sorted as strings)."),
    split: str = typer.Option("test", help="qrels split: test or train."),
    max_words: int = typer.Option(100, help="Cut passages to their first N words (title included)."),
    output: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here."),
    cache_dir: Optional[Path] = typer.Option(None, help="Extraction cache (default: $ROUTEHEAD_CACHE)."),
    instruction: Instruction = typer.Option(Instruction.auto, help=INSTRUCTION_HELP),
):
    """Evaluate a strategy on a labelled BEIR-layout set (nDCG@10, recall@20 of the candidates)."""
    from .data import PROTOCOL, bm25_order, build_candidates, load_beir, select_queries
    from .metrics import candidate_recall, evaluate

    if strategy is Strategy.static and not (heads or router):
        raise typer.BadParameter("--strategy static needs --heads FILE (or 'L12.H5,L3.H1') or --router DIR")
    if strategy is not Strategy.static and heads:
        raise typer.BadParameter("--heads only goes with --strategy static")
    backbone = None
    if strategy is not Strategy.bm25:
        from .backbone import load_backbone

        with console.status(f"loading {model}"):
            backbone = load_backbone(model, dtype=dtype)
    if strategy is Strategy.routed and router is None:
        from .artifact import shipped_router_for

        router = shipped_router_for(backbone.fingerprint())
        if router is None:
            raise typer.BadParameter(
                f"no router ships for {model}: pass --router DIR (fit one with `routehead-rag fit`)"
            )
    router_config = None
    if router is not None:
        from .artifact import read_artifact_config

        router_config = read_artifact_config(router)
        if strategy is Strategy.static and not heads:
            heads = ",".join(router_config.static_heads)
    dataset = load_beir(data_dir, split=split)
    qids = select_queries(dataset, max_queries)
    candidates = build_candidates(dataset, qids, top_k)
    # The router's scoring settings (when given), in this set's wording.
    config = _scoring_config(instruction, dataset.name, router_config.scoring if router_config else None)
    if strategy is Strategy.bm25:
        from .evaluation import order_run

        run = order_run(bm25_order(dataset, qids, top_k))
    else:
        run = _attention_run(dataset, qids, candidates, strategy, heads, backbone, max_words, cache_dir, config, router)
    metrics = evaluate(run, dataset.qrels, ["nDCG@10"], qids=qids)
    recall = candidate_recall(
        candidates, dataset.qrels, k=top_k, rel=PROTOCOL.spec(dataset.name).binary_rel, qids=qids
    )
    result = {
        "dataset": dataset.name,
        "strategy": strategy.value,
        "model": model if strategy is not Strategy.bm25 else None,
        "heads": heads,
        "router": str(router) if router is not None else None,
        "split": split,
        "instruction": config.prompt.task_instruction if strategy is not Strategy.bm25 else None,
        "queries": len(qids),
        "top_k": top_k,
        "max_words": max_words,
        "dtype": str(backbone.dtype).removeprefix("torch.") if backbone is not None else None,
        "ndcg@10": metrics["nDCG@10"],
        f"recall@{top_k}": recall,
    }
    table = Table(title=f"{dataset.name} ({len(qids)} queries)")
    for column in ("strategy", "nDCG@10", f"recall@{top_k} (candidates)"):
        table.add_column(column)
    table.add_row(strategy.value, f"{result['ndcg@10']:.4f}", f"{recall:.4f}")
    out.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {output}")


def _extract_dataset(scorer, dataset, candidates, max_words, cache_dir):
    """Per-head scores of every query's candidates, from the per-query cache where present, with a progress bar."""
    from rich.progress import Progress

    from .backbone import default_cache_dir
    from .evaluation import dataset_key, extract

    with Progress(console=console) as progress:
        task = progress.add_task(f"extracting {dataset.name}", total=len(candidates))
        return extract(
            scorer, dataset.name, dataset.queries, candidates, lambda qid, ids: dataset.passages(ids, max_words),
            cache_dir or default_cache_dir(), progress=lambda n: progress.advance(task, n),
            key_extra=dataset_key(dataset.path, max_words),
        )


def _attention_run(dataset, qids, candidates, strategy, heads, backbone, max_words, cache_dir, config, router=None):
    from .evaluation import strategy_run
    from .heads import validate_heads
    from .reranker import RouteHeadReranker
    from .scoring import AttentionScorer

    head_list = None
    if strategy is Strategy.static:
        head_list = RouteHeadReranker._resolve_heads(_heads_option(heads))
    if head_list is not None:
        validate_heads(head_list, backbone.num_layers, backbone.num_heads)
    extractions = _extract_dataset(AttentionScorer(backbone, config), dataset, candidates, max_words, cache_dir)
    if strategy is Strategy.routed:
        from .artifact import load_artifact
        from .evaluation import routed_run
        from .query_embedding import embed_query

        routed, artifact = load_artifact(router, backbone.fingerprint())
        heads_of = {
            qid: routed.select(embed_query(backbone, dataset.queries[qid], artifact.query_embedding), artifact.selection)
            for qid in extractions
        }
        return routed_run(extractions, heads_of)
    return strategy_run(extractions, head_list)


@app.command("select-heads")
def select_heads(
    data_dirs: list[str] = typer.Argument(..., help="Labelled BEIR-layout folders or set names."),
    k: int = typer.Option(4, help="How many heads to keep."),
    out_file: Path = typer.Option(..., "--out", help="Write the heads (JSON) here."),
    model: str = typer.Option("smollm2-135m", help="Backbone."),
    split: str = typer.Option("test", help="qrels split to learn from (use a fit split)."),
    top_k: int = typer.Option(20, help="Candidates per query."),
    max_queries: Optional[int] = typer.Option(None, help="First N judged queries of each set."),
    cache_dir: Optional[Path] = typer.Option(None, help="Extraction cache (default: $ROUTEHEAD_CACHE)."),
    instruction: Instruction = typer.Option(Instruction.auto, help=INSTRUCTION_HELP),
):
    """QRHead-style static heads: the top-k heads by single-head nDCG@10 on labelled data."""
    from .backbone import load_backbone
    from .data import build_candidates, load_beir, select_queries
    from .scoring import AttentionScorer, rank_heads_by_ndcg

    if k < 1:
        raise typer.BadParameter(f"--k must be at least 1, got {k}")
    backbone = load_backbone(model)
    scores, doc_ids, qrels = {}, {}, {}
    for data_dir in data_dirs:
        dataset = load_beir(data_dir, split=split)
        scorer = AttentionScorer(backbone, _scoring_config(instruction, dataset.name))
        qids = select_queries(dataset, max_queries)
        candidates = build_candidates(dataset, qids, top_k)
        extractions = _extract_dataset(scorer, dataset, candidates, 100, cache_dir)
        for qid, extraction in extractions.items():
            key = f"{dataset.name}/{qid}"
            scores[key] = extraction.calibrated
            doc_ids[key] = extraction.doc_ids
            qrels[key] = dataset.qrels.get(qid, {})
    ranked = rank_heads_by_ndcg(scores, doc_ids, qrels)
    chosen = ranked[:k]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(
        json.dumps({"heads": [str(h) for h, _ in chosen], "ndcg@10": [v for _, v in chosen],
                    "sets": list(data_dirs), "split": split, "queries": len(scores)}, indent=2) + "\n",
        encoding="utf-8",
    )
    out.print(", ".join(f"{h} ({v:.3f})" for h, v in chosen))


@app.command()
def fit(
    data: list[str] = typer.Argument(..., help="BEIR-layout folders (their fit split) or JSONL query logs."),
    out: Path = typer.Option(..., help="Write the router artifact here (a directory)."),
    model: str = typer.Option("smollm2-135m", help="Backbone."),
    top_k: int = typer.Option(20, help="Candidates per query for BEIR folders."),
    max_queries: Optional[int] = typer.Option(None, help="First N fit queries of each source."),
    seed: int = typer.Option(0, help="Seed of the train/dev split and of training."),
    epochs: int = typer.Option(300, help="Most training epochs per candidate setting (early stopping on dev)."),
    layer: Optional[int] = typer.Option(None, help="Query-embedding layer (default: the middle layer)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Extraction cache (default: $ROUTEHEAD_CACHE)."),
    instruction: Instruction = typer.Option(Instruction.auto, help=INSTRUCTION_HELP),
    dtype: Optional[str] = typer.Option(
        None, help="Backbone dtype for extraction: float32 (default) or bfloat16 (about 2x faster on recent CPUs)."
    ),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)."),
    pool_size: list[int] = typer.Option([64], help="Head-search pool size K; repeat to try several (chosen on dev)."),
    max_heads: list[int] = typer.Option(
        [8], help="Most heads P in a query's label; repeat to try several. (The routed k is chosen on dev from 1, 2, 4, 8.)"
    ),
    margin: list[float] = typer.Option([0.01], help="Least nDCG gain to add a head to a label; repeat to try several."),
    report_dir: Optional[Path] = typer.Option(None, help="Where the fit report and heatmap go (default: beside --out)."),
):
    """Fit a router: extract (cached, resumable), search head labels, train, write the artifact + report."""
    import itertools
    import shlex

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .backbone import default_cache_dir, load_backbone
    from .fit import beir_source, read_query_log, run_fit
    from .query_embedding import QueryEmbeddingConfig
    from .search import SearchConfig
    from .training import TrainingConfig

    sources = []
    for item in data:
        path = Path(item)
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            source = read_query_log(path, max_queries)
            source.instruction = None if instruction is Instruction.auto else instruction.value
        else:
            source = beir_source(item, top_k, max_queries, instruction=instruction.value)
        sources.append(source)
    backbone = load_backbone(model, dtype=dtype, device=device)
    embedding = QueryEmbeddingConfig(layer=backbone.num_layers // 2 if layer is None else layer)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        result = run_fit(
            backbone, sources, out, scoring=_scoring_config(instruction), query_embedding=embedding,
            search=[
                SearchConfig(pool_size=k, max_heads=p, margin=m)
                for k, p, m in itertools.product(pool_size, max_heads, margin)
            ],
            training=TrainingConfig(seed=seed, epochs=epochs), cache_dir=cache_dir or default_cache_dir(),
            command="routehead-rag fit " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None,
            progress=report, report_dir=report_dir,
        )
    metrics = result.config.dev_metrics
    console.print(f"wrote {result.artifact} (report {result.report}, heatmap {result.heatmap})")
    typer.echo(json.dumps({"artifact": str(result.artifact), "k": result.config.selection.k, **metrics}))


def main() -> None:  # pragma: no cover
    app(prog_name="routehead-rag")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
