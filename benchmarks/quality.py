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
import statistics
import sys
import time
from pathlib import Path

from common import (
    K_GRID,
    RESULTS,
    best_static,
    console,
    load_set,
    machine,
    machine_line,
    ndcg,
    reference_check,
    scorers_by_instruction,
    seeded,
    static_run,
)

from routehead_rag.data.first_stage import DenseRetriever
from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.eval.harness import first_stage_run
from routehead_rag.eval.metrics import candidate_recall, ranking_to_run
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="default: $ROUTEHEAD_DATA or ../shared/data")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--fit-max-queries", type=int, default=None, help="cap each fit split (first N ids)")
    parser.add_argument("--test-max-queries", type=int, default=None, help="cap each test split (smoke runs)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-dense", action="store_true")
    args = parser.parse_args()

    seeded()
    started = time.time()
    cache_dir = args.cache_dir or default_cache_dir()
    backbone = load_backbone(args.model, dtype=args.dtype)
    scorers = scorers_by_instruction(backbone)

    # ---- fit: choose k and the static heads --------------------------------------------------
    fit = {e.name: load_set(e.name, Role.FIT, args.data_dir, args.fit_max_queries, scorers, cache_dir)
           for e in PROTOCOL.entries_for(Role.FIT)}
    best_k, static_heads, fit_choice = best_static(fit, K_GRID)
    fit_icr = {name: ndcg(s, static_run(ex, None)) for name, (s, ex) in fit.items()}
    console.print(f"static k={best_k} chosen on fit: {', '.join(map(str, static_heads))}")

    # ---- test ---------------------------------------------------------------------------------
    dense = None if args.no_dense else DenseRetriever()
    rows, test_sets = [], {}
    for entry in PROTOCOL.entries_for(Role.IN_DOMAIN_TEST) + PROTOCOL.entries_for(Role.CROSS_DOMAIN_TEST):
        eval_set, extractions = load_set(entry.name, entry.role, args.data_dir, args.test_max_queries, scorers, cache_dir)
        test_sets[entry.name] = (eval_set, extractions)
        runs = {
            "BM25": first_stage_run(eval_set),
            "ICR (all heads)": static_run(extractions, None),
            f"static top-{best_k}": static_run(extractions, static_heads),
        }
        if dense is not None:
            run = {}
            for qid in eval_set.qids:
                run.update(ranking_to_run(qid, eval_set.candidates[qid],
                                          dense.rerank(eval_set.dataset.queries[qid], eval_set.passages(qid))))
            runs["dense MiniLM-L6"] = run
        row = {
            "dataset": entry.name,
            "role": entry.role.value,
            "queries": len(eval_set.qids),
            "recall@20": candidate_recall(eval_set.candidates, eval_set.dataset.qrels, k=PROTOCOL.recall_depth,
                                          rel=PROTOCOL.spec(entry.name).binary_rel, qids=eval_set.qids),
            "ndcg@10": {name: ndcg(eval_set, run) for name, run in runs.items()},
        }
        rows.append(row)
        console.print(row)

    reference = reference_check({**fit, **test_sets})
    strategies = list(rows[0]["ndcg@10"])
    averages = {s: statistics.mean(r["ndcg@10"][s] for r in rows) for s in strategies}
    result = {
        "benchmark": "quality",
        "model": args.model,
        "dtype": args.dtype,
        "protocol": {"top_k": PROTOCOL.top_k, "max_words": PROTOCOL.max_words, "measure": PROTOCOL.measure},
        "fit_max_queries": args.fit_max_queries,
        "test_max_queries": args.test_max_queries,
        "fit": {"queries": {n: len(v[0].qids) for n, v in fit.items()}, "icr": fit_icr,
                 "k_grid": {str(k): v for k, v in fit_choice["k_grid"].items()}, "chosen_k": best_k,
                 "static_heads": [str(h) for h in static_heads],
                 "head_ranking_top16": fit_choice["ranking_top16"]},
        "test": rows,
        "reference_check": reference,
        "average": averages,
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "quality.md")
    plot(result, args.out / "quality.png")
    console.print(f"wrote {args.out}/quality.{{json,md,png}}")
    return 0


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
    lines += ["", machine_line(result), "", f"Produced by `python benchmarks/quality.py` in {result['seconds']:.0f} s."]
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
