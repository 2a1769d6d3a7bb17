"""Depth cost: the speed-quality curve of routing queries to shallower heads.

The forward pass stops after a query's deepest routed layer, so routing to shallower heads that are
as good is speed for free. ``routehead-rag fit`` tries a grid of depth costs (a logit penalty
``cost * layer / (num_layers - 1)`` at selection, :class:`routehead_rag.router.model.SelectionConfig`)
and keeps the one that runs the fewest layers on dev within half a point of no cost. For every cost of
that grid this script reports, with the router held fixed:

* dev nDCG@10 and the mean deepest routed layer (from the fit, recorded in the artifact);
* test nDCG@10 on every protocol test set, routed heads alone and the shipped fused configuration
  (same cached extractions as ``routehead.py``);
* latency on trec-dl-2020 (median seconds per query of ``rank``, routing included) against all-heads
  ranking with the same engine, and routed scoring against its floor: plain forward passes of the
  passages through the deepest routed layer into a KV cache and of the two query parts on it, no
  capture (see ``throughput.py``).

    python benchmarks/depth_curve.py --dtype bfloat16

Writes benchmarks/results/depth_curve.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import (
    RESULTS,
    backbone_source,
    console,
    load_set,
    machine,
    machine_line,
    ndcg,
    scorers_by_instruction,
    seeded,
)
from throughput import floor_with_suffixes_seconds, timed

from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.engine.embedding import embed_query
from routehead_rag.eval.harness import fused_run, run_with_heads
from routehead_rag.eval.metrics import paired_randomization_test, per_query
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir, portable_path
from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.router.artifact import SHIPPED_ROUTERS
from routehead_rag.strategy import RoutedHeads


def with_cost(routed: RoutedHeads, cost: float) -> RoutedHeads:
    """The same router and artifact, selecting with depth cost ``cost``."""
    config = routed.config.model_copy(update={"selection": routed.config.selection.model_copy(update={"depth_cost": cost})})
    return RoutedHeads(routed.folder, config, routed.router)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["curve"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = [r["latency_vs_all_heads"] for r in rows]
    for label, key in (("dev (fit)", "dev_ndcg@10"), ("test, routed heads", "test_routed_ndcg@10"),
                       ("test, shipped (fused)", "test_shipped_ndcg@10")):
        left.plot(x, [r[key] for r in rows], marker="o", label=label)
    for r in rows:
        left.annotate(f"{r['depth_cost']:g}", (r["latency_vs_all_heads"], r["dev_ndcg@10"]), fontsize=7)
    left.axvline(0.5, linestyle=":", color="grey")
    left.set_xlabel("routed latency / all-heads latency")
    left.set_ylabel("nDCG@10 (mean over sets)")
    left.legend(fontsize=7)
    left.set_title("speed-quality, labels: depth cost")
    right.plot([r["depth_cost"] for r in rows], [r["test_mean_deepest_layer"] for r in rows], marker="o", label="test")
    right.plot([r["depth_cost"] for r in rows], [r["dev_mean_deepest_layer"] for r in rows], marker="o", label="dev")
    right.set_xscale("symlog", linthresh=0.5)
    right.set_xlabel("depth cost")
    right.set_ylabel("mean deepest routed layer")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="default: $ROUTEHEAD_DATA or ../shared/data")
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), gemma3-270m (see common.backbone_source), a folder or a .gguf")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--speed-queries", type=int, default=20, help="trec-dl-2020 queries timed per cost")
    parser.add_argument("--test-max-queries", type=int, default=None, help="cap each test split (smoke runs only)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="depth_curve", help="file stem of the results (default: depth_curve)")
    args = parser.parse_args()

    seeded()
    started = time.time()
    cache_dir = args.cache_dir or default_cache_dir()
    backbone = load_backbone(backbone_source(args.model), dtype=args.dtype)
    scorers = scorers_by_instruction(backbone)
    routed = RoutedHeads.from_folder(args.router).resolve(backbone)
    config = routed.config
    dev_curve = {row["depth_cost"]: row for row in config.training.get("depth_curve", [])}
    if not dev_curve:
        raise SystemExit(f"{args.router} records no depth curve: refit it with a routehead-rag that has --depth-cost")

    sets = {}
    for entry in PROTOCOL.entries_for(Role.IN_DOMAIN_TEST) + PROTOCOL.entries_for(Role.CROSS_DOMAIN_TEST):
        eval_set, extractions = load_set(entry.name, entry.role, args.data_dir, args.test_max_queries, scorers, cache_dir)
        embeddings = {q: embed_query(backbone, eval_set.dataset.queries[q], config.query_embedding) for q in eval_set.qids}
        sets[entry.name] = (eval_set, extractions, embeddings)

    speed_set, _, _ = sets["trec-dl-2020"]
    inputs = [(speed_set.dataset.queries[q], speed_set.passages(q)) for q in speed_set.qids[: args.speed_queries]]
    all_heads = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads="all", prompt=config.scoring.prompt)
    all_heads.rank(*inputs[0])  # warm-up
    all_seconds = statistics.median(timed(lambda: all_heads.rank(q, p)) for q, p in inputs)

    curve = []
    if 0.0 not in dev_curve:
        raise SystemExit(f"{args.router}'s depth curve has no cost 0 to compare against: refit it")
    for cost in sorted(dev_curve):
        costed = with_cost(routed, cost)  # the same loaded router, selecting with this cost
        tests, depths, values = {}, [], {"routed": {}, "shipped": {}}  # values: per test query, keyed "set/qid"
        for name, (eval_set, extractions, embeddings) in sets.items():
            routes = {q: costed.route_embedding(e) for q, e in embeddings.items()}
            runs = {"routed": run_with_heads(extractions, {q: r.heads for q, r in routes.items()}),
                    "shipped": fused_run(extractions, routes, eval_set.first_stage_order())}
            tests[name] = {label: ndcg(eval_set, run) for label, run in runs.items()}
            for label, run in runs.items():
                scored = per_query(run, eval_set.dataset.qrels, "nDCG@10", qids=eval_set.qids)
                values[label].update({f"{name}/{q}": scored[q] for q in eval_set.qids})
            depths += [max(h.layer for h in r.heads) for r in routes.values()]
        if not curve:
            unconstrained = values  # the first cost is 0: what every other cost is tested against
        keys = sorted(unconstrained["shipped"])
        paired = {label: paired_randomization_test([values[label][k] for k in keys], [unconstrained[label][k] for k in keys])
                  for label in values}
        reranker = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=costed)
        reranker.rank(*inputs[0])
        seconds, floors = [], []
        for query, passages in inputs:
            seconds.append(timed(lambda: reranker.rank(query, passages)))
            deepest = max(h.layer for h in reranker.heads_for(query))
            floors.append(seconds[-1] / floor_with_suffixes_seconds(backbone, reranker, query, passages, deepest))
        row = {
            "depth_cost": cost, "chosen": cost == config.selection.depth_cost,
            "dev_ndcg@10": dev_curve[cost]["dev_ndcg@10"], "dev_mean_deepest_layer": dev_curve[cost]["mean_deepest_layer"],
            "test_routed_ndcg@10": statistics.mean(t["routed"] for t in tests.values()),
            "test_shipped_ndcg@10": statistics.mean(t["shipped"] for t in tests.values()),
            "test_mean_deepest_layer": statistics.mean(depths),
            "median_seconds": statistics.median(seconds), "latency_vs_all_heads": statistics.median(seconds) / all_seconds,
            "routed_vs_floor": statistics.median(floors), "per_set": tests,
            "test_queries": len(keys), "p_routed_vs_no_cost": paired["routed"], "p_shipped_vs_no_cost": paired["shipped"],
        }
        curve.append(row)
        console.print({k: v for k, v in row.items() if k != "per_set"})

    result = {
        "benchmark": "depth_curve", "model": args.model, "dtype": args.dtype, "router": portable_path(args.router),
        "k": config.selection.k, "depth_tolerance": config.training.get("depth_tolerance"),
        "speed": {"dataset": "trec-dl-2020", "queries": len(inputs), "all_heads_median_seconds": all_seconds},
        "curve": curve, "num_layers": backbone.num_layers, "seconds": round(time.time() - started), "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Depth cost: speed against quality ({args.model}, {args.dtype}, k = {config.selection.k})", "",
        "Each row routes with the same fitted router and a different depth cost (a logit penalty "
        "`cost * layer / (num_layers - 1)`); the fit chose the marked one on dev (the fewest layers run within "
        f"{100 * (result['depth_tolerance'] or 0):g} points of no cost). nDCG@10: dev is the fit's held-out fit "
        "queries; test is the mean over the protocol's 7 test sets, p a paired randomization test against cost 0 over all "
        f"{curve[0]['test_queries']} test queries pooled. Latency: median seconds per trec-dl-2020 query "
        f"({len(inputs)} queries, routing included) against all heads with the same engine ({all_seconds:.3f} s); "
        f"floor: plain forward passes through the deepest routed layer of the passages into a KV cache and of the two query parts on it. {backbone.num_layers} layers.", "",
        "| depth cost | dev nDCG@10 | dev mean deepest layer | test nDCG@10, routed heads (p vs cost 0) "
        "| test nDCG@10, shipped (fused) (p vs cost 0) | test mean deepest layer | s / query | vs all heads | vs floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in curve:
        lines.append(
            f"| {r['depth_cost']:g}{' (chosen)' if r['chosen'] else ''} | {r['dev_ndcg@10']:.4f} | {r['dev_mean_deepest_layer']:.1f} | "
            f"{r['test_routed_ndcg@10']:.4f} ({r['p_routed_vs_no_cost']:.3f}) | {r['test_shipped_ndcg@10']:.4f} "
            f"({r['p_shipped_vs_no_cost']:.3f}) | {r['test_mean_deepest_layer']:.1f} | "
            f"{r['median_seconds']:.3f} | {r['latency_vs_all_heads']:.2f}x | {r['routed_vs_floor']:.2f}x |"
        )
    lines += ["", machine_line(result), "", f"Produced by `python benchmarks/depth_curve.py {' '.join(sys.argv[1:])}` "
              f"in {result['seconds']} s.", "", f"![depth curve]({args.name}.png)"]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(result, args.out / f"{args.name}.png")
    console.print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
