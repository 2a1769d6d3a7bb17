"""Does refitting the router on extractions made *with* the shipped query adapter help on dev?

The shipped router was fitted on the base model's extractions, and its query adapter was then
trained for that router's routes. The issue asks whether the router should be refitted on
extractions made with the adapter on. This runs that refit with the shipped fit's own settings
(``run_fit(..., extraction_adapter=...)``: same sources, scoring, search grid, training settings and
seed, so the same train/dev split), and scores on the fit's dev queries, all on the same adapted
extractions and with ir_measures' nDCG@10 (the router's dev metric):

- the shipped router with its adapter (what ships today),
- the refitted router with the same adapter,

each fused with the first stage as its fit chose, and each routed heads alone; paired
randomization test between the two. Nothing here touches the protocol's test sets.

    python benchmarks/adapter_router_refit.py --dtype bfloat16

Writes benchmarks/results/adapter_router_refit.{json,md}; the refitted artifact goes to a temporary
folder (``--keep`` to keep it under ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, console, machine, machine_line, seeded

from routehead_rag.eval.harness import fused_run
from routehead_rag.eval.metrics import paired_randomization_test, per_query
from routehead_rag.fit.pipeline import extract_sources, run_fit
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import sources_from_arguments
from routehead_rag.fit.training import TrainingConfig, split_train_dev
from routehead_rag.model.backbone import load_backbone
from routehead_rag.offline.extraction import QueryExtraction
from routehead_rag.paths import default_cache_dir, portable_path
from routehead_rag.router.artifact import SHIPPED_ROUTERS
from routehead_rag.strategy import RoutedHeads


def dev_values(routes, pooled, keys, fused: bool) -> dict[str, float]:
    """Per dev query nDCG@10 of ``routes`` over the pooled (adapted) extractions (``fused_run`` reads
    only the calibrated scores, which is all the pool keeps)."""
    extractions = {k: QueryExtraction(k, pooled.doc_ids[k], pooled.scores[k].float(), pooled.scores[k].float())
                   for k in keys}
    chosen = routes if fused else {k: dataclasses.replace(r, fusion_weight=None) for k, r in routes.items()}
    run = fused_run(extractions, chosen, pooled.first_stage)
    return per_query(run, {k: pooled.qrels[k] for k in keys}, "nDCG@10", qids=keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--max-queries", type=int, default=None, help="first N fit queries per source (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the refitted artifact in OUT/adapter_router_refit")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    shipped = RoutedHeads.from_folder(args.router).resolve(backbone)
    config = shipped.config
    if shipped.adapter is None:
        console.print(f"{args.router} has no query adapter: nothing to refit for")
        return 1
    sources = sources_from_arguments([d["name"] for d in config.data], 20, args.max_queries)
    searches = [SearchConfig.model_validate_json(json.dumps({k: row[k] for k in SearchConfig.model_fields if k in row}))
                for row in config.search["grid"]]  # the shipped fit's grid, as its command gave it
    training = TrainingConfig.model_validate_json(json.dumps(
        {k: config.training[k] for k in TrainingConfig.model_fields if k in config.training}))
    cache = default_cache_dir()
    folder = Path(tempfile.mkdtemp(prefix="refit-"))
    try:
        result = run_fit(backbone, sources, folder / "router", scoring=config.scoring,
                         query_embedding=config.query_embedding, search=searches, training=training, cache_dir=cache,
                         command="benchmarks/adapter_router_refit.py", report_dir=folder,
                         storage_dtype=config.training["storage_dtype"], extraction_adapter=shipped.adapter)
        refitted = RoutedHeads.from_folder(result.artifact).resolve(backbone)
        pooled = extract_sources(backbone, sources, config.scoring, cache, query_adapter=shipped.adapter,
                                 storage_dtype=config.training["storage_dtype"])  # the cache the refit wrote
        data = pooled.labelled_set()
        _, dev_rows = split_train_dev(len(data.qids), training.dev_fraction, training.seed)
        keys = [data.qids[int(r)] for r in dev_rows]
        routes = {name: {k: strategy.route(backbone, pooled.texts[k]) for k in keys}  # one routing pass each
                  for name, strategy in (("shipped router", shipped), ("refitted router", refitted))}
        values = {f"{name}, {'fused' if fused else 'routed heads alone'}": dev_values(routes[name], pooled, keys, fused)
                  for name in routes for fused in (True, False)}
        means = {label: statistics.mean(v[k] for k in keys) for label, v in values.items()}
        p = {kind: paired_randomization_test([values[f"refitted router, {kind}"][k] for k in keys],
                                             [values[f"shipped router, {kind}"][k] for k in keys])
             for kind in ("fused", "routed heads alone")}
        routes_changed = sum(routes["shipped router"][k].heads != routes["refitted router"][k].heads for k in keys)
        record = {
            "benchmark": "adapter_router_refit", "dtype": args.dtype, "router": portable_path(args.router),
            "adapter_sha256": config.files["adapter_model.safetensors"].sha256, "dev_queries": len(keys),
            "fit_queries": len(data.qids), "dev_ndcg@10": means, "p refitted vs shipped": p,
            "dev_queries_with_other_heads": routes_changed,
            "refitted": {"k": result.config.selection.k, "depth_cost": result.config.selection.depth_cost,
                         "fusion": result.config.fusion.model_dump(mode="json"),
                         "dev_metrics": result.config.dev_metrics},
            "shipped_dev_metrics_without_adapter": {k: config.dev_metrics[k] for k in
                                                    ("routed_ndcg@10", "fusion_per_query_ndcg@10")
                                                    if k in config.dev_metrics},
            "max_queries": args.max_queries, "machine": machine(), "seconds": round(time.time() - started),
        }
        if args.keep:
            shutil.copytree(result.artifact, args.out / "adapter_router_refit", dirs_exist_ok=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_router_refit.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record, args.out / "adapter_router_refit.md", sys.argv[1:])
    console.print((args.out / "adapter_router_refit.md").read_text())
    return 0


def write_markdown(record, path: Path, argv) -> None:
    m, p = record["dev_ndcg@10"], record["p refitted vs shipped"]
    shipped = record["shipped_dev_metrics_without_adapter"]
    lines = [
        "# Refitting the router on extractions made with the query adapter (fit dev)", "",
        f"The shipped router and a router refitted with the shipped fit's settings on extractions made with the shipped "
        f"query adapter on, both scored with that adapter on the same {record['dev_queries']} fit-dev queries "
        f"(of {record['fit_queries']}; ir_measures nDCG@10, {record['dtype']}). p: paired randomization test, "
        "refitted vs shipped.", "",
        "| router | fused with the first stage | routed heads alone |",
        "|---|---|---|",
        f"| shipped (fitted on base extractions) | {m['shipped router, fused']:.4f} | {m['shipped router, routed heads alone']:.4f} |",
        f"| refitted on adapted extractions | {m['refitted router, fused']:.4f} | {m['refitted router, routed heads alone']:.4f} |",
        f"| p | {p['fused']:.3f} | {p['routed heads alone']:.3f} |", "",
        f"The refitted router picks other heads for {record['dev_queries_with_other_heads']} of the "
        f"{record['dev_queries']} dev queries (k = {record['refitted']['k']}, depth cost "
        f"{record['refitted']['depth_cost']:g}, fusion {record['refitted']['fusion']['mode']}).",
        "Both routers were chosen on these dev queries (grid, epochs, depth cost and fusion, as `fit` chooses), the "
        "refitted one on the adapted scores: this is the choice `fit` would make, not a held-out estimate.",
        *(["For scale, the shipped router without its adapter, from its fit record (base extractions, same dev "
           "queries): " + ", ".join(f"{k} {v:.4f}" for k, v in shipped.items()) + "."]
          if record["max_queries"] is None else []),
        "", machine_line(record), "",
        f"Produced by `python benchmarks/adapter_router_refit.py {' '.join(argv)}` in {record['seconds']} s.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
