"""Extraction storage precision: does keeping the fit's extractions in float16 change the fit?

``routehead-rag fit`` keeps its extraction cache and its labelled set in float16 by default
(``--storage-dtype``). This script fits the shipped router's configuration twice from the same
cached extractions, once kept in float32 and once rounded to float16, and compares:

* the fit's own dev metrics (routed, fused, calibration) and the chosen settings;
* test nDCG@10 on every protocol test set (routed heads alone, and the fused default), scored from
  float32 test extractions for both routers (the re-ranker scores in the model's precision; only
  the fit's storage differs), with a paired randomization test of float16 against float32;
* how often the two routers route a test query to the same heads;
* bytes per query on disk (one extraction file of each kind) and in the labelled set.

The float32 fit is also checked against the shipped router: same weights (sha256) means the shipped
artifact is what ``--storage-dtype float32`` reproduces.

    python benchmarks/storage_precision.py

Writes benchmarks/results/storage_precision.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, console, load_set, machine, machine_line, scorers_by_instruction, seeded

from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.engine.embedding import QueryEmbeddingConfig
from routehead_rag.engine.scorer import ScoringConfig
from routehead_rag.eval.harness import fused_run, run_with_heads
from routehead_rag.eval.metrics import paired_randomization_test, per_query
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import sources_from_arguments
from routehead_rag.fit.training import TrainingConfig
from routehead_rag.model.backbone import load_backbone
from routehead_rag.offline.extraction import _atomic_torch_save, _rounded
from routehead_rag.paths import default_cache_dir
from routehead_rag.router.artifact import SHIPPED_ROUTERS, read_artifact_config
from routehead_rag.strategy import RoutedHeads

STORAGES = ("float32", "float16")
NOISE = "float32, seed 1"  # the same fit with another train/dev split and initialisation: what noise looks like
VARIANTS = {"float32": ("float32", 0), "float16": ("float16", 0), NOISE: ("float32", 1)}


def jaccard(a, b) -> float:
    a, b = {str(h) for h in a}, {str(h) for h in b}
    return len(a & b) / len(a | b)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_both(backbone, shipped, cache_dir, workdir: Path) -> dict[str, Path]:
    """The shipped command's fit, once per storage precision (same sources, settings and cache)."""
    names = [d["name"] for d in shipped.data]
    pools = sorted({g["pool_size"] for g in shipped.search["grid"]})
    heads = sorted({g["max_heads"] for g in shipped.search["grid"]})
    searches = [SearchConfig(pool_size=p, max_heads=h) for p, h in itertools.product(pools, heads)]
    folders = {}
    for index, (label, (storage, seed)) in enumerate(VARIANTS.items()):
        sources = sources_from_arguments(names, PROTOCOL.top_k, None, "auto")
        started = time.time()
        result = run_fit(
            backbone, sources, workdir / f"router-{index}", scoring=ScoringConfig().with_instruction("relevance"),
            query_embedding=QueryEmbeddingConfig(layer=backbone.num_layers // 2), search=searches,
            training=TrainingConfig(seed=seed), cache_dir=cache_dir, storage_dtype=storage, report_dir=workdir,
        )
        console.print(label, f"{time.time() - started:.0f} s", result.config.dev_metrics)
        folders[label] = result.artifact
    return folders


def disk_bytes(extraction, workdir: Path) -> dict[str, int]:
    """Bytes of one query's cache file in each precision (the files the cache writes)."""
    sizes = {}
    for storage in STORAGES:
        real, calibrated = _rounded(extraction.real, extraction.content_free, getattr(torch, storage))
        path = workdir / f"{storage}.pt"
        _atomic_torch_save({"qid": extraction.qid, "doc_ids": extraction.doc_ids, "content_sha256": "0" * 64,
                            "real": real, "calibrated": calibrated}, path)
        sizes[storage] = path.stat().st_size
    return sizes


def write_markdown(result: dict, path: Path) -> None:
    dev = result["dev"]
    lines = [
        f"# Fit storage precision: float16 against float32 ({result['model']}, {result['dtype']})",
        "",
        "The shipped router's fit, run from the same cached extractions kept in float32 (the shipped router), rounded "
        "to float16 (`routehead-rag fit --storage-dtype`, default float16), and, as the yardstick of noise, kept in "
        "float32 with another seed (train/dev split and initialisation). Test sets are scored from float32 "
        "extractions for every router; p: paired randomization test against the float32 fit (10,000 sign flips); "
        "overlap: mean Jaccard overlap of a test query's routed heads with the float32 fit's. The seed-1 fit's dev "
        "metrics are on its own dev split, so only its test rows compare.",
        "",
        f"| fit dev metric | {' | '.join(VARIANTS)} |",
        "|---|---|---|---|",
    ]
    for key in dev["float32"]:
        if key.endswith("ndcg@10") or key == "calibration_ece":
            lines.append(f"| {key} | " + " | ".join(f"{dev[v][key]:.4f}" for v in VARIANTS) + " |")
    for key in ("k", "depth_cost", "search"):
        lines.append(f"| chosen {key} | " + " | ".join(str(result["chosen"][v][key]) for v in VARIANTS) + " |")
    lines += ["", "| test set | queries | kind | " + " | ".join(VARIANTS) + " | p float16 | p seed 1 |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result["test"]:
        for kind in ("routed", "fused"):
            lines.append(f"| {row['dataset']} | {row['queries']} | {kind} | "
                         + " | ".join(f"{row[kind][v]:.4f}" for v in VARIANTS)
                         + f" | {row['p'][kind]['float16']:.3f} | {row['p'][kind][NOISE]:.3f} |")
    mean = result["test_mean"]
    for kind in ("routed", "fused"):
        lines.append(f"| **mean** | | {kind} | " + " | ".join(f"{mean[kind][v]:.4f}" for v in VARIANTS) + " | | |")
    lines += [
        "",
        "Routed-head overlap with the float32 fit (test queries): "
        + ", ".join(f"{v} {mean['overlap'][v]:.2f}" for v in VARIANTS if v != "float32") + ".",
        "",
        f"Bytes per query: cache file {result['disk_bytes']['float32']} (float32) against "
        f"{result['disk_bytes']['float16']} (float16), {result['disk_bytes']['float16'] / result['disk_bytes']['float32']:.2f}x; "
        f"labelled set {result['labelled_bytes_per_query']['float64 (before)']} (float64, before) against "
        f"{result['labelled_bytes_per_query']['float16']} (float16, kept in a memory-mapped temporary file).",
        "",
        f"The float32 fit {'reproduces the shipped router bitwise' if result['float32_equals_shipped'] else 'does not reproduce the shipped router bitwise'} "
        f"(router.safetensors sha256).",
        "",
        machine_line(result),
        "",
        f"Produced by `{result['command']}` in {result['seconds']:.0f} s.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="default: $ROUTEHEAD_DATA or ../shared/data")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    seeded()
    started = time.time()
    cache_dir = args.cache_dir or default_cache_dir()
    backbone = load_backbone(args.model, dtype=args.dtype)
    shipped = read_artifact_config(args.router)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folders = fit_both(backbone, shipped, cache_dir, workdir)
        configs = {v: read_artifact_config(folders[v]) for v in VARIANTS}
        equals_shipped = sha256(folders["float32"] / "router.safetensors") == sha256(args.router / "router.safetensors")
        routed = {v: RoutedHeads.from_folder(folders[v]).resolve(backbone) for v in VARIANTS}
        scorers = scorers_by_instruction(backbone)
        rows = []
        sample = None
        for entry in PROTOCOL.entries_for(Role.IN_DOMAIN_TEST) + PROTOCOL.entries_for(Role.CROSS_DOMAIN_TEST):
            eval_set, extractions = load_set(entry.name, entry.role, args.data_dir, None, scorers, cache_dir)
            sample = sample or extractions[eval_set.qids[0]]
            qids, qrels, first_stage = eval_set.qids, eval_set.dataset.qrels, eval_set.first_stage_order()
            routes = {v: {q: routed[v].route(backbone, eval_set.dataset.queries[q]) for q in qids} for v in VARIANTS}
            values = {}
            for v in VARIANTS:
                values[("routed", v)] = per_query(run_with_heads(extractions, {q: r.heads for q, r in routes[v].items()}),
                                                  qrels, "nDCG@10", qids=qids)
                values[("fused", v)] = per_query(fused_run(extractions, routes[v], first_stage), qrels, "nDCG@10", qids=qids)
            row = {"dataset": entry.name, "role": entry.role.value, "queries": len(qids), "p": {}}
            for kind in ("routed", "fused"):
                row[kind] = {v: statistics.mean(values[(kind, v)][q] for q in qids) for v in VARIANTS}
                row["p"][kind] = {v: paired_randomization_test([values[(kind, v)][q] for q in qids],
                                                               [values[(kind, "float32")][q] for q in qids])
                                  for v in VARIANTS if v != "float32"}
            row["overlap"] = {v: statistics.mean(jaccard(routes[v][q].heads, routes["float32"][q].heads) for q in qids)
                              for v in VARIANTS if v != "float32"}
            console.print(row)
            rows.append(row)
        sizes = disk_bytes(sample, workdir)
    heads, width = backbone.num_layers * backbone.num_heads, PROTOCOL.top_k
    result = {
        "benchmark": "storage_precision",
        "model": args.model,
        "dtype": args.dtype,
        "command": "python benchmarks/storage_precision.py",
        "dev": {v: configs[v].dev_metrics for v in VARIANTS},
        "chosen": {v: {"k": configs[v].selection.k, "depth_cost": configs[v].selection.depth_cost,
                       "search": f"K={configs[v].search['pool_size']}, P={configs[v].search['max_heads']}"} for v in VARIANTS},
        "test": rows,
        "test_mean": {
            kind: {v: statistics.mean(r[kind][v] for r in rows) for v in VARIANTS} for kind in ("routed", "fused")
        } | {"overlap": {v: statistics.mean(r["overlap"][v] for r in rows) for v in VARIANTS if v != "float32"}},
        "disk_bytes": sizes,
        "labelled_bytes_per_query": {"float64 (before)": heads * width * 8, "float16": heads * width * 2},
        "float32_equals_shipped": equals_shipped,
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage_precision.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "storage_precision.md")
    console.print(f"wrote {args.out}/storage_precision.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
