"""The shipped router's query-side adapter on the protocol test sets: with it against without it.

Both rows use the same router (the same routed heads and first-stage weight per query), and both
score each test query's routed heads live (:func:`routehead_rag.eval.harness.adapted_extractions`,
what ``routehead-rag eval --strategy routed`` does), once with the adapter on the query part and
once without, so no all-heads extraction is needed. The rows without the adapter are the
``RouteHead (paper)`` / ``RouteHead`` rows of ``routehead.json`` (made from the cached all-heads
extraction); the largest difference to them is recorded as a check. Both fused with the first stage as shipped and
unfused (the routed heads alone); paired randomization tests against BM25 and against the router
without its adapter; the static baseline's numbers come from ``routehead.json`` (same extraction).
Latency: the re-ranker's own ``rank`` with ``query_adapter`` on and off, interleaved on the same
queries. Calibration: expected calibration error of the shipped probabilities on every test pair.

    python benchmarks/adapter.py --dtype bfloat16

Writes benchmarks/results/adapter.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, console, machine, machine_line, scorers_by_instruction, seeded, shipped_probabilities

from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.eval.harness import adapted_extractions, first_stage_run, fused_run, prepare_set, run_with_heads
from routehead_rag.eval.metrics import paired_randomization_test, per_query
from routehead_rag.fit.fusion_fit import expected_calibration_error
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import portable_path
from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.router.artifact import SHIPPED_ROUTERS
from routehead_rag.strategy import RoutedHeads

ROWS = ("BM25", "routed, no adapter", "routed + adapter", "shipped, no adapter", "shipped + adapter")


def latency(backbone, router, eval_set, count):
    """Median seconds per query of ``rank`` with the adapter on and off (interleaved, same inputs)."""
    on = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=router)
    off = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=router, query_adapter=False)
    inputs = [(eval_set.dataset.queries[q], eval_set.passages(q)) for q in eval_set.qids[:count]]
    for reranker in (on, off):
        reranker.rank(*inputs[0])  # warm-up
    times = {"adapter on": [], "adapter off": []}
    for query, passages in inputs:
        for label, reranker in (("adapter off", off), ("adapter on", on)):
            start = time.perf_counter()
            reranker.rank(query, passages)
            times[label].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["adapter on"], times["adapter off"])]
    return {"dataset": eval_set.name, "queries": len(inputs),
            "median_seconds": {k: statistics.median(v) for k, v in times.items()},
            "median_ratio": statistics.median(ratios)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--max-queries", type=int, default=None, help="first N test queries per set (default: all)")
    parser.add_argument("--latency-queries", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    strategy = RoutedHeads.from_folder(args.router).resolve(backbone)
    if strategy.adapter is None:
        console.print(f"{args.router} has no query adapter: fit it with `routehead-rag fit ... --adapter`")
        return 1
    reference = json.loads((RESULTS / "routehead.json").read_text())
    static_label = next(s for s in reference["test"][0]["ndcg@10"] if s.startswith("static") and "chosen on fit" in s)
    static_of = {row["dataset"]: row["ndcg@10"][static_label] for row in reference["test"]}
    reference_of = {row["dataset"]: row["ndcg@10"] for row in reference["test"]}
    scorers = scorers_by_instruction(backbone)  # as routehead.py: the protocol's wording per set
    rows, pairs = [], {"adapter": ([], []), "base": ([], [])}
    for entry in [*PROTOCOL.entries_for(Role.IN_DOMAIN_TEST), *PROTOCOL.entries_for(Role.CROSS_DOMAIN_TEST)]:
        eval_set = prepare_set(entry.name, role=entry.role, max_queries=args.max_queries)
        qids, qrels = eval_set.qids, eval_set.dataset.qrels
        # one route per query for both rows: the heads and first-stage weight do not depend on the adapter
        routes = {q: strategy.route(backbone, eval_set.dataset.queries[q]) for q in qids}
        first_stage = eval_set.first_stage_order()
        scorer = scorers[PROTOCOL.spec(entry.name).instruction]
        begun = time.time()
        extractions = adapted_extractions(eval_set, scorer, {q: dataclasses.replace(r, adapter=None)
                                                             for q, r in routes.items()})
        seconds_base = time.time() - begun
        adapted = adapted_extractions(eval_set, scorer, routes)
        seconds_adapted = time.time() - begun - seconds_base
        runs = {
            "BM25": first_stage_run(eval_set),
            "routed, no adapter": run_with_heads(extractions, {q: r.heads for q, r in routes.items()}),
            "routed + adapter": run_with_heads(adapted, {q: r.heads for q, r in routes.items()}),
            "shipped, no adapter": fused_run(extractions, routes, first_stage),
            "shipped + adapter": fused_run(adapted, routes, first_stage),
        }
        values = {label: per_query(run, qrels, "nDCG@10", qids=qids) for label, run in runs.items()}
        means = {label: statistics.mean(v[q] for q in qids) for label, v in values.items()}
        shipped = [values["shipped + adapter"][q] for q in qids]
        p_values = {
            "vs BM25": paired_randomization_test(shipped, [values["BM25"][q] for q in qids]),
            "vs shipped, no adapter": paired_randomization_test(shipped, [values["shipped, no adapter"][q] for q in qids]),
            "routed: adapter vs none": paired_randomization_test([values["routed + adapter"][q] for q in qids],
                                                                 [values["routed, no adapter"][q] for q in qids]),
        }
        for key, chosen in (("adapter", adapted), ("base", extractions)):
            p, y = shipped_probabilities(eval_set, chosen, routes, first_stage)
            pairs[key][0].append(p)
            pairs[key][1].append(y)
        recorded = reference_of.get(entry.name, {}) if args.max_queries is None else {}
        check = {ours: means[ours] - recorded[theirs] for ours, theirs in
                 (("routed, no adapter", "RouteHead (paper)"), ("shipped, no adapter", "RouteHead")) if theirs in recorded}
        rows.append({"dataset": entry.name, "role": entry.role.value, "queries": len(qids), "ndcg@10": means,
                     "static (routehead.json)": static_of.get(entry.name), "p": p_values,
                     "no adapter minus routehead.json": check,
                     "seconds_scoring": {"base": round(seconds_base), "adapter": round(seconds_adapted)}})
        console.print(entry.name, {k: round(v, 4) for k, v in means.items()}, p_values)
    averages = {}
    for label, role in (("all test sets", None), ("cross-domain", Role.CROSS_DOMAIN_TEST.value)):
        chosen = [r for r in rows if role is None or r["role"] == role]
        averages[label] = {name: statistics.mean(r["ndcg@10"][name] for r in chosen) for name in ROWS}
        averages[label]["static"] = statistics.mean(r["static (routehead.json)"] for r in chosen)
    calibration = {key: expected_calibration_error(torch.cat(p), torch.cat(y)) for key, (p, y) in pairs.items()}
    speed = latency(backbone, args.router, prepare_set("trec-dl-2020", role=Role.CROSS_DOMAIN_TEST), args.latency_queries)
    config = strategy.config
    result = {
        "benchmark": "adapter", "dtype": args.dtype, "router": portable_path(args.router), "command": config.command,
        "adapter": config.query_adapter.model_dump(mode="json"), "adapter_training": config.training.get("adapter"),
        "adapter_sha256": config.files["adapter_model.safetensors"].sha256,
        "test": rows, "average": averages, "test_ece": calibration, "latency": speed, "machine": machine(),
        "seconds": round(time.time() - started),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "adapter.md", sys.argv[1:])
    plot(result, args.out / "adapter.png")
    console.print((args.out / "adapter.md").read_text())
    return 0


def write_markdown(result, path: Path, argv) -> None:
    adapter, training = result["adapter"], result["adapter_training"] or {}
    lines = [
        "# Query-side adapter on the protocol test sets", "",
        f"The shipped router (`{result['router']}`) with its query-side LoRA adapter (rank {adapter['rank']}, layers "
        f"{adapter['layers'][0]}-{adapter['layers'][-1]}, {len(adapter['targets'])} projections per layer; trained on "
        f"{training.get('train_queries')} fit-train queries, epoch {training.get('chosen_epoch')} chosen on "
        f"{training.get('dev_queries')} fit-dev queries: dev nDCG@10 {training.get('base_dev_ndcg@10', 0):.4f} without, "
        f"{training.get('dev_ndcg@10', 0):.4f} with) against the same router without it. nDCG@10, {result['dtype']}, first 20 "
        "candidates. *Routed*: the routed heads' attention alone; *shipped*: fused with the first stage as shipped. "
        "Static: the best static heads chosen on the fit splits (`routehead.json`). p: paired randomization test.", "",
        "| set | queries | BM25 | static | routed, no adapter | routed + adapter | shipped, no adapter | shipped + adapter "
        "| p vs BM25 | p vs no adapter (shipped) | p routed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["test"]:
        v, p = row["ndcg@10"], row["p"]
        lines.append(f"| {row['dataset']} ({row['role']}) | {row['queries']} | {v['BM25']:.3f} | "
                     f"{row['static (routehead.json)']:.3f} | {v['routed, no adapter']:.3f} | {v['routed + adapter']:.3f} | "
                     f"{v['shipped, no adapter']:.3f} | **{v['shipped + adapter']:.3f}** | {p['vs BM25']:.3f} | "
                     f"{p['vs shipped, no adapter']:.3f} | {p['routed: adapter vs none']:.3f} |")
    for label, v in result["average"].items():
        lines.append(f"| **average, {label}** | | {v['BM25']:.3f} | {v['static']:.3f} | {v['routed, no adapter']:.3f} | "
                     f"{v['routed + adapter']:.3f} | {v['shipped, no adapter']:.3f} | **{v['shipped + adapter']:.3f}** | | | |")
    speed = result["latency"]
    lines += [
        "", f"Latency ({speed['dataset']}, {speed['queries']} queries, `rank` interleaved): "
        f"{speed['median_seconds']['adapter on']:.3f} s with the adapter, {speed['median_seconds']['adapter off']:.3f} s "
        f"without; median per-query ratio **{speed['median_ratio']:.3f}x** (goal: under 1.10x).",
        f"Calibration (expected calibration error over every test pair, the shipped probabilities): "
        f"{result['test_ece']['adapter']:.4f} with the adapter, {result['test_ece']['base']:.4f} without (the same "
        "calibration map, fitted on the adapter's dev scores).",
        "Check: the rows without the adapter, scored live here, minus the same rows of `routehead.json` (from the "
        "cached all-heads extraction): largest absolute difference "
        f"{max((abs(d) for r in result['test'] for d in r['no adapter minus routehead.json'].values()), default=0):.4f}.",
        "Scoring time per set (routed heads, live; seconds, base / adapter): "
        + ", ".join(f"{r['dataset']} {r['seconds_scoring']['base']} / {r['seconds_scoring']['adapter']}"
                    for r in result["test"]) + ".",
        "", machine_line(result), "",
        f"Produced by `python benchmarks/adapter.py {' '.join(argv)}` in {result['seconds']} s; the router by "
        f"`{result['command']}`.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(result, path: Path) -> None:
    """Per-set nDCG@10: BM25, the shipped router without and with its adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["dataset"] for row in result["test"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.27
    for offset, label in enumerate(("BM25", "shipped, no adapter", "shipped + adapter")):
        ax.bar([i + (offset - 1) * width for i in range(len(names))],
               [row["ndcg@10"][label] for row in result["test"]], width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test nDCG@10")
    ax.set_title("query-side adapter: protocol test sets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
