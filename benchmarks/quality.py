"""Quality benchmark on the evaluation protocol (data/README.md): BM25, dense, ICR, static top-k.

Every attention strategy is scored from one extraction pass per set (cached per query,
so an interrupted run resumes).  The static head count k and the heads themselves are
chosen on the fit splits only; test splits are only ever reported.

    python benchmarks/quality.py                      # full protocol
    python benchmarks/quality.py --fit-max-queries 100  # cap each fit split (first N ids)

Writes benchmarks/results/quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from routehead_rag.backbone import default_cache_dir, load_backbone
from routehead_rag.data import PROTOCOL, Role, bm25_order, build_candidates, load_protocol_set
from routehead_rag.evaluation import dataset_key, extract, order_run, strategy_run
from routehead_rag.first_stage import DenseRetriever
from routehead_rag.metrics import candidate_recall, evaluate, per_query, ranking_to_run
from routehead_rag.prompt import INSTRUCTIONS, prompt_config_for
from routehead_rag.scoring import AttentionScorer, ScoringConfig, rank_heads_by_ndcg

console = Console(stderr=True)
K_GRID = [1, 2, 4, 8, 16, 32, 64]


def load_set(name, role, data_dir, max_queries, scorers, cache_dir):
    dataset, qids = load_protocol_set(name, role, data_dir)
    scorer = scorers[PROTOCOL.spec(name).instruction]  # ICR's wording per set: relevance or question
    if max_queries is not None:
        qids = qids[:max_queries]
    candidates = build_candidates(dataset, qids, PROTOCOL.top_k)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{name} ({role.value}): extracting", total=len(qids))
        extractions = extract(
            scorer, dataset.name, dataset.queries, candidates,
            lambda qid, ids: dataset.passages(ids, PROTOCOL.max_words), cache_dir,
            progress=lambda n: progress.advance(task, n),
            key_extra=dataset_key(dataset.path, PROTOCOL.max_words),
        )
    return dataset, qids, candidates, extractions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="default: $ROUTEHEAD_DATA or ../shared/data")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--fit-max-queries", type=int, default=None, help="cap each fit split (first N ids)")
    parser.add_argument("--test-max-queries", type=int, default=None, help="cap each test split (smoke runs)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-dense", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    started = time.time()
    cache_dir = args.cache_dir or default_cache_dir()
    backbone = load_backbone(args.model, dtype=args.dtype)
    scorers = {name: AttentionScorer(backbone, ScoringConfig(prompt=prompt_config_for(name))) for name in INSTRUCTIONS}

    # ---- fit: choose k and the static heads --------------------------------------------------
    fit = {}
    for entry in PROTOCOL.entries_for(Role.FIT):
        fit[entry.name] = load_set(entry.name, Role.FIT, args.data_dir, args.fit_max_queries, scorers, cache_dir)
    pooled_scores, pooled_ids, pooled_qrels = {}, {}, {}
    for name, (dataset, qids, _, extractions) in fit.items():
        for qid in qids:
            key = f"{name}/{qid}"
            pooled_scores[key] = extractions[qid].calibrated
            pooled_ids[key] = extractions[qid].doc_ids
            pooled_qrels[key] = dataset.qrels.get(qid, {})
    ranked_heads = rank_heads_by_ndcg(pooled_scores, pooled_ids, pooled_qrels)
    fit_table = {}
    for k in K_GRID:
        heads = [h for h, _ in ranked_heads[:k]]
        per_set = {
            name: evaluate(strategy_run({q: ex[q] for q in qids}, heads), dataset.qrels, ["nDCG@10"], qids=qids)["nDCG@10"]
            for name, (dataset, qids, _, ex) in fit.items()
        }
        fit_table[k] = {"per_set": per_set, "mean": statistics.mean(per_set.values())}
    fit_icr = {
        name: evaluate(strategy_run({q: ex[q] for q in qids}, None), dataset.qrels, ["nDCG@10"], qids=qids)["nDCG@10"]
        for name, (dataset, qids, _, ex) in fit.items()
    }
    best_k = max(K_GRID, key=lambda k: (fit_table[k]["mean"], -k))
    static_heads = [h for h, _ in ranked_heads[:best_k]]
    console.print(f"static k={best_k} chosen on fit: {', '.join(map(str, static_heads))}")

    # ---- test ---------------------------------------------------------------------------------
    dense = None if args.no_dense else DenseRetriever()
    rows, test_sets = [], {}
    for entry in PROTOCOL.entries_for(Role.IN_DOMAIN_TEST) + PROTOCOL.entries_for(Role.CROSS_DOMAIN_TEST):
        dataset, qids, candidates, extractions = load_set(
            entry.name, entry.role, args.data_dir, args.test_max_queries, scorers, cache_dir
        )
        test_sets[entry.name] = (dataset, qids, candidates, extractions)
        runs = {
            "BM25": order_run(bm25_order(dataset, qids, PROTOCOL.top_k)),
            "ICR (all heads)": strategy_run(extractions, None),
            f"static top-{best_k}": strategy_run(extractions, static_heads),
        }
        if dense is not None:
            run = {}
            for qid in qids:
                run.update(ranking_to_run(qid, candidates[qid], dense.rerank(dataset.queries[qid], dataset.passages(candidates[qid], PROTOCOL.max_words))))
            runs["dense MiniLM-L6"] = run
        row = {
            "dataset": entry.name,
            "role": entry.role.value,
            "queries": len(qids),
            "recall@20": candidate_recall(candidates, dataset.qrels, k=PROTOCOL.recall_depth, rel=PROTOCOL.spec(entry.name).binary_rel, qids=qids),
            "ndcg@10": {name: evaluate(run, dataset.qrels, ["nDCG@10"], qids=qids)["nDCG@10"] for name, run in runs.items()},
        }
        rows.append(row)
        console.print(row)

    reference = reference_check(fit, test_sets)
    strategies = list(rows[0]["ndcg@10"])
    averages = {s: statistics.mean(r["ndcg@10"][s] for r in rows) for s in strategies}
    result = {
        "benchmark": "quality",
        "model": args.model,
        "dtype": args.dtype,
        "protocol": {"top_k": PROTOCOL.top_k, "max_words": PROTOCOL.max_words, "measure": PROTOCOL.measure},
        "fit_max_queries": args.fit_max_queries,
        "test_max_queries": args.test_max_queries,
        "fit": {"queries": {n: len(v[1]) for n, v in fit.items()}, "icr": fit_icr,
                 "k_grid": {str(k): v for k, v in fit_table.items()}, "chosen_k": best_k,
                 "static_heads": [str(h) for h in static_heads],
                 "head_ranking_top16": [[str(h), v] for h, v in ranked_heads[:16]]},
        "test": rows,
        "reference_check": reference,
        "average": averages,
        "seconds": round(time.time() - started, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "quality.md")
    plot(result, args.out / "quality.png")
    console.print(f"wrote {args.out}/quality.{{json,md,png}}")
    return 0


REFERENCE = {  # data/README.md, SmolLM2-135M fp32, same inputs
    "trec-dl-2019": {"queries": 43, "first-stage": 0.5456, "ICR authors masked N/A": 0.5422, "ICR authors plain N/A": 0.5433,
                     "no calibration": 0.4829, "independent re-implementation": 0.5350, "best 4 static heads LOO": 0.5643},
    "musique-ans-migres200": {"queries": 60, "first-stage": 0.2814, "ICR authors masked N/A": 0.5658,
                              "ICR authors plain N/A": 0.5848, "no calibration": 0.3041,
                              "independent re-implementation": 0.5905, "best 4 static heads LOO": 0.6981},
}


def leave_one_out_static(extractions, qids, dataset, k=4):
    """Each query scored with the best k heads chosen on the other queries of the same set."""
    values = []
    doc_ids = {q: extractions[q].doc_ids for q in qids}
    for qid in qids:
        rest = {q: extractions[q].calibrated for q in qids if q != qid}
        heads = [h for h, _ in rank_heads_by_ndcg(rest, doc_ids, dataset.qrels)[:k]]
        values.append(per_query(strategy_run({qid: extractions[qid]}, heads), dataset.qrels, "nDCG@10", qids=[qid])[qid])
    return statistics.mean(values)


def reference_check(fit, test_sets):
    """Our numbers on the exact inputs of data/README.md's reference table."""
    checks = {}
    for name, source in (("trec-dl-2019", fit), ("musique-ans-migres200", test_sets)):
        if name not in source:
            continue
        dataset, qids, candidates, extractions = source[name]
        qids = sorted(qids)[: REFERENCE[name]["queries"]]
        sub = {q: extractions[q] for q in qids}
        ours = {
            "queries": len(qids),
            "first-stage": evaluate(order_run({q: candidates[q] for q in qids}), dataset.qrels, ["nDCG@10"], qids=qids)["nDCG@10"],
            "ICR plain N/A (ours)": evaluate(strategy_run(sub, None), dataset.qrels, ["nDCG@10"], qids=qids)["nDCG@10"],
            "no calibration (ours)": evaluate(strategy_run(sub, None, calibrate=False), dataset.qrels, ["nDCG@10"], qids=qids)["nDCG@10"],
            "best 4 static heads LOO (ours)": leave_one_out_static(extractions, qids, dataset),
        }
        checks[name] = {"ours": ours, "reference": REFERENCE[name]}
        console.print(name, ours)
    return checks


def write_markdown(result, path: Path) -> None:
    strategies = list(result["average"])
    lines = [
        f"# Quality: nDCG@10 on the protocol test sets ({result['model']}, {result['dtype']})",
        "",
        f"First {result['protocol']['top_k']} candidates, passages cut to {result['protocol']['max_words']} words. "
        f"Static heads: top-{result['fit']['chosen_k']} by single-head nDCG@10 on the fit splits "
        f"({', '.join(result['fit']['static_heads'])}).",
        "",
        "| set | role | queries | recall@20 | " + " | ".join(strategies) + " |",
        "|---|---|---|---|" + "---|" * len(strategies),
    ]
    for row in result["test"]:
        best = max(row["ndcg@10"].values())
        cells = [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in row["ndcg@10"].values()]
        lines.append(f"| {row['dataset']} | {row['role']} | {row['queries']} | {row['recall@20']:.4f} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | | | " + " | ".join(f"{result['average'][s]:.4f}" for s in strategies) + " |")
    lines += ["", "## Reference check (data/README.md inputs)", "",
              "| set | queries | first stage | ICR ours (plain N/A) | ICR authors (plain / masked) | no calibration ours / ref | best 4 static LOO ours / ref |",
              "|---|---|---|---|---|---|---|"]
    for name, check in result["reference_check"].items():
        o, r = check["ours"], check["reference"]
        lines.append(
            f"| {name} | {o['queries']} | {o['first-stage']:.4f} | {o['ICR plain N/A (ours)']:.4f} | "
            f"{r['ICR authors plain N/A']:.4f} / {r['ICR authors masked N/A']:.4f} | "
            f"{o['no calibration (ours)']:.4f} / {r['no calibration']:.4f} | "
            f"{o['best 4 static heads LOO (ours)']:.4f} / {r['best 4 static heads LOO']:.4f} |"
        )
    fit = result["fit"]
    lines += ["", "## Choosing k on the fit splits", "",
              f"Fit queries: {fit['queries']} (first N ids per set when capped). ICR on fit: "
              + ", ".join(f"{n} {v:.4f}" for n, v in fit["icr"].items()) + ".", "",
              "| k | mean fit nDCG@10 |", "|---|---|"]
    for k, v in fit["k_grid"].items():
        lines.append(f"| {k} | {v['mean']:.4f}{' (chosen)' if int(k) == fit['chosen_k'] else ''} |")
    lines += ["", f"Produced by `python benchmarks/quality.py` in {result['seconds']:.0f} s."]
    path.write_text("\n".join(lines) + "\n")


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(result["average"])
    sets = [r["dataset"] for r in result["test"]] + ["average"]
    values = {s: [r["ndcg@10"][s] for r in result["test"]] + [result["average"][s]] for s in strategies}
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(strategies)
    for i, s in enumerate(strategies):
        ax.bar([x + i * width for x in range(len(sets))], values[s], width, label=s)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sets))], sets, rotation=20, ha="right")
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"Re-ranking quality, {result['model']} ({result['dtype']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
