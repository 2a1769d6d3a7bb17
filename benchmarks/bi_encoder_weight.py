"""The bi-encoder's weight, chosen by leaving each fit domain out (never on the test sets).

For each of the six fit domains, the router fitted on the other five (``benchmarks/lodo.py``'s fold router,
kept with ``--keep-routers``; fitted here the same way when missing) scores the left-out domain's queries
(``--eval-queries`` by hash, as lodo.py) with its routed heads alone (no fusion, no calibration, no
bi-encoder), and the packaged all-MiniLM-L6-v2 gives each candidate its cosine. The score
``z(attention) + v * cosine`` (:func:`routehead_rag.recipe.final_scores`) is measured for every ``v`` of
the grid; ``v = 0`` is the routed heads alone and the dense baseline is the cosine alone.

The choice is nested: for each left-out domain, ``v`` is the grid value with the best mean nDCG@10 over
the *other five* domains' left-out queries, and that ``v``'s nDCG@10 on the domain is its out-of-domain
estimate. (The other folds' routers were fitted with this domain among their data; only their own
left-out queries' labels decide.) ``routehead_rag.bi_encoder.DEFAULT_WEIGHT`` is the value these choices
support.

The cosines are computed in float32 and, on a CPU with native bfloat16, in bfloat16 as well (what
``dtype="auto"`` runs there: ``benchmarks/bi_encoder_cost.py`` measures what it saves); every row and the nested
choice are reported for each, with a paired test of bfloat16 against float32 at each one's nested choice.

    python benchmarks/bi_encoder_weight.py --dtype bfloat16 --eval-queries 150 --routers ROUTERS

Writes benchmarks/results/bi_encoder_weight.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, console, machine, machine_line, seeded
from lodo import SEARCHES, capped, left_out_set, ndcg_per_query

from routehead_rag import RouteHeadReranker
from routehead_rag.bi_encoder import DEFAULT_WEIGHT, PACKAGED_MINILM, BiEncoder
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.engine.embedding import QueryEmbeddingConfig
from routehead_rag.eval.harness import rerank_set
from routehead_rag.eval.metrics import paired_randomization_test
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.sources import beir_source
from routehead_rag.fit.training import TrainingConfig
from routehead_rag.model.backbone import load_backbone
from routehead_rag.model.devices import cpu_has_native_bf16
from routehead_rag.paths import default_cache_dir
from routehead_rag.recipe import final_scores

GRID = (0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0)


def fold_router(backbone, domain: str, domains: dict, sources: dict, routers: Path, cache: Path, scratch: Path) -> Path:
    """The router fitted on every domain but ``domain`` (all their fit queries), as lodo.py's "all queries" variant."""
    out = routers / f"all-queries-without-{domain.replace(' ', '-')}"
    if not (out / "config.json").is_file():
        training = [capped(sources[n], None) for other, names in domains.items() if other != domain for n in names]
        run_fit(backbone, training, out, search=SEARCHES, training=TrainingConfig(),
                query_embedding=QueryEmbeddingConfig(layer=backbone.num_layers // 2), cache_dir=cache,
                storage_dtype="float32", report_dir=scratch)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eval-queries", type=int, default=150)
    parser.add_argument("--routers", type=Path, required=True, help="lodo.py --keep-routers folder (missing: fitted)")
    parser.add_argument("--name", default="bi_encoder_weight")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    dtypes = ["float32", "bfloat16"] if cpu_has_native_bf16() else ["float32"]
    encoders = {dtype: BiEncoder(PACKAGED_MINILM, dtype=dtype) for dtype in dtypes}
    domains = PROTOCOL.domains(Role.FIT)
    sources = {name: beir_source(name) for names in domains.values() for name in names}
    ndcg: dict[str, dict[str, dict[str, float]]] = {}  # row -> domain -> {query key: nDCG@10}
    with tempfile.TemporaryDirectory() as scratch:
        for domain, names in domains.items():
            router = fold_router(backbone, domain, domains, sources, args.routers, cache, Path(scratch))
            for name in names:
                eval_set = left_out_set(name, max(1, args.eval_queries // len(names)))
                reranker = RouteHeadReranker(model=backbone, heads=router, instruction=instruction_for("auto", name),
                                             fuse_first_stage=False, scale_score=False, bi_encoder=False)
                ranked = rerank_set(eval_set, reranker, cache)
                orders: dict[str, dict[str, list[str]]] = {"BM25": {}, "dense MiniLM": {}}
                for qid in eval_set.qids:
                    ids = eval_set.candidates[qid].doc_ids
                    mass = {r.id: r.score for r in ranked.rankings[qid]}
                    attention = torch.tensor([mass[d] for d in ids], dtype=torch.float64)  # [passage]
                    orders["BM25"][qid] = list(ids)
                    for dtype, encoder in encoders.items():
                        cosine = encoder.cosines(eval_set.dataset.queries[qid], eval_set.passages(ids))  # [passage]
                        orders.setdefault(row_name("dense MiniLM", dtype), {})[qid] = [
                            ids[i] for i in torch.argsort(-cosine, stable=True).tolist()]
                        for weight in GRID:
                            score = final_scores(attention, cosine=cosine, cosine_weight=weight)
                            orders.setdefault(row_name(f"v={weight:g}", dtype), {})[qid] = [
                                ids[i] for i in torch.argsort(-score, stable=True).tolist()]
                for row, rankings in orders.items():
                    per = ndcg_per_query(eval_set, rankings)
                    ndcg.setdefault(row, {}).setdefault(domain, {}).update({f"{name}/{q}": v for q, v in per.items()})
            console.print(domain, {row: round(statistics.mean(ndcg[row][domain].values()), 4) for row in ndcg})
    mean = {row: {d: statistics.mean(v.values()) for d, v in by_domain.items()} for row, by_domain in ndcg.items()}
    nested = {dtype: nested_choice(ndcg, mean, list(domains), dtype) for dtype in dtypes}
    comparison = None
    if len(dtypes) == 2:  # bfloat16 against float32, each at its own nested choice, every left-out query pooled
        pooled = {dtype: [ndcg[nested[dtype][d]["chosen"]][d][k] for d in domains for k in ndcg["BM25"][d]]
                  for dtype in dtypes}
        comparison = {"pooled_ndcg@10": {dtype: statistics.mean(v) for dtype, v in pooled.items()},
                      "p": paired_randomization_test(pooled["bfloat16"], pooled["float32"])}
    result = {
        "command": f"python benchmarks/bi_encoder_weight.py --dtype {args.dtype} --eval-queries {args.eval_queries} "
                   "--routers ROUTERS",
        "machine": machine(), "seconds": round(time.time() - started), "grid": list(GRID),
        "shipped_weight": DEFAULT_WEIGHT, "mean": mean,
        "macro": {row: statistics.mean(mean[row].values()) for row in mean}, "dtypes": dtypes, "nested": nested,
        "nested_macro": {dtype: statistics.mean(n["ndcg@10"] for n in nested[dtype].values()) for dtype in dtypes},
        "bfloat16_vs_float32": comparison,
        "queries": {d: len(ndcg["BM25"][d]) for d in domains},
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    plot(result, RESULTS / f"{args.name}.png")
    return 0


def row_name(row: str, dtype: str) -> str:
    """A row's name for cosines computed in ``dtype`` (float32's rows keep the plain name)."""
    return row if dtype == "float32" else f"{row} ({dtype})"


def nested_choice(ndcg: dict, mean: dict, domains: list[str], dtype: str) -> dict:
    """Per left-out domain: the grid's ``v`` best on the other five domains, its nDCG@10 there and paired tests."""
    grid_rows = [row_name(f"v={w:g}", dtype) for w in GRID]
    dense = row_name("dense MiniLM", dtype)
    nested = {}
    for domain in domains:
        chosen = max(grid_rows, key=lambda r: (statistics.mean(mean[r][d] for d in domains if d != domain),
                                               r == grid_rows[0]))
        keys = list(ndcg[chosen][domain])
        nested[domain] = {"chosen": chosen, "ndcg@10": mean[chosen][domain],
                          "p vs dense": paired_randomization_test([ndcg[chosen][domain][k] for k in keys],
                                                                  [ndcg[dense][domain][k] for k in keys]),
                          "p vs BM25": paired_randomization_test([ndcg[chosen][domain][k] for k in keys],
                                                                 [ndcg["BM25"][domain][k] for k in keys])}
    return nested


def write_markdown(result: dict, path: Path) -> None:
    domains = list(result["queries"])
    rows = ["BM25", *[row_name(r, dtype) for dtype in result["dtypes"]
                      for r in ["dense MiniLM", *[f"v={w:g}" for w in result["grid"]]]]]
    lines = [
        "# The bi-encoder's weight, by leaving each domain out", "",
        f"`{result['command']}` ({result['seconds']} s; ROUTERS: the fold routers of `benchmarks/lodo.py "
        "--keep-routers`). Score `z(routed attention) + v * cosine(all-MiniLM-L6-v2)` on each left-out domain's "
        "queries (BM25 top-20 candidates; v=0: the routed heads alone). nDCG@10. Rows marked (bfloat16): the "
        "cosines computed in bfloat16 (`dtype=\"auto\"` on this CPU).", "", machine_line(result), "",
        "| row | " + " | ".join(f"{d} ({result['queries'][d]})" for d in domains) + " | mean over domains |",
        "|---|" + "---|" * (len(domains) + 1),
    ]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{result['mean'][row][d]:.3f}" for d in domains)
                     + f" | {result['macro'][row]:.3f} |")
    for dtype in result["dtypes"]:
        nested, dense = result["nested"][dtype], row_name("dense MiniLM", dtype)
        lines += ["", f"Nested choice, cosines in {dtype} (v chosen on the other five domains, scored on the "
                  "left-out one):", "",
                  "| left-out domain | v chosen | nDCG@10 | dense MiniLM | BM25 | p vs dense | p vs BM25 |",
                  "|---|---|---|---|---|---|---|"]
        for d in domains:
            n = nested[d]
            lines.append(f"| {d} | {n['chosen']} | {n['ndcg@10']:.3f} | {result['mean'][dense][d]:.3f} | "
                         f"{result['mean']['BM25'][d]:.3f} | {n['p vs dense']:.3f} | {n['p vs BM25']:.3f} |")
        lines.append(f"| **mean** | | **{result['nested_macro'][dtype]:.3f}** | {result['macro'][dense]:.3f} | "
                     f"{result['macro']['BM25']:.3f} | | |")
    if result["bfloat16_vs_float32"]:
        c = result["bfloat16_vs_float32"]
        lines += ["", f"bfloat16 against float32 cosines, each at its nested choice, all left-out queries pooled: "
                  f"{c['pooled_ndcg@10']['bfloat16']:.4f} vs {c['pooled_ndcg@10']['float32']:.4f} (paired p = {c['p']:.3f})."]
    lines += ["", f"Shipped weight (`routehead_rag.bi_encoder.DEFAULT_WEIGHT`): v={result['shipped_weight']:g}.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    grid = result["grid"]
    for domain in result["queries"]:
        ax.plot(grid, [result["mean"][f"v={w:g}"][domain] for w in grid], marker=".", label=domain)
    ax.plot(grid, [result["macro"][f"v={w:g}"] for w in grid], color="black", linewidth=2, label="mean over domains")
    ax.axhline(result["macro"]["dense MiniLM"], color="black", linestyle="--", label="dense MiniLM (mean)")
    ax.set_xlabel("v (weight of the cosine)")
    ax.set_ylabel("nDCG@10, left-out domain")
    ax.set_title("z(attention) + v * cosine, leave one domain out")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
