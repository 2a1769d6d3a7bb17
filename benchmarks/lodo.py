"""Leave one domain out: how each configuration carries to a domain nobody fitted on.

For each of the six fit domains (``PROTOCOL.domains(Role.FIT)``), a router is fitted with ``run_fit`` on
the other five domains' fit queries (from the cached all-heads extraction), then the left-out domain's
queries (all, or ``--eval-queries`` of them by hash, split evenly over its sets) are ranked by
``RouteHeadReranker`` itself (``rerank_set``: what users get) with:

* BM25 (the first stage; the candidates every row re-ranks),
* dense all-MiniLM-L6-v2 re-ranking the same candidates (cosine),
* ICR (every head),
* static top-k (the fold's static baseline heads, chosen on its fit data),
* RouteHead (paper): the fold's router, routed heads alone (no fusion),
* RouteHead + fusion: the fold's router fused with the first stage as fitted on dev, without its bi-encoder
  (what shipped before the bi-encoder),
* RouteHead + fusion + MiniLM: the fold's router as fitted, with the all-MiniLM-L6-v2 cosine at the weight
  ``routehead_rag.bi_encoder.DEFAULT_WEIGHT`` (chosen by ``benchmarks/bi_encoder_weight.py``, itself by leaving
  domains out): the shipped configuration.

Paired randomization tests of the shipped configuration against BM25 and against the dense baseline, per
left-out domain and pooled. Choices are made here and on fit dev data, never on the test sets.

    python benchmarks/lodo.py --dtype bfloat16 --variants "all queries" --eval-queries 150

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
from routehead_rag.bi_encoder import CHOSEN_BY, DEFAULT_WEIGHT, BiEncoderConfig
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
from routehead_rag.router.artifact import read_artifact_config

COMMON = ("BM25", "dense MiniLM", "ICR (all heads)")
FITTED = ("static top-k", "RouteHead (paper)", "RouteHead + fusion", "RouteHead + fusion + MiniLM")
SHIPPED = "RouteHead + fusion + MiniLM"
SEARCHES = [SearchConfig(pool_size=p, max_heads=h) for p in (32, 64) for h in (4, 8)]
VARIANTS = {
    # name: (what it changes, queries per domain at most: None = all)
    "all queries": ("every fit query of the other five domains (nq 1,000 and scifact 809 weigh most)", None),
    "balanced": ("at most 400 fit queries per domain (the first by hash), so no domain outweighs the others", 400),
}


def ndcg_per_query(eval_set, rankings: dict[str, list[str]]) -> dict[str, float]:
    return per_query(rankings_to_run(rankings), eval_set.dataset.qrels, "nDCG@10", qids=eval_set.qids)


def left_out_set(name: str, limit: int | None):
    """The set's fit queries, or its first ``limit`` by hash of their id (the same hash as :func:`capped`)."""
    eval_set = prepare_set(name, role=Role.FIT)
    if limit is None or len(eval_set.qids) <= limit:
        return eval_set
    import dataclasses
    import hashlib

    keep = sorted(eval_set.qids, key=lambda q: hashlib.sha256(f"cap:{q}".encode()).hexdigest())[:limit]
    return dataclasses.replace(eval_set, qids=[q for q in eval_set.qids if q in set(keep)])


def common_rows(backbone, names: list[str], dense: DenseRetriever, cache: Path, prompt,
                limit: int | None) -> dict[str, dict]:
    """BM25, the dense baseline and ICR: ``{row: {"<set>/<qid>": nDCG@10}}`` over the left-out domain's queries."""
    scores: dict[str, dict] = {row: {} for row in COMMON}
    for name in names:
        eval_set = left_out_set(name, limit)
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
        icr = RouteHeadReranker(model=backbone, heads="all", prompt=prompt, instruction=instruction_for("auto", name))
        ranked = rerank_set(eval_set, icr, cache)
        for q, value in ndcg_per_query(eval_set, {q: r.ids() for q, r in ranked.rankings.items()}).items():
            scores["ICR (all heads)"][key[q]] = value
    return scores


def fitted_rows(backbone, router: Path, names: list[str], cache: Path, limit: int | None) -> dict[str, dict]:
    """The fold router's rows: its static baseline, its routed heads alone, and fused as fitted."""
    config = read_artifact_config(router)
    scores: dict[str, dict] = {row: {} for row in FITTED}
    for name in names:
        eval_set = left_out_set(name, limit)
        instruction = instruction_for("auto", name)
        configurations = {
            "static top-k": RouteHeadReranker(model=backbone, heads=list(config.static_heads), prompt=config.scoring.prompt,
                                              instruction=instruction),
            "RouteHead (paper)": RouteHeadReranker(model=backbone, heads=router, instruction=instruction,
                                                   fuse_first_stage=False, scale_score=False, bi_encoder=False),
            "RouteHead + fusion": RouteHeadReranker(model=backbone, heads=router, instruction=instruction,
                                                    bi_encoder=False, scale_score=config.bi_encoder is None),
            SHIPPED: RouteHeadReranker(model=backbone, heads=router, instruction=instruction),
        }
        for row, reranker in configurations.items():
            ranked = rerank_set(eval_set, reranker, cache)
            for q, value in ndcg_per_query(eval_set, {q: r.ids() for q, r in ranked.rankings.items()}).items():
                scores[row][f"{name}/{q}"] = value
    return scores


def summarise(scores: dict[str, dict], keys: list[str], shipped: str) -> dict:
    out = {row: statistics.mean(scores[row][k] for k in keys) for row in scores}
    ours = [scores[shipped][k] for k in keys]
    out["p vs BM25"] = paired_randomization_test(ours, [scores["BM25"][k] for k in keys])
    out["p vs dense"] = paired_randomization_test(ours, [scores["dense MiniLM"][k] for k in keys])
    out["queries"] = len(keys)
    return out


def capped(source, limit: int | None):
    """``source`` restricted to its first ``limit`` queries by hash of their id (all when ``limit`` is None)."""
    if limit is None or len(source.candidates) <= limit:
        return source
    import dataclasses
    import hashlib

    keep = set(sorted(source.candidates, key=lambda q: hashlib.sha256(f"cap:{q}".encode()).hexdigest())[:limit])
    pick = lambda mapping: {q: v for q, v in (mapping or {}).items() if q in keep}  # noqa: E731
    return dataclasses.replace(source, queries=pick(source.queries), candidates=pick(source.candidates),
                               qrels=pick(source.qrels), first_stage_scores=pick(source.first_stage_scores),
                               groups=pick(source.groups))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--name", default="lodo")
    parser.add_argument("--domains", nargs="*", default=None, help="only these left-out domains (default: all six)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--keep-routers", type=Path, default=None,
                        help="write each fold's router here (a fold whose router is already there is not refitted)")
    parser.add_argument("--eval-queries", type=int, default=None,
                        help="score at most this many of the left-out domain's queries (by hash; default: all)")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    domains = PROTOCOL.domains(Role.FIT)
    sources = {name: beir_source(name) for names in domains.values() for name in names}
    dense = DenseRetriever()
    folds = {}
    pooled: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for domain, names in domains.items():
            if args.domains and domain not in args.domains:
                continue
            fold_start = time.time()
            scores = None
            fits = {}
            for variant in args.variants:
                limit = VARIANTS[variant][1]
                training_sources = []
                for other, other_names in domains.items():
                    if other == domain:
                        continue
                    share = None if limit is None else max(1, limit // len(other_names))
                    training_sources += [capped(sources[n], share) for n in other_names]
                out = (args.keep_routers or Path(scratch)) / f"{variant.replace(' ', '-')}-without-{domain.replace(' ', '-')}"
                if args.keep_routers and (out / "config.json").is_file():
                    artifact, config = out, read_artifact_config(out)  # fitted by an earlier run of this command
                else:
                    fitted = run_fit(backbone, training_sources, out, search=SEARCHES, training=TrainingConfig(),
                                     query_embedding=QueryEmbeddingConfig(layer=backbone.num_layers // 2),
                                     cache_dir=cache, storage_dtype="float32", report_dir=Path(scratch) / "reports",
                                     bi_encoder=BiEncoderConfig(weight=DEFAULT_WEIGHT, chosen_by=CHOSEN_BY))
                    artifact, config = fitted.artifact, fitted.config
                eval_limit = None if args.eval_queries is None else max(1, args.eval_queries // len(names))
                if scores is None:
                    scores = common_rows(backbone, names, dense, cache, config.scoring.prompt, eval_limit)
                for row, values in fitted_rows(backbone, artifact, names, cache, eval_limit).items():
                    scores[f"{row} [{variant}]"] = values
                fits[variant] = {"fit_queries": sum(len(s.candidates) for s in training_sources),
                                 "k": config.selection.k, "fusion": config.fusion.model_dump(),
                                 "bi_encoder": None if config.bi_encoder is None else config.bi_encoder.model_dump(),
                                 "dev_metrics": config.dev_metrics}
            keys = list(scores["BM25"])
            shipped = f"{SHIPPED} [{args.variants[0]}]"
            folds[domain] = {"left_out_sets": names, "fits": fits, "seconds": round(time.time() - fold_start),
                             **summarise(scores, keys, shipped), "per_query": scores}
            for row, values in scores.items():
                pooled.setdefault(row, {}).update(values)
            console.print(domain, {row: round(folds[domain][row], 4) for row in scores})
    rows = list(pooled)
    keys = list(pooled["BM25"])
    shipped = f"{SHIPPED} [{args.variants[0]}]"
    result = {
        "command": "python benchmarks/lodo.py --dtype " + args.dtype
        + (f" --variants {' '.join(repr(v) for v in args.variants)}" if args.variants != list(VARIANTS) else "")
        + (f" --name {args.name}" if args.name != "lodo" else "")
        + (f" --eval-queries {args.eval_queries}" if args.eval_queries is not None else ""),
        "eval_queries": args.eval_queries,
        "machine": machine(), "seconds": round(time.time() - started), "rows": rows, "shipped_row": shipped,
        "variants": {v: VARIANTS[v][0] for v in args.variants}, "searches": [s.model_dump() for s in SEARCHES],
        "folds": folds, "pooled": summarise(pooled, keys, shipped),
        "macro": {row: statistics.mean(folds[d][row] for d in folds) for row in rows},
        "variant_tests": {v: {f"p vs {args.variants[0]}": paired_randomization_test(
            [pooled[f"{SHIPPED} [{v}]"][k] for k in keys], [pooled[shipped][k] for k in keys])}
            for v in args.variants[1:]},
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    plot(result, RESULTS / f"{args.name}.png")
    return 0


def write_markdown(result: dict, path: Path) -> None:
    rows = result["rows"]
    lines = [
        "# Leave one domain out",
        "",
        f"`{result['command']}` ({result['seconds']} s). For each fit domain, routers fitted on the other five (search "
        "grid K x P = 32/64 x 4/8, the fit's own dev choices of k, depth cost, fusion and calibration), then "
        + ("every query of the left-out domain" if result.get("eval_queries") is None else
           f"at most {result['eval_queries']} queries of the left-out domain (by hash of the id, split evenly over its sets)")
        + " ranked by `RouteHeadReranker` (BM25 top-20 candidates). nDCG@10; p: paired "
        f"randomization tests of {result['shipped_row']}. Variants (the choice each figure supports):",
        "",
        *[f"* **{name}**: {what}" for name, what in result["variants"].items()],
        "",
        machine_line(result),
        "",
        "| left-out domain | queries | " + " | ".join(rows) + " | p vs BM25 | p vs dense |",
        "|---|---|" + "---|" * len(rows) + "---|---|",
    ]
    for domain, fold in result["folds"].items():
        lines.append(f"| {domain} | {fold['queries']} | " + " | ".join(f"{fold[row]:.3f}" for row in rows)
                     + f" | {fold['p vs BM25']:.3f} | {fold['p vs dense']:.3f} |")
    macro, pooled = result["macro"], result["pooled"]
    lines.append("| **mean over domains** | | " + " | ".join(f"**{macro[row]:.3f}**" for row in rows) + " | | |")
    lines.append(f"| all left-out queries | {pooled['queries']} | " + " | ".join(f"{pooled[row]:.3f}" for row in rows)
                 + f" | {pooled['p vs BM25']:.3f} | {pooled['p vs dense']:.3f} |")
    for variant, tests in result["variant_tests"].items():
        for name, p in tests.items():
            lines.append(f"\n{SHIPPED} [{variant}] {name} (pooled queries): p = {p:.3f}.")
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(result["folds"])
    rows = [r for r in result["rows"] if "[" not in r or r.endswith(f"[{next(iter(result['variants']))}]")]
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
