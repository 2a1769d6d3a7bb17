"""Scoring head strategies on a labelled set: what ``routehead-rag eval`` does, and what the benchmarks build on.

Every attention strategy is scored from one cached all-heads extraction per query
(:mod:`routehead_rag.fit.extraction`) and chooses its heads through the one seam,
:mod:`routehead_rag.strategy`, exactly as :class:`~routehead_rag.RouteHeadReranker` does::

    eval_set = prepare_set("trec-dl-2020", max_queries=20)
    extractions = extract_set(eval_set, scorer, cache_dir)
    run = strategy_run(extractions, strategy.resolve(backbone), backbone, eval_set.dataset.queries)
    set_metrics(eval_set, run)        # {"ndcg@10": ..., "recall@20": ...}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.scorer import AttentionScorer, ScoringConfig, aggregate
from ..fit.extraction import QueryExtraction, extract
from ..heads import Head
from ..paths import default_cache_dir
from ..fusion import first_stage_signal, fuse
from ..strategy import AllHeads, AutoHeads, HeadStrategy, Route, RoutedHeads, StaticHeads
from .beir import BeirDataset, CandidateSource, load_beir
from .candidates import bm25_order, build_candidates
from .metrics import Run, candidate_recall, evaluate, ranking_to_run, rankings_to_run
from .protocol import PROTOCOL, Role, instruction_for, load_protocol_set, select_queries

if TYPE_CHECKING:
    from ..model.backbone import Backbone

STRATEGIES = ("bm25", "all", "static", "routed")


@dataclass
class EvalSet:
    """A labelled set with the queries to score and each query's candidate list (first-stage order)."""

    dataset: BeirDataset
    qids: list[str]
    candidates: dict[str, list[str]]
    top_k: int = PROTOCOL.top_k
    max_words: int = PROTOCOL.max_words

    @property
    def name(self) -> str:
        return self.dataset.name

    def first_stage_order(self) -> dict[str, list[str]]:
        """Each query's candidates in first-stage order: the candidate lists themselves, except for a
        pool set (its source order is not a ranking), where BM25 over the pool orders them."""
        if self.dataset.candidate_source is CandidateSource.POOL:
            return bm25_order(self.dataset, self.qids, self.top_k)
        return {q: list(self.candidates[q]) for q in self.qids}

    def passages(self, qid: str, doc_ids: Sequence[str] | None = None) -> list[str]:
        """The passages a re-ranker sees for ``qid``: its candidates cut to ``max_words`` words."""
        return self.dataset.passages(self.candidates[qid] if doc_ids is None else doc_ids, self.max_words)


def prepare_set(
    data: str | Path,
    *,
    role: Role | str | None = None,
    split: str = "test",
    max_queries: int | None = None,
    top_k: int = PROTOCOL.top_k,
    max_words: int = PROTOCOL.max_words,
    data_dir: str | Path | None = None,
) -> EvalSet:
    """Load a set and form its candidate lists: the protocol's queries for ``role``, else the
    first ``max_queries`` judged queries of ``split`` (ids sorted as strings)."""
    if role is not None:
        dataset, qids = load_protocol_set(str(data), role, data_dir)
        qids = qids[:max_queries] if max_queries is not None else qids
    else:
        dataset = load_beir(data, split=split, data_dir=data_dir)
        qids = select_queries(dataset, max_queries)
    return EvalSet(dataset, qids, build_candidates(dataset, qids, top_k), top_k, max_words)


def extract_set(
    eval_set: EvalSet,
    scorer: AttentionScorer,
    cache_dir: str | Path | None,
    progress: Callable[[int], None] | None = None,
    executor=None,
    storage_dtype: str = "float32",
) -> dict[str, QueryExtraction]:
    """Every head's scores of every query's candidates, from the extraction cache where present.

    Kept in float32 by default (evaluation is compared with full-precision reference figures; the
    fit keeps float16, see :mod:`routehead_rag.fit.extraction`)."""
    return extract(
        scorer, eval_set.name, eval_set.dataset.queries, eval_set.candidates,
        lambda qid, ids: eval_set.passages(qid, ids), Path(cache_dir) if cache_dir is not None else None,
        progress=progress, key_extra={"max_words": eval_set.max_words}, executor=executor, storage_dtype=storage_dtype,
    )


def adapted_extractions(
    eval_set: EvalSet,
    scorer: AttentionScorer,
    routes: Mapping[str, Route],
    progress: Callable[[int], None] | None = None,
) -> dict[str, QueryExtraction]:
    """Each query's routed heads scored live with its route's query-side adapter (NaN elsewhere).

    Not cached: the cache holds the base model's all-heads extraction, which an adapter changes
    (its query part reads the passages differently); so an adapter costs one routed pass per query."""
    out: dict[str, QueryExtraction] = {}
    for qid, route in routes.items():
        doc_ids = eval_set.candidates[qid]
        scores = scorer.head_scores(eval_set.dataset.queries[qid], eval_set.passages(qid, doc_ids), route.heads,
                                    route.adapter)
        out[qid] = QueryExtraction(qid, list(doc_ids), scores.real.float(), scores.calibrated.float())
        if progress is not None:
            progress(1)
    return out


def heads_per_query(
    strategy: HeadStrategy, backbone: Backbone | None, queries: Mapping[str, str], qids: Sequence[str]
) -> dict[str, list[Head] | None]:
    """The heads a resolved ``strategy`` sums for each query (routed: one short embedding pass each)."""
    return {qid: strategy.heads_for(backbone, queries[qid]) for qid in qids}


def run_with_heads(
    extractions: Mapping[str, QueryExtraction],
    heads_of: Mapping[str, Sequence[Head] | None],
    calibrate: bool = True,
) -> dict[str, dict[str, float]]:
    """``{qid: {doc_id: score}}`` summing each query's heads (``None``: every head) over its extraction."""
    run: dict[str, dict[str, float]] = {}
    for qid, extraction in extractions.items():
        tensor = extraction.calibrated if calibrate else extraction.real
        run.update(ranking_to_run(qid, extraction.doc_ids, aggregate(tensor, heads_of[qid]).tolist()))
    return run


def fused_run(
    extractions: Mapping[str, QueryExtraction],
    routes: Mapping[str, Route],
    first_stage: Mapping[str, Sequence[str]],
) -> dict[str, dict[str, float]]:
    """``{qid: {doc_id: score}}`` of each query's routed heads fused with its first-stage order
    (``routes[qid].fusion_weight``; ``None``: attention alone), as the re-ranker scores them."""
    run: dict[str, dict[str, float]] = {}
    for qid, extraction in extractions.items():
        route = routes[qid]
        scores = aggregate(extraction.calibrated, route.heads)
        if route.fusion_weight is not None:
            rank = {doc: position for position, doc in enumerate(first_stage[qid])}
            signal = first_stage_signal(len(extraction.doc_ids), [-float(rank[d]) for d in extraction.doc_ids])
            scores = fuse(scores, signal, route.fusion_weight)
        run.update(ranking_to_run(qid, extraction.doc_ids, scores.tolist()))
    return run


def strategy_run(
    extractions: Mapping[str, QueryExtraction],
    strategy: HeadStrategy,
    backbone: Backbone | None,
    queries: Mapping[str, str],
    calibrate: bool = True,
) -> dict[str, dict[str, float]]:
    """The run of a resolved head strategy on cached extractions: the reranker's scores, query by query."""
    return run_with_heads(extractions, heads_per_query(strategy, backbone, queries, list(extractions)), calibrate)


def first_stage_run(eval_set: EvalSet) -> dict[str, dict[str, float]]:
    """The BM25 baseline: the candidate order, or BM25 over the pool for a pool set."""
    return rankings_to_run(eval_set.first_stage_order())


def set_metrics(eval_set: EvalSet, run: Run) -> dict[str, float]:
    """nDCG@10 of ``run`` and recall@``top_k`` of the candidate lists, over the set's queries."""
    qrels, qids = eval_set.dataset.qrels, eval_set.qids
    return {
        "ndcg@10": evaluate(run, qrels, ["nDCG@10"], qids=qids)["nDCG@10"],
        f"recall@{eval_set.top_k}": candidate_recall(
            eval_set.candidates, qrels, k=eval_set.top_k, rel=PROTOCOL.spec(eval_set.name).binary_rel, qids=qids
        ),
    }


def eval_strategy(strategy: str, heads: Any = None, router: str | Path | None = None) -> HeadStrategy | None:
    """The head strategy of ``eval --strategy``: ``bm25`` (None: no model), ``all``, ``static`` (``heads``,
    or a router's static baseline) or ``routed`` (``router``, default the router shipped for the backbone)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "static" and heads is None and router is None:
        raise ValueError("--strategy static needs --heads FILE (or 'L12.H5,L3.H1') or --router DIR")
    if strategy != "static" and heads is not None:
        raise ValueError("--heads only goes with --strategy static")
    if strategy == "bm25":
        return None
    if strategy == "all":
        return AllHeads()
    if strategy == "static":
        if heads is not None:
            from ..strategy import parse_strategy

            chosen = parse_strategy(heads)
            if not isinstance(chosen, StaticHeads):
                raise ValueError(f"--strategy static takes a heads file or a head list, got {heads!r}")
            return chosen
        return StaticHeads(tuple(Head.parse(h) for h in RoutedHeads.from_folder(router).config.static_heads))
    return RoutedHeads.from_folder(router) if router is not None else AutoHeads(require_router=True)


def scoring_for(strategy: HeadStrategy, instruction: str, dataset_name: str | None, router: str | Path | None = None) -> ScoringConfig:
    """The scoring settings of an evaluation: a router's own (when one is used), in the set's wording."""
    base = ScoringConfig()
    if isinstance(strategy, RoutedHeads):
        base = strategy.config.scoring
    elif router is not None:
        base = RoutedHeads.from_folder(router).config.scoring
    return base.with_instruction(instruction_for(instruction, dataset_name))


def evaluate_on_set(
    eval_set: EvalSet,
    strategy: HeadStrategy | None,
    backbone: Backbone | None,
    *,
    instruction: str = "auto",
    router: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    executor=None,
) -> dict[str, Any]:
    """What ``routehead-rag eval`` reports: one strategy on one set, as a JSON-ready dict.

    ``strategy`` ``None`` is the first stage (BM25); otherwise it is resolved on ``backbone``
    and scored from the cached extraction, with per-query ``progress(stage, done, total)``.
    """
    report = progress or (lambda stage, done, total: None)
    config = None
    adapter_rows: dict[str, float] = {}  # nDCG@10 without the router's query adapter, when it has one
    if strategy is None:
        run = first_stage_run(eval_set)
    else:
        if backbone is None:
            raise ValueError("an attention strategy needs a backbone")
        strategy = strategy.resolve(backbone)
        config = scoring_for(strategy, instruction, eval_set.name, router)
        total, done = len(eval_set.candidates), 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            report("extracting", done, total)

        report("extracting", 0, total)
        extractions = extract_set(eval_set, AttentionScorer(backbone, config), cache_dir or default_cache_dir(), tick,
                                  executor=executor)
        routes = {}
        for index, qid in enumerate(extractions, start=1):
            routes[qid] = strategy.route(backbone, eval_set.dataset.queries[qid])
            if isinstance(strategy, RoutedHeads):
                report("routing", index, total)
        if any(route.adapter is not None for route in routes.values()):  # the adapter's scores, live
            base = fused_run(extractions, routes, eval_set.first_stage_order())
            adapter_rows["ndcg@10 (no query adapter)"] = set_metrics(eval_set, base)["ndcg@10"]
            scored = 0

            def tick_adapted(n: int) -> None:
                nonlocal scored
                scored += n
                report("query adapter", scored, total)

            extractions = adapted_extractions(eval_set, AttentionScorer(backbone, config), routes, tick_adapted)
        unfused = run_with_heads(extractions, {qid: route.heads for qid, route in routes.items()})
        run = fused_run(extractions, routes, eval_set.first_stage_order())
    router_path = strategy.folder if isinstance(strategy, RoutedHeads) else router
    return {
        "dataset": eval_set.name,
        "strategy": "bm25" if strategy is None else strategy.name,
        "heads": strategy.describe() if strategy is not None else None,
        "router": str(router_path) if router_path is not None else None,
        "split": eval_set.dataset.split,
        "instruction": config.prompt.task_instruction if config is not None else None,
        "queries": len(eval_set.qids),
        "top_k": eval_set.top_k,
        "max_words": eval_set.max_words,
        "model": backbone.name if backbone is not None and strategy is not None else None,
        "dtype": str(backbone.dtype).removeprefix("torch.") if backbone is not None and strategy is not None else None,
        **set_metrics(eval_set, run),
        **({"ndcg@10 (unfused)": set_metrics(eval_set, unfused)["ndcg@10"],
            "fusion": strategy.config.fusion.model_dump()}
           if isinstance(strategy, RoutedHeads) and strategy.config.fusion.mode != "off" else {}),
        **adapter_rows,
    }
