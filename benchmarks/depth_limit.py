"""How shallow can routing go on the embedded backbone? Dev nDCG@10 against the deepest layer routed to.

The scale issue's goal was routed latency <= 0.5x all heads within half a dev point of the
unconstrained router; latency follows the deepest routed layer (the forward pass stops there). This
script holds the shipped router fixed and, on the fit's own dev queries (the router's split):

* extends its depth-cost grid far past what ``fit`` tries (costs up to 256), and
* caps the layers heads may come from (top-k among heads of layers <= cap), for the router and for
  static heads chosen on the train queries under the same cap,

reporting dev nDCG@10 and the mean deepest routed layer of each, so the speed that quality allows on
this backbone is read off the data rather than assumed.

    python benchmarks/depth_limit.py

Writes benchmarks/results/depth_limit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, backbone_source, console, machine, machine_line, seeded

from routehead_rag.data.protocol import PROTOCOL
from routehead_rag.engine.embedding import embed_query
from routehead_rag.fit.labelled import single_head_quality
from routehead_rag.fit.pipeline import extract_sources
from routehead_rag.fit.sources import sources_from_arguments
from routehead_rag.fit.training import split_train_dev
from routehead_rag.measures import batched_ndcg
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir, portable_path
from routehead_rag.router.artifact import SHIPPED_ROUTERS, load_artifact

COSTS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), gemma3-270m (see common.backbone_source), a folder or a .gguf")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="depth_limit", help="file stem of the results (default: depth_limit)")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone(backbone_source(args.model), dtype=args.dtype)
    router, config = load_artifact(args.router, backbone.fingerprint())
    storage = config.training.get("storage_dtype", "float32")
    sources = sources_from_arguments([d["name"] for d in config.data], PROTOCOL.top_k, None, "auto")
    pooled = extract_sources(backbone, sources, config.scoring, args.cache_dir or default_cache_dir(),
                             storage_dtype=storage)
    data = pooled.labelled_set()
    embeddings = torch.stack([embed_query(backbone, pooled.texts[q], config.query_embedding) for q in data.qids])
    train, dev = split_train_dev(len(data.qids), config.training["dev_fraction"], config.training["seed"])
    with torch.no_grad():
        logits = router(embeddings[dev]).double()  # [dev, head]
    k = config.selection.k
    layer_of = torch.arange(data.num_layers).repeat_interleave(data.num_heads)  # [head]

    def scored(selection: torch.Tensor) -> tuple[float, float]:
        top = selection.topk(k, dim=1).indices  # [dev, k]
        ndcg = batched_ndcg(data.sum_heads(top, dev), data.gains[dev], data.valid[dev], data.ideal_dcg[dev])
        return float(ndcg.mean()), float(layer_of[top].max(dim=1).values.double().mean())

    costs = []
    for cost in COSTS:
        ndcg, deepest = scored(router.selection_logits(logits, float(cost)))
        costs.append({"depth_cost": cost, "dev_ndcg@10": ndcg, "mean_deepest_layer": deepest})
        console.print(costs[-1])
    quality = single_head_quality(data, rows=train)  # [head] on train, for the static heads
    caps = []
    for cap in range(4, data.num_layers, max(1, data.num_layers // 15)):  # every layer on an 18-layer model
        allowed = layer_of <= cap
        ndcg, deepest = scored(logits.masked_fill(~allowed[None, :], float("-inf")))
        static = quality.masked_fill(~allowed, float("-inf")).topk(k).indices
        static_ndcg = batched_ndcg(data.sum_heads(static.expand(len(dev), -1), dev), data.gains[dev], data.valid[dev],
                                   data.ideal_dcg[dev])
        caps.append({"cap": cap, "dev_ndcg@10": ndcg, "mean_deepest_layer": deepest,
                     "static_dev_ndcg@10": float(static_ndcg.mean()), "layer_share": (deepest + 1) / data.num_layers})
        console.print(caps[-1])
    unconstrained = costs[0]["dev_ndcg@10"]
    within = [c for c in caps if c["dev_ndcg@10"] >= unconstrained - 0.005]
    result = {
        "benchmark": "depth_limit", "model": args.model, "dtype": args.dtype, "router": portable_path(args.router),
        "k": k, "dev_queries": len(dev), "num_layers": data.num_layers, "storage_dtype": storage,
        "costs": costs, "caps": caps, "unconstrained_dev_ndcg@10": unconstrained,
        "shallowest_cap_within_half_a_point": min(within, key=lambda c: c["cap"]) if within else None,
        "seconds": round(time.time() - started, 1), "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    best = result["shallowest_cap_within_half_a_point"]
    lines = [
        f"# How shallow can routing go? ({args.model}, {args.dtype}, k = {k}, {len(dev)} fit dev queries)", "",
        f"The router `{portable_path(args.router)}`, held fixed, on its own dev split. Latency follows the deepest routed layer (the forward "
        f"pass stops there; {data.num_layers} layers). Unconstrained dev nDCG@10: {unconstrained:.4f}.", "",
        f"Depth cost (a logit penalty `cost * layer / (layers - 1)`; the fit tried {sorted(config.training.get('depth_costs', []))}):", "",
        "| depth cost | dev nDCG@10 | vs no cost (points) | mean deepest layer |", "|---|---|---|---|",
        *[f"| {c['depth_cost']} | {c['dev_ndcg@10']:.4f} | {100 * (c['dev_ndcg@10'] - unconstrained):+.1f} | "
          f"{c['mean_deepest_layer']:.1f} |" for c in costs],
        "", "Hard layer cap (top-k among heads of layers <= cap; static: the k best train heads under the same cap):", "",
        "| cap | routed dev nDCG@10 | vs no cap (points) | mean deepest layer | share of layers run | static dev nDCG@10 |",
        "|---|---|---|---|---|---|",
        *[f"| {c['cap']} | {c['dev_ndcg@10']:.4f} | {100 * (c['dev_ndcg@10'] - unconstrained):+.1f} | "
          f"{c['mean_deepest_layer']:.1f} | {c['layer_share']:.2f} | {c['static_dev_ndcg@10']:.4f} |" for c in caps],
        "",
        (f"Shallowest cap within half a point of no cap: layer {best['cap']} (mean deepest {best['mean_deepest_layer']:.1f}, "
         f"{best['layer_share']:.0%} of the layers run)." if best else "No cap stays within half a point of no cap."),
        "", machine_line(result), "",
        f"Produced by `python benchmarks/depth_limit.py {' '.join(sys.argv[1:])}` in {result['seconds']:.0f} s.",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
