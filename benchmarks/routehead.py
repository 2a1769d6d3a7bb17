"""RouteHead benchmark: routed heads against BM25, ICR, static heads and the hindsight oracle.

On the protocol (``../shared/data/README.md``), every attention strategy is scored from the
same cached extraction pass per set, so differences are the head choice alone (so a router's
query-side adapter is not applied here: the extraction is the base model's; ``adapter.py`` scores
the router with its adapter live, against these rows):

* **cross-domain and in-domain test sets** with a router fitted on the mixed fit splits
  (default: the router shipped in the package); static baselines chosen on the same fit
  splits (the artifact's top-k, and the best k by fit nDCG@10); the per-query hindsight
  oracle (head search on the test queries' own labels) as the ceiling; paired randomization
  tests of RouteHead against static;
* **in-domain fits**: beir-scifact train -> test, hotpotqa first 400 -> last 100;
* **label robustness**: head-search margin and pool weight, dev and test effect;
* **speed**: routed vs all-heads ranking with the same engine, the share of the forward
  pass that stopping early saves, the router's own cost; head-search time for 1,000 queries.

    python benchmarks/routehead.py --dtype bfloat16

Writes benchmarks/results/routehead.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    K_GRID,
    RESULTS,
    best_static,
    console,
    load_set,
    machine,
    machine_line,
    ndcg,
    pooled,
    scorers_by_instruction,
    seeded,
    shipped_probabilities,
    static_run,
)

from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.engine.embedding import embed_query
from routehead_rag.engine.scorer import ScoringConfig
from routehead_rag.eval.harness import first_stage_run, fused_run, run_with_heads
from routehead_rag.eval.metrics import paired_randomization_test, per_query
from routehead_rag.fit.labelled import build_labelled_set
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.search import SearchConfig, search_heads
from routehead_rag.fit.sources import beir_source
from routehead_rag.fit.training import TrainingConfig, train_router
from routehead_rag.heads import Head
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir, portable_path
from routehead_rag.reranker import RouteHeadReranker
from routehead_rag.router.artifact import SHIPPED_ROUTERS
from routehead_rag.router.model import SelectionConfig
from routehead_rag.strategy import RoutedHeads

ORACLE = SearchConfig(margin=0.0, pool_weight=0.0)  # hindsight: the best set per query, no robustness terms
ROBUSTNESS_GRID = [(0.0, 0.0), (0.01, 0.0), (0.0, 0.1), (0.01, 0.1), (0.03, 0.1), (0.01, 0.3)]


def oracle_values(eval_set, extractions) -> dict[str, float]:
    """Per-query nDCG@10 of the hindsight head set (queries without a relevant passage: 0)."""
    qids = eval_set.qids
    data = build_labelled_set({q: extractions[q].debiased for q in qids}, {q: extractions[q].doc_ids for q in qids},
                              {q: eval_set.dataset.qrels.get(q, {}) for q in qids})
    found = search_heads(data, ORACLE)
    values = dict.fromkeys(qids, 0.0)
    values.update(zip(found.qids, found.query_ndcg.tolist()))
    return values


PAPER = "RouteHead (paper)"  # hard routed heads, raw attention: the paper's method
DEFAULT = "RouteHead"  # the shipped configuration: + first-stage fusion where the fit chose it


def calibration_on(eval_set, extractions, routes, first_stage) -> dict:
    """Expected calibration error and reliability bins of the default's probabilities on one set."""
    from routehead_rag.fit.fusion_fit import expected_calibration_error, reliability

    pairs = shipped_probabilities(eval_set, extractions, routes, first_stage)
    if pairs is None:
        return {}
    p, y = pairs
    return {"ece": expected_calibration_error(p, y), "reliability": reliability(p, y), "pairs": len(y)}


def score_set(name, role, eval_set, extractions, runs_heads, backbone, routed: RoutedHeads):
    """Per-query nDCG@10 of every strategy on one set, plus p-values of RouteHead vs BM25 and vs static."""
    qids, qrels = eval_set.qids, eval_set.dataset.qrels
    routes = {q: routed.route(backbone, eval_set.dataset.queries[q]) for q in qids}
    first_stage = eval_set.first_stage_order()
    runs = {
        "BM25": first_stage_run(eval_set),
        "ICR (all heads)": static_run(extractions, None),
        **{label: static_run(extractions, heads) for label, heads in runs_heads.items()},
        PAPER: run_with_heads(extractions, {q: r.heads for q, r in routes.items()}),
        DEFAULT: fused_run(extractions, routes, first_stage),
    }
    values = {label: per_query(run, qrels, "nDCG@10", qids=qids) for label, run in runs.items()}
    values["oracle (hindsight)"] = oracle_values(eval_set, extractions)
    means = {label: statistics.mean(v[q] for q in qids) for label, v in values.items()}
    p_values = {
        label: paired_randomization_test([values[DEFAULT][q] for q in qids], [values[label][q] for q in qids])
        for label in [*runs_heads, "BM25", PAPER]
    }
    depth = statistics.mean(max(h.layer for h in routes[q].heads) + 1 for q in qids)
    console.print(name, {k: round(v, 4) for k, v in means.items()}, p_values)
    return {"dataset": name, "role": role, "queries": len(qids), "ndcg@10": means, "p_routed_vs": p_values,
            "mean_routed_depth": depth, "calibration": calibration_on(eval_set, extractions, routes, first_stage),
            "per_query": values}


def in_domain_fit(name, test_entry, backbone, scorers, args, cache_dir, workdir):
    """Fit a router on one domain's fit split and test it on the same domain's test split."""
    source = beir_source(name, PROTOCOL.top_k, max_queries=args.fit_max_queries, data_dir=args.data_dir)
    fitted = run_fit(
        backbone, [source], workdir / f"router-{name}", scoring=ScoringConfig().with_instruction("relevance"),
        search=[SearchConfig(pool_size=k, max_heads=p) for k in (32, 64) for p in (4, 8)], cache_dir=cache_dir,
        storage_dtype="float32",  # as the shipped router was fitted (storage_precision.md compares float16)
    )
    routed = RoutedHeads.from_folder(fitted.artifact).resolve(backbone)
    config = routed.config
    fit_set = {name: load_set(name, Role.FIT, args.data_dir, args.fit_max_queries, scorers, cache_dir)}
    k, static, _ = best_static(fit_set, K_GRID)
    eval_set, extractions = load_set(name, Role(test_entry), args.data_dir, args.test_max_queries, scorers, cache_dir)
    heads = {f"static top-{config.selection.k} (same fit)": [Head.parse(h) for h in config.static_heads],
             f"static top-{k} (k chosen on fit)": static}
    row = score_set(name, test_entry, eval_set, extractions, heads, backbone, routed)
    row["router"] = {"k": config.selection.k, "search": {x: config.search[x] for x in ("pool_size", "max_heads")},
                     "dev_metrics": config.dev_metrics, "fit_queries": len(source.queries)}
    return row


def label_robustness(fit_sets, backbone, router_config, test_rows_sets):
    """Head-search margin / pool weight: dev nDCG@10 of the routed aggregation, and the cross-domain test mean."""
    pool = pooled(fit_sets)
    data = pool.labelled_set()
    embeddings = torch.stack([embed_query(backbone, pool.texts[q], router_config.query_embedding) for q in data.qids])
    test_embeddings = {
        name: {q: embed_query(backbone, s.dataset.queries[q], router_config.query_embedding) for q in s.qids}
        for name, (s, _) in test_rows_sets.items()
    }
    rows = []
    base = SearchConfig(**{k: v for k, v in router_config.search.items() if k != "grid"})
    for margin, pool_weight in ROBUSTNESS_GRID:
        setting = base.model_copy(update={"margin": margin, "pool_weight": pool_weight})
        found = search_heads(data, setting)
        trained = train_router(embeddings, found.labels, data, TrainingConfig())
        test = {}
        for name, (eval_set, extractions) in test_rows_sets.items():
            selection = SelectionConfig(k=trained.k, max_heads=trained.k)
            heads_of = {q: trained.router.select(test_embeddings[name][q], selection) for q in eval_set.qids}
            test[name] = ndcg(eval_set, run_with_heads(extractions, heads_of))
        rows.append({"margin": margin, "pool_weight": pool_weight, "mean_label_size": float(found.labels.float().sum(1).mean()),
                     "label_ndcg": float(found.query_ndcg.mean()), "k": trained.k, "dev_routed": trained.dev_ndcg,
                     "dev_static": trained.dev_static_ndcg, "test": test, "test_mean": statistics.mean(test.values())})
        console.print(rows[-1])
    return rows


def speed(backbone, router_dir, eval_set, qids):
    """Seconds per query: routed (embedding + routing + scoring) vs all heads vs static, same engine, same inputs."""
    routed = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads=router_dir)
    config = routed.strategy.config
    all_heads = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer, heads="all", prompt=config.scoring.prompt)
    static = RouteHeadReranker(model=backbone.model, tokenizer=backbone.tokenizer,
                               heads=config.static_heads, prompt=config.scoring.prompt)
    inputs = [(eval_set.dataset.queries[q], eval_set.passages(q)) for q in qids]
    for reranker in (routed, all_heads, static):  # warm-up
        reranker.rank(*inputs[0])
    times = {"all heads": [], "static (artifact heads)": [], "routed": [], "routing only": []}
    saved = []
    for query, passages in inputs:
        for label, reranker in (("all heads", all_heads), ("static (artifact heads)", static), ("routed", routed)):
            start = time.perf_counter()
            reranker.rank(query, passages)
            times[label].append(time.perf_counter() - start)
        start = time.perf_counter()
        heads = routed.heads_for(query)
        times["routing only"].append(time.perf_counter() - start)
        saved.append(1 - (max(h.layer for h in heads) + 1) / backbone.num_layers)
    medians = {label: statistics.median(v) for label, v in times.items()}
    return {
        "queries": len(inputs), "dataset": eval_set.name, "median_seconds": medians,
        "routed_vs_all": medians["routed"] / medians["all heads"],
        "static_vs_all": medians["static (artifact heads)"] / medians["all heads"],
        "forward_share_saved_by_early_stop": statistics.mean(saved),
        "router_file_bytes": (Path(router_dir) / "router.safetensors").stat().st_size,
    }


def search_speed(fit_sets) -> dict:
    data = pooled(fit_sets).labelled_set()
    keep = list(range(min(1000, len(data.qids))))
    subset = data.subset(keep)
    start = time.perf_counter()
    search_heads(subset, SearchConfig(pool_size=64, max_heads=8))
    return {"queries": len(keep), "pool_size": 64, "max_heads": 8, "seconds": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="default: $ROUTEHEAD_DATA or ../shared/data")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--speed-queries", type=int, default=20, help="trec-dl-2020 queries timed per strategy")
    parser.add_argument("--fit-max-queries", type=int, default=None, help="cap each fit split (smoke runs only)")
    parser.add_argument("--test-max-queries", type=int, default=None, help="cap each test split (smoke runs only)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    seeded()
    started = time.time()
    cache_dir = args.cache_dir or default_cache_dir()
    backbone = load_backbone(args.model, dtype=args.dtype)
    scorers = scorers_by_instruction(backbone)
    routed = RoutedHeads.from_folder(args.router).resolve(backbone)
    config = routed.config

    fit_sets = {e.name: load_set(e.name, Role.FIT, args.data_dir, args.fit_max_queries, scorers, cache_dir)
                for e in PROTOCOL.entries_for(Role.FIT)}
    k, static, choice = best_static(fit_sets, K_GRID)
    k_table = {a: b["mean"] for a, b in choice["k_grid"].items()}
    static_heads = {f"static top-{config.selection.k} (same fit)": [Head.parse(h) for h in config.static_heads],
                    f"static top-{k} (k chosen on fit)": static}

    rows, test_sets = [], {}
    for entry in PROTOCOL.entries_for(Role.IN_DOMAIN_TEST) + PROTOCOL.entries_for(Role.CROSS_DOMAIN_TEST):
        eval_set, extractions = load_set(entry.name, entry.role, args.data_dir, args.test_max_queries, scorers, cache_dir)
        test_sets[entry.name] = (eval_set, extractions)
        rows.append(score_set(entry.name, entry.role.value, eval_set, extractions, static_heads, backbone, routed))
    cross = [r for r in rows if r["role"] == Role.CROSS_DOMAIN_TEST.value]
    strategies = list(rows[0]["ndcg@10"])
    averages = {
        "all test sets": {s: statistics.mean(r["ndcg@10"][s] for r in rows) for s in strategies},
        "cross-domain": {s: statistics.mean(r["ndcg@10"][s] for r in cross) for s in strategies},
    }

    with tempfile.TemporaryDirectory() as tmp:
        in_domain = [
            in_domain_fit("beir-scifact", Role.IN_DOMAIN_TEST.value, backbone, scorers, args, cache_dir, Path(tmp)),
            in_domain_fit("hotpotqa-distractor-dev500", Role.IN_DOMAIN_TEST.value, backbone, scorers, args,
                          cache_dir, Path(tmp)),
        ]
    robustness = label_robustness(fit_sets, backbone, config,
                                  {r["dataset"]: test_sets[r["dataset"]] for r in cross})
    eval_set, _ = test_sets["trec-dl-2020"]
    timing = speed(backbone, args.router, eval_set, eval_set.qids[: args.speed_queries])
    console.print(timing)
    searching = search_speed(fit_sets)
    console.print(searching)

    result = {
        "benchmark": "routehead",
        "model": args.model,
        "dtype": args.dtype,
        "router": {"path": portable_path(args.router), "k": config.selection.k, "command": config.command,
                   "fusion": config.fusion.model_dump(), "calibration": config.calibration.model_dump() if config.calibration else None,
                   "dev_metrics": config.dev_metrics, "data": config.data,
                   "search": {x: v for x, v in config.search.items() if x != "grid"},
                   "query_embedding": config.query_embedding.model_dump(mode="json")},
        "static": {"k_chosen_on_fit": k, "heads": [str(h) for h in static], "k_grid": {str(a): b for a, b in k_table.items()},
                   "artifact_heads": config.static_heads},
        "test": [{x: v for x, v in r.items() if x != "per_query"} for r in rows],
        "average": averages,
        "in_domain_fits": [{x: v for x, v in r.items() if x != "per_query"} for r in in_domain],
        "label_robustness": robustness,
        "speed": timing,
        "search_speed": searching,
        "seconds": round(time.time() - started, 1),
        "machine": machine(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routehead.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "routehead.md")
    plot(result, args.out / "routehead.png")
    plot_calibration(result, args.out / "routehead-calibration.png")
    console.print(f"wrote {args.out}/routehead.{{json,md,png}}")
    return 0


def _cell(value, best):
    return f"**{value:.4f}**" if abs(value - best) < 1e-12 else f"{value:.4f}"


def write_markdown(result, path: Path) -> None:
    strategies = list(result["average"]["all test sets"])
    compared = [s for s in strategies if s != "oracle (hindsight)"]
    against = ["BM25", *[s for s in strategies if s.startswith("static")], PAPER]
    lines = [
        f"# RouteHead: nDCG@10 on the protocol test sets ({result['model']}, {result['dtype']})",
        "",
        f"Router: `{result['router']['path']}` (k = {result['router']['k']} routed heads per query; fusion: "
        f"{result['router']['fusion']}; fit data: "
        f"{', '.join(str(d['name']) + ' ' + str(d['queries']) for d in result['router']['data'])}). "
        f"{DEFAULT} is the shipped configuration (the router's heads, fused with the first stage as its fit chose); "
        f"{PAPER} is the paper's method with the same router (the routed heads' attention alone). Static heads chosen "
        "on the same fit splits. The oracle picks each query's head set with hindsight (head search on that query's "
        "own labels): a ceiling, not a method. Bold: best non-oracle strategy. p: paired randomization test of "
        f"{DEFAULT} against each.",
        "",
        "| set | role | queries | " + " | ".join(strategies) + " | p vs " + " / ".join(against) + " | ECE |",
        "|---|---|---|" + "---|" * (len(strategies) + 2),
    ]
    for row in result["test"]:
        best = max(row["ndcg@10"][s] for s in compared)
        cells = [_cell(row["ndcg@10"][s], best) for s in strategies]
        p = " / ".join(f"{row['p_routed_vs'][s]:.3f}" for s in against)
        ece = row.get("calibration", {}).get("ece")
        lines.append(f"| {row['dataset']} | {row['role']} | {row['queries']} | " + " | ".join(cells)
                     + f" | {p} | {'' if ece is None else f'{ece:.3f}'} |")
    for label, values in result["average"].items():
        best = max(values[s] for s in compared)
        lines.append(f"| **average, {label}** | | | " + " | ".join(_cell(values[s], best) for s in strategies) + " | | |")

    lines += ["", "## In-domain fits (a router fitted on the domain's fit split only)", "",
              "| fit -> test | fit queries | k | BM25 | ICR | static (same fit, same k) | static (k chosen on fit) | RouteHead | oracle | p vs static (same k / chosen k) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["in_domain_fits"]:
        n = row["ndcg@10"]
        st = [s for s in n if s.startswith("static")]
        lines.append(
            f"| {row['dataset']} | {row['router']['fit_queries']} | {row['router']['k']} | {n['BM25']:.4f} | "
            f"{n['ICR (all heads)']:.4f} | {n[st[0]]:.4f} | {n[st[1]]:.4f} | {n['RouteHead']:.4f} | "
            f"{n['oracle (hindsight)']:.4f} | " + " / ".join(f"{row['p_routed_vs'][s]:.3f}" for s in st) + " |"
        )

    lines += ["", "## Label robustness (head-search margin and pool weight; mixed fit, router retrained each time)", "",
              "| margin | pool weight | mean label size | label nDCG (fit, hindsight) | k | dev routed | dev static | cross-domain test mean |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["label_robustness"]:
        lines.append(f"| {r['margin']} | {r['pool_weight']} | {r['mean_label_size']:.2f} | {r['label_ndcg']:.4f} | "
                     f"{r['k']} | {r['dev_routed']:.4f} | {r['dev_static']:.4f} | {r['test_mean']:.4f} |")

    s = result["speed"]
    m = s["median_seconds"]
    lines += ["", f"## Speed ({s['dataset']}, {s['queries']} queries, protocol inputs, {result['dtype']}, same engine, same run)", "",
              "| strategy | median s / query | vs all heads |", "|---|---|---|"]
    for label in ("all heads", "static (artifact heads)", "routed"):
        lines.append(f"| {label} | {m[label]:.3f} | {m[label] / m['all heads']:.3f}x |")
    lines += [
        "",
        f"Routing alone (query-embedding pass + router): median {m['routing only'] * 1000:.1f} ms per query. "
        f"Stopping the scoring pass after the deepest routed layer skips {s['forward_share_saved_by_early_stop']:.1%} "
        f"of the decoder layers on average. Router weights: {s['router_file_bytes'] / 1024:.0f} KiB.",
        "",
        f"Head search: {result['search_speed']['queries']} queries, K={result['search_speed']['pool_size']}, "
        f"P={result['search_speed']['max_heads']} in {result['search_speed']['seconds']:.1f} s.",
        "",
        machine_line(result),
        "",
        f"Produced by `python benchmarks/routehead.py --dtype {result['dtype']}` in {result['seconds']:.0f} s.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(result["average"]["all test sets"])
    sets = [r["dataset"] for r in result["test"]] + ["avg (all)", "avg (cross)"]
    values = {s: [r["ndcg@10"][s] for r in result["test"]]
              + [result["average"]["all test sets"][s], result["average"]["cross-domain"][s]] for s in strategies}
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(strategies)
    for i, s in enumerate(strategies):
        ax.bar([x + i * width for x in range(len(sets))], values[s], width, label=s,
               hatch="//" if s.startswith("oracle") else None, alpha=0.5 if s.startswith("oracle") else 1.0)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sets))], sets, rotation=20, ha="right")
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"RouteHead vs baselines, {result['model']} ({result['dtype']})")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_calibration(result, path: Path) -> None:
    """Reliability diagram of the shipped configuration's probabilities, one line per test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for row in result["test"]:
        bins = row.get("calibration", {}).get("reliability")
        if bins:
            ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", markersize=3,
                    label=f"{row['dataset']} (ECE {row['calibration']['ece']:.3f})")
    ax.set_xlabel("predicted probability of relevance")
    ax.set_ylabel("observed share relevant")
    ax.set_title(f"Calibration of {DEFAULT} ({result['model']})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
