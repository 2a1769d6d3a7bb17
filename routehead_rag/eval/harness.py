"""Scoring a labelled set exactly as users get it: what ``routehead-rag eval`` does, and what the benchmarks build on.

Every query is ranked by :class:`~routehead_rag.RouteHeadReranker` itself: its candidates (the first
stage's top ``k``, :func:`routehead_rag.data.candidates.first_stage_lists`) go in, in first-stage order
with the first stage's scores, and the run is what the re-ranker returns. The only shortcut is where the
per-head scores come from: when they can (no LoRA, no outlier masking, no chunk mode), from one cached
all-heads extraction per query (:mod:`routehead_rag.offline.extraction`) handed to
:meth:`~routehead_rag.RouteHeadReranker.rank_scored`; everything after the scoring pass is the
re-ranker's own code, so ``eval`` and ``rank`` agree because they run the same function::

    eval_set = prepare_set("trec-dl-2020", max_queries=20)
    ranked = rerank_set(eval_set, RouteHeadReranker(model=backbone, heads="auto"), cache_dir)
    set_metrics(eval_set, ranked.run)       # {"ndcg@10": ..., "recall@20": ...}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.beir import BeirDataset, load_beir
from ..data.candidates import Candidates, first_stage_lists
from ..data.protocol import PROTOCOL, Role, load_protocol_set, select_queries
from ..engine.scorer import HeadScores
from ..offline.extraction import QueryExtraction, extract
from ..recipe import ScoringRecipe
from ..results import RankedDocument, RankedResults
from .metrics import Run, candidate_recall, evaluate, ranking_to_run, rankings_to_run

if TYPE_CHECKING:
    from ..reranker import RouteHeadReranker


@dataclass
class EvalSet:
    """A labelled set with the queries to score and each query's candidates (first-stage order, with scores)."""

    dataset: BeirDataset
    qids: list[str]
    candidates: dict[str, Candidates]
    first_stage: str = "bm25"
    top_k: int = PROTOCOL.top_k

    @property
    def name(self) -> str:
        return self.dataset.name

    def passages(self, doc_ids: Sequence[str]) -> list[str]:
        """The documents' whole texts (title, newline, text), as a user hands them to the re-ranker."""
        return [self.dataset.corpus[d].full_text for d in doc_ids]

    def documents(self, qid: str) -> list[tuple[str, str]]:
        """``qid``'s candidates as ``(doc_id, text)`` pairs in first-stage order: the re-ranker's input."""
        ids = self.candidates[qid].doc_ids
        return list(zip(ids, self.passages(ids)))


def prepare_set(
    data: str | Path,
    *,
    role: Role | str | None = None,
    split: str = "test",
    max_queries: int | None = None,
    top_k: int = PROTOCOL.top_k,
    first_stage: str = "bm25",
    data_dir: str | Path | None = None,
    dense=None,
) -> EvalSet:
    """Load a set and form its candidates: the protocol's queries for ``role``, else the first ``max_queries``
    judged queries of ``split`` (ids sorted as strings); the first stage's top ``top_k`` each."""
    if role is not None:
        dataset, qids = load_protocol_set(str(data), role, data_dir)
        qids = qids[:max_queries] if max_queries is not None else qids
    else:
        dataset = load_beir(data, split=split, data_dir=data_dir)
        qids = select_queries(dataset, max_queries)
    lists = first_stage_lists(dataset, qids, top_k, first_stage, dense=dense)
    return EvalSet(dataset, qids, lists, first_stage, top_k)


def extract_set(
    eval_set: EvalSet,
    scorer,
    cache_dir: str | Path | None,
    progress: Callable[[int], None] | None = None,
    executor=None,
    storage_dtype: str = "float32",
) -> dict[str, QueryExtraction]:
    """Every head's scores of every query's candidates, in the scorer's prompt, from the extraction cache
    where present (kept in float32 by default: evaluation is compared with full-precision figures)."""
    return extract(
        scorer, eval_set.name, eval_set.dataset.queries, {q: eval_set.candidates[q].doc_ids for q in eval_set.qids},
        lambda qid, ids: eval_set.passages(ids), Path(cache_dir) if cache_dir is not None else None,
        progress=progress, executor=executor, storage_dtype=storage_dtype,
    )


@dataclass
class RankedSet:
    """What :func:`rerank_set` returns: each query's ranking and recipe, and the run ``{qid: {doc: score}}``."""

    rankings: dict[str, RankedResults]
    recipes: dict[str, ScoringRecipe | None] = field(default_factory=dict)

    @property
    def run(self) -> dict[str, dict[str, float]]:
        """The rankings as an ir_measures run (strictly decreasing scores, so ties keep the re-ranker's order)."""
        run: dict[str, dict[str, float]] = {}
        for qid, ranked in self.rankings.items():
            run.update(ranking_to_run(qid, ranked.ids()))
        return run


def can_use_extraction(reranker: RouteHeadReranker) -> bool:
    """Whether the re-ranker's per-head scores can come from an all-heads extraction of the base model."""
    config = reranker.scorer.config
    lora = getattr(reranker.resolved_strategy, "lora", None) or getattr(reranker.resolved_strategy, "lora_merged", False)
    return not (lora or config.mask_outliers or reranker.options.chunk_long_documents)


def rerank_set(
    eval_set: EvalSet,
    reranker: RouteHeadReranker,
    cache_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    executor=None,
    extractions: Mapping[str, QueryExtraction] | None = None,
) -> RankedSet:
    """Rank every query of ``eval_set`` with ``reranker`` (see the module notes); ``extractions`` reuses an
    all-heads extraction already made with the re-ranker's scorer."""
    report = progress or (lambda stage, done, total: None)
    total = len(eval_set.qids)
    cached = extractions
    if cached is None and can_use_extraction(reranker):
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            report("extracting", done, total)

        cached = extract_set(eval_set, reranker.scorer, cache_dir, tick, executor=executor)
    ranked = RankedSet({})
    for index, qid in enumerate(eval_set.qids, start=1):
        query, documents = eval_set.dataset.queries[qid], eval_set.documents(qid)
        scores = eval_set.candidates[qid].scores
        if cached is not None:
            extraction = cached[qid]
            recipe = reranker.resolved_strategy.route(reranker.scorer.backbone, query) if documents else None
            head_scores = HeadScores(real=extraction.real, content_free=extraction.real - extraction.debiased)
            result = reranker.rank_scored(query, documents, head_scores, first_stage_scores=scores, recipe=recipe)
        else:
            result = reranker.rank(query, documents, first_stage_scores=scores)
            recipe = None
        ranked.rankings[qid], ranked.recipes[qid] = result, recipe
        report("ranking", index, total)
    return ranked


def first_stage_run(eval_set: EvalSet) -> dict[str, dict[str, float]]:
    """The first-stage baseline: each query's candidates in the first stage's order."""
    return rankings_to_run({q: eval_set.candidates[q].doc_ids for q in eval_set.qids})


def set_metrics(eval_set: EvalSet, run: Run) -> dict[str, float]:
    """nDCG@10 of ``run`` and recall@``top_k`` of the candidate lists, over the set's queries."""
    qrels, qids = eval_set.dataset.qrels, eval_set.qids
    return {
        "ndcg@10": evaluate(run, qrels, ["nDCG@10"], qids=qids)["nDCG@10"],
        f"recall@{eval_set.top_k}": candidate_recall(
            {q: eval_set.candidates[q].doc_ids for q in qids}, qrels, k=eval_set.top_k,
            rel=PROTOCOL.spec(eval_set.name).binary_rel, qids=qids,
        ),
    }


def write_trec_run(path: str | Path, rankings: Mapping[str, RankedResults], tag: str) -> Path:
    """A TREC run file (``qid Q0 docid rank score tag`` per line, best first), as IR tools read it."""
    if any(ch.isspace() for ch in tag) or not tag:
        raise ValueError(f"a run tag is one word, got {tag!r}")
    lines = []
    for qid, ranked in rankings.items():
        for r in ranked:
            doc = str(r.id)
            if any(ch.isspace() for ch in doc) or any(ch.isspace() for ch in qid):
                raise ValueError(f"query {qid!r} / document {doc!r}: TREC run files cannot hold ids with spaces")
            lines.append(f"{qid} Q0 {doc} {r.rank} {r.score!r} {tag}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def read_trec_run(path: str | Path) -> dict[str, list[tuple[str, int, float]]]:
    """``{qid: [(docid, rank, score), ...]}`` from a TREC run file, in file order."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if len(parts) != 6:
            raise ValueError(f"{path}:{number}: a run line has 6 fields (qid Q0 docid rank score tag), got {len(parts)}")
        out.setdefault(parts[0], []).append((parts[2], int(parts[3]), float(parts[4])))
    return out


def strategy_heads(strategy: str, heads: Any = None, router: str | Path | None = None) -> Any:
    """The ``heads`` argument of ``eval --strategy``: ``bm25`` (None: no model), ``all``, ``static`` (``heads``, or a
    router's static baseline) or ``routed`` (``router``, default the router shipped for the backbone)."""
    from ..strategy import AutoHeads, RoutedHeads, StaticHeads, parse_strategy

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "static" and heads is None and router is None:
        raise ValueError("--strategy static needs --heads FILE (or 'L12.H5,L3.H1') or --router DIR")
    if strategy != "static" and heads is not None:
        raise ValueError("--heads only goes with --strategy static")
    if strategy == "bm25":
        return None
    if strategy == "all":
        return "all"
    if strategy == "static":
        if heads is not None:
            if not isinstance(parse_strategy(heads), StaticHeads):
                raise ValueError(f"--strategy static takes a heads file or a head list, got {heads!r}")
            return heads
        return list(RoutedHeads.from_folder(router).config.static_heads)
    return RoutedHeads.from_folder(router) if router is not None else AutoHeads(require_router=True)


STRATEGIES = ("bm25", "all", "static", "routed")


def evaluate_on_set(
    eval_set: EvalSet,
    reranker: RouteHeadReranker | None,
    *,
    cache_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    executor=None,
    run_output: str | Path | None = None,
    tag: str = "routehead",
    router: str | Path | None = None,
) -> dict[str, Any]:
    """What ``routehead-rag eval`` reports: one configuration on one set, as a JSON-ready dict.

    ``reranker`` ``None`` is the first stage alone. ``run_output`` writes the ranking scored as a TREC run.
    ``router``: the router folder to report (a router's static baseline names it; a routed strategy knows it).
    """
    if reranker is None:
        rankings = {q: RankedResults(eval_set.dataset.queries[q], [
            RankedDocument(id=d, text="", score=float(s), rank=i, index=i - 1)
            for i, (d, s) in enumerate(zip(eval_set.candidates[q].doc_ids, eval_set.candidates[q].scores), start=1)])
            for q in eval_set.qids}
        run, backbone, strategy = first_stage_run(eval_set), None, None
    else:
        ranked = rerank_set(eval_set, reranker, cache_dir, progress, executor)
        rankings, run = ranked.rankings, ranked.run
        backbone, strategy = reranker.scorer.backbone, reranker.resolved_strategy
    if run_output is not None:
        write_trec_run(run_output, rankings, tag)
    options = reranker.options if reranker is not None else None
    prompt = reranker.scorer.config.prompt if reranker is not None else None
    return {
        "dataset": eval_set.name,
        "strategy": eval_set.first_stage if strategy is None else strategy.name,
        "heads": None if strategy is None else strategy.describe(),
        "router": str(strategy.folder) if hasattr(strategy, "folder") else (str(router) if router is not None else None),
        "split": eval_set.dataset.split,
        "first_stage": eval_set.first_stage,
        "instruction": prompt.task_instruction if prompt is not None else None,
        "passage_budget": None if prompt is None else (
            f"{prompt.max_passage_tokens} tokens" if prompt.max_passage_tokens is not None
            else f"{prompt.max_passage_words} words" if prompt.max_passage_words is not None else "whole passages"),
        "queries": len(eval_set.qids),
        "top_k": eval_set.top_k,
        "options": None if options is None else {
            k: options.model_dump()[k] for k in ("fuse_first_stage", "scale_score", "lora", "bi_encoder",
                                                "chunk_long_documents")},
        "model": backbone.name if backbone is not None else None,
        "dtype": str(backbone.dtype).removeprefix("torch.") if backbone is not None else None,
        **set_metrics(eval_set, run),
    }
