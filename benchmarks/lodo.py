"""Leave one domain out: how each configuration carries to a domain nobody fitted on.

For each of the six fit domains (``PROTOCOL.domains(Role.FIT)``), a router is fitted with ``run_fit`` on
the other five domains' fit queries (from the cached all-heads extraction), then every query of the
left-out domain is ranked by ``RouteHeadReranker`` itself (``rerank_set``: what users get) with:

* BM25 (the first stage; the candidates every row re-ranks),
* dense all-MiniLM-L6-v2 re-ranking the same candidates (cosine),
* ICR (every head),
* static top-k (the fold's static baseline heads, chosen on its fit data),
* RouteHead (paper): the fold's router, routed heads alone (no fusion),
* RouteHead + fusion: the fold's router as fitted (fusion and calibration on dev), the shipped configuration
  without a LoRA.

Paired randomization tests of the shipped configuration against BM25 and against the dense baseline, per
left-out domain and pooled. Choices are made here and on fit dev data, never on the test sets.

    python benchmarks/lodo.py --dtype bfloat16

Writes benchmarks/results/lodo.{json,md,png} (``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, console, machine, machine_line, seeded

from routehead_rag import RouteHeadReranker
from routehead_rag.data.first_stage import DenseRetriever
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.engine.embedding import QueryEmbeddingConfig
from routehead_rag.eval.harness import prepare_set, rerank_set
from routehead_rag.eval.metrics import paired_randomization_test, per_query, rankings_to_run
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import beir_source
from routehead_rag.fit.training import TrainingConfig
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir

ROWS = ("BM25", "dense MiniLM", "ICR (all heads)", "static top-k", "RouteHead (paper)", "RouteHead + fusion")
SEARCHES = [SearchConfig(pool_size=p, max_heads=h) for p in (32, 64) for h in (4, 8)]


def ndcg_per_query(eval_set, rankings: dict[str, list[str]]) -> dict[str, float]:
    return per_query(rankings_to_run(rankings), eval_set.dataset.qrels, "nDCG@10", qids=eval_set.qids)


def score_domain(backbone, router: Path, names: list[str], dense: DenseRetriever, cache: Path) -> dict[str, dict]:
    """Per row, ``{"<set>/<qid>": nDCG@10}`` over the left-out domain's queries."""
    from routehead_rag.router.artifact import read_artifact_config

    static = read_artifact_config(router).static_heads
    scores: dict[str, dict] = {row: {} for row in ROWS}
    for name in names:
        eval_set = prepare_set(name, role=Role.FIT)
        instruction = instruction_for("auto", name)
        prompt = read_artifact_config(router).scoring.prompt
        configurations = {
            "ICR (all heads)": RouteHeadReranker(model=backbone, heads="all", prompt=prompt, instruction=instruction),
            "static top-k": RouteHeadReranker(model=backbone, heads=static, prompt=prompt, instruction=instruction),
            "RouteHead (paper)": RouteHeadReranker(model=backbone, heads=router, instruction=instruction,
                                                   fuse_first_stage=False, scale_score=False),
            "RouteHead + fusion": RouteHeadReranker(model=backbone, heads=router, instruction=instruction),
        }
        key = {q: f"{name}/{q}" for q in eval_set.qids}
        for q, value in ndcg_per_query(eval_set, {q: eval_set.candidates[q].doc_ids for q in eval_set.qids}).items():
            scores["BM25"][key[q]] = value
        dense_order = {}
        for q in eval_set.qids:
            ids = eval_set.candidates[q].doc_ids
            cosine = dense.rerank(eval_set.dataset.queries[q], eval_set.passages(ids))
            dense_order[q] = [d for _, d in sorted(zip(cosine, ids), key=lambda pair: -pair[0])]
        for q, value in ndcg_per_query(eval_set, dense_order).items():
            scores["dense MiniLM"][key[q]] = value
        for row, reranker in configurations.items():
            ranked = rerank_set(eval_set, reranker, cache)
            for q, value in ndcg_per_query(eval_set, {q: r.ids() for q, r in ranked.rankings.items()}).items():
                scores[row][key[q]] = value
    return scores


def summarise(scores: dict[str, dict], keys: list[str]) -> dict:
    out = {row: statistics.mean(scores[row][k] for k in keys) for row in ROWS}
    shipped = [scores["RouteHead + fusion"][k] for k in keys]
    out["p shipped vs BM25"] = paired_randomization_test(shipped, [scores["BM25"][k] for k in keys])
    out["p shipped vs dense"] = paired_randomization_test(shipped, [scores["dense MiniLM"][k] for k in keys])
    out["queries"] = len(keys)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--name", default="lodo")
    parser.add_argument("--domains", nargs="*", default=None, help="only these left-out domains (default: all six)")
    parser.add_argument("--keep-routers", type=Path, default=None, help="write each fold's router here")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    domains = PROTOCOL.domains(Role.FIT)
    sources = {name: beir_source(name) for names in domains.values() for name in names}
    dense = DenseRetriever()
    folds = {}
    all_scores: dict[str, dict] = {row: {} for row in ROWS}
    with tempfile.TemporaryDirectory() as scratch:
        for domain, names in domains.items():
            if args.domains and domain not in args.domains:
                continue
            fold_start = time.time()
            out = (args.keep_routers or Path(scratch)) / f"without-{domain.replace(' ', '-')}"
            training_sources = [source for name, source in sources.items() if name not in names]
            fitted = run_fit(backbone, training_sources, out, search=SEARCHES, training=TrainingConfig(),
                             query_embedding=QueryEmbeddingConfig(layer=backbone.num_layers // 2), cache_dir=cache,
                             storage_dtype="float32", report_dir=Path(scratch) / "reports")
            scores = score_domain(backbone, fitted.artifact, names, dense, cache)
            for row in ROWS:
                all_scores[row].update(scores[row])
            keys = list(scores["BM25"])
            folds[domain] = {"left_out_sets": names, "fit_sets": [s.name for s in training_sources],
                             "k": fitted.config.selection.k, "fusion": fitted.config.fusion.model_dump(),
                             "dev_metrics": fitted.config.dev_metrics, "seconds": round(time.time() - fold_start),
                             **summarise(scores, keys), "per_query": scores}
            console.print(domain, {row: round(folds[domain][row], 4) for row in ROWS})
    keys = list(all_scores["BM25"])
    result = {
        "command": f"python benchmarks/lodo.py --dtype {args.dtype}" + (f" --name {args.name}" if args.name != "lodo" else ""),
        "machine": machine(), "seconds": round(time.time() - started), "rows": list(ROWS),
        "searches": [s.model_dump() for s in SEARCHES], "folds": folds,
        "pooled": summarise(all_scores, keys),
        "macro": {row: statistics.mean(folds[d][row] for d in folds) for row in ROWS},
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    plot(result, RESULTS / f"{args.name}.png")
    return 0


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Leave one domain out",
        "",
        f"`{result['command']}` ({result['seconds']} s). For each fit domain, a router fitted on the other five "
        "(search grid K x P = 32/64 x 4/8, the fit's own dev choices), then every query of the left-out domain "
        "ranked by `RouteHeadReranker` (BM25 top-20 candidates). nDCG@10; p: paired randomization tests of "
        "RouteHead + fusion (the shipped configuration without a LoRA).",
        "",
        machine_line(result),
        "",
        "| left-out domain | queries | " + " | ".join(result["rows"]) + " | p vs BM25 | p vs dense |",
        "|---|---|" + "---|" * len(result["rows"]) + "---|---|",
    ]
    for domain, fold in result["folds"].items():
        cells = [f"{fold[row]:.3f}" for row in result["rows"]]
        lines.append(f"| {domain} | {fold['queries']} | " + " | ".join(cells)
                     + f" | {fold['p shipped vs BM25']:.3f} | {fold['p shipped vs dense']:.3f} |")
    macro = result["macro"]
    lines.append("| **mean over domains** | | " + " | ".join(f"**{macro[row]:.3f}**" for row in result["rows"]) + " | | |")
    pooled = result["pooled"]
    lines.append(f"| all left-out queries | {pooled['queries']} | " + " | ".join(f"{pooled[row]:.3f}" for row in result["rows"])
                 + f" | {pooled['p shipped vs BM25']:.3f} | {pooled['p shipped vs dense']:.3f} |")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(result["folds"])
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar([d + i * width for d in range(len(domains))], [result["folds"][d][row] for d in domains], width,
               label=row)
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(domains))], domains, rotation=15, fontsize=8)
    ax.set_ylabel("nDCG@10 (left-out domain)")
    ax.set_title("Leave one domain out")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
