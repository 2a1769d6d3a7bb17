"""The protocol test sets: every configuration a user could pick, ranked by ``RouteHeadReranker`` itself.

Per test set (``PROTOCOL`` in-domain and cross-domain tests; never used for a choice), BM25 top-20 candidates:

* BM25 (the first stage), dense all-MiniLM-L6-v2 re-ranking the same candidates;
* ICR (every head), static top-k (the shipped router's static baseline);
* RouteHead (paper): the shipped router's routed heads alone; RouteHead + fusion: fused, without its bi-encoder
  and LoRA (what shipped before the bi-encoder); RouteHead + fusion + MiniLM: with the router's bi-encoder, no LoRA;
* the shipped configuration (router + fusion + bi-encoder + its LoRA, when it has one), scored live;

with paired randomization tests of the shipped configuration against BM25 and the dense baseline. Then, per set:

* the dense first stage (``eval --first-stage dense``): dense top-20 from the set's corpus (its pool for a pool set),
  and the shipped configuration re-ranking them fused with the dense ranks, and without fusion;
* calibration of the shipped probabilities: expected calibration error over every (query, candidate) pair,
  precision and recall of the passages kept at ``score_threshold=0.5``, and on lists with every relevant passage
  removed (the first ``--no-relevant-queries`` queries), the share of lists where a passage is kept anyway.

Latency: ``rank`` per query, shipped, without the LoRA (when it has one), without the bi-encoder (the routed
path alone), every head, and the dense baseline, interleaved on trec-dl-2020.

    python benchmarks/test_sets.py --dtype bfloat16

Writes benchmarks/results/test_sets.{json,md} and benchmarks/results/calibration.md (the calibration tables alone).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, console, machine, machine_line, seeded
from readme_table import quality_table

from routehead_rag import RouteHeadReranker
from routehead_rag.data.first_stage import DenseRetriever
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.eval.harness import prepare_set, rerank_set
from routehead_rag.eval.metrics import paired_randomization_test, per_query, rankings_to_run
from routehead_rag.fit.calibration import expected_calibration_error
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir, portable_path
from routehead_rag.router.artifact import SHIPPED_ROUTERS, read_artifact_config

SHIPPED = "shipped"


def ndcg_of(eval_set, rankings) -> dict[str, float]:
    return per_query(rankings_to_run(rankings), eval_set.dataset.qrels, "nDCG@10", qids=eval_set.qids)


def calibration_rows(eval_set, ranked) -> dict:
    """ECE and precision/recall at 0.5 of the shipped probabilities over every (query, candidate) pair."""
    probabilities, labels = [], []
    for qid, results in ranked.rankings.items():
        judged = eval_set.dataset.qrels.get(qid, {})
        binary = PROTOCOL.spec(eval_set.name).binary_rel
        for r in results:
            probabilities.append(r.score)
            labels.append(float(judged.get(r.id, 0) >= binary))
    p, y = torch.tensor(probabilities, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64)
    kept = p >= 0.5
    return {"ece": expected_calibration_error(p, y), "pairs": len(y), "relevant_rate": float(y.mean()),
            "precision@0.5": float(y[kept].mean()) if bool(kept.any()) else None,
            "recall@0.5": float(kept[y > 0].double().mean()) if bool((y > 0).any()) else None,
            "kept@0.5": float(kept.double().mean())}


def false_keeps(eval_set, reranker, count: int) -> dict:
    """Lists with every relevant passage removed: how often a passage scores >= 0.5 anyway."""
    binary = PROTOCOL.spec(eval_set.name).binary_rel
    lists = kept = passages = kept_passages = 0
    for qid in eval_set.qids[:count]:
        judged = eval_set.dataset.qrels.get(qid, {})
        documents = [(d, t) for d, t in eval_set.documents(qid) if judged.get(d, 0) < binary]
        if not documents:
            continue
        results = reranker.rank(eval_set.dataset.queries[qid], documents)
        high = [r for r in results if r.score >= 0.5]
        lists, kept = lists + 1, kept + bool(high)
        passages, kept_passages = passages + len(results), kept_passages + len(high)
    return {"lists": lists, "lists_with_a_keep": kept / max(lists, 1), "passages_kept": kept_passages / max(passages, 1)}


def latency(backbone, router, eval_set, count: int, dense: DenseRetriever, has_lora: bool, has_bi_encoder: bool) -> dict:
    """Seconds per query of ``rank``: the shipped router (and without its LoRA, when it has one; without its
    bi-encoder and LoRA: the routed path alone), ICR (every head) and the dense baseline, interleaved."""
    rerankers = {"shipped": RouteHeadReranker(model=backbone, heads=router)}
    if has_lora:
        rerankers["no LoRA"] = RouteHeadReranker(model=backbone, heads=router, lora=False)
    if has_bi_encoder:
        rerankers["routed path alone"] = RouteHeadReranker(model=backbone, heads=router, lora=False, bi_encoder=False,
                                                           scale_score=False)
    rerankers["ICR (all heads)"] = RouteHeadReranker(model=backbone, heads="all")
    inputs = [(eval_set.dataset.queries[q], eval_set.documents(q), eval_set.candidates[q].scores)
              for q in eval_set.qids[:count]]
    for reranker in rerankers.values():
        reranker.rank(*inputs[0][:2])
    dense.rerank(inputs[0][0], [t for _, t in inputs[0][1]])
    times = {k: [] for k in [*rerankers, "dense MiniLM"]}
    for query, documents, scores in inputs:
        for label, reranker in rerankers.items():
            begun = time.perf_counter()
            reranker.rank(query, documents, first_stage_scores=scores)
            times[label].append(time.perf_counter() - begun)
        begun = time.perf_counter()
        dense.rerank(query, [t for _, t in documents])
        times["dense MiniLM"].append(time.perf_counter() - begun)
    ratios = [a / b for a, b in zip(times["shipped"], times["no LoRA"])] if has_lora else None
    alone = [a / b for a, b in zip(times["shipped"], times["routed path alone"])] if has_bi_encoder else None
    return {"dataset": eval_set.name, "queries": len(inputs), "median_seconds": {k: statistics.median(v) for k, v in times.items()},
            "median_ratio": statistics.median(ratios) if ratios else None,
            "median_ratio_to_routed_path": statistics.median(alone) if alone else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--no-relevant-queries", type=int, default=40)
    parser.add_argument("--latency-queries", type=int, default=20)
    parser.add_argument("--skip-dense-first-stage", action="store_true")
    parser.add_argument("--name", default="test_sets")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    config = read_artifact_config(args.router)
    has_lora = config.lora is not None
    has_bi_encoder = config.bi_encoder is not None
    fitted = "RouteHead + fusion + MiniLM" if has_bi_encoder else "RouteHead + fusion"  # the router as fitted, no LoRA
    dense = DenseRetriever()
    sets = []
    for role in (Role.IN_DOMAIN_TEST, Role.CROSS_DOMAIN_TEST):
        for entry in PROTOCOL.entries_for(role):
            set_started = time.time()
            eval_set = prepare_set(entry.name, role=role, max_queries=args.max_queries)
            instruction = instruction_for("auto", entry.name)
            prompt = config.scoring.prompt

            def make(heads=args.router, **options):
                return RouteHeadReranker(model=backbone, heads=heads, instruction=instruction, **options)

            rankings = {"BM25": {q: eval_set.candidates[q].doc_ids for q in eval_set.qids}}
            dense_rank = {}
            for q in eval_set.qids:
                ids = eval_set.candidates[q].doc_ids
                cosine = dense.rerank(eval_set.dataset.queries[q], eval_set.passages(ids))
                dense_rank[q] = [d for _, d in sorted(zip(cosine, ids), key=lambda pair: -pair[0])]
            rankings["dense MiniLM"] = dense_rank
            configurations = {
                "ICR (all heads)": make("all", prompt=prompt),
                f"static top-{len(config.static_heads)}": make(list(config.static_heads), prompt=prompt),
                "RouteHead (paper)": make(lora=False, fuse_first_stage=False, scale_score=False, bi_encoder=False),
                "RouteHead + fusion": make(lora=False, bi_encoder=False, scale_score=not has_bi_encoder),
            }
            if has_bi_encoder:
                configurations[fitted] = make(lora=False)
            if has_lora:
                configurations[SHIPPED] = make()
            ranked_shipped = None
            for row, reranker in configurations.items():
                ranked = rerank_set(eval_set, reranker, cache)
                rankings[row] = {q: r.ids() for q, r in ranked.rankings.items()}
                if row == (SHIPPED if has_lora else fitted):
                    ranked_shipped, shipped_reranker = ranked, reranker
            shipped_row = SHIPPED if has_lora else fitted
            per = {row: ndcg_of(eval_set, r) for row, r in rankings.items()}
            values = {row: [per[row][q] for q in eval_set.qids] for row in rankings}
            record = {"dataset": entry.name, "role": role.value, "queries": len(eval_set.qids),
                      "ndcg@10": {row: statistics.mean(v) for row, v in values.items()},
                      "p shipped vs BM25": paired_randomization_test(values[shipped_row], values["BM25"]),
                      "p shipped vs dense": paired_randomization_test(values[shipped_row], values["dense MiniLM"]),
                      "calibration": calibration_rows(eval_set, ranked_shipped),
                      "false_keeps": false_keeps(eval_set, shipped_reranker, args.no_relevant_queries)}
            if not args.skip_dense_first_stage:
                dense_set = prepare_set(entry.name, role=role, max_queries=args.max_queries, first_stage="dense",
                                        dense=dense)
                dense_rows = {"dense first stage": {q: dense_set.candidates[q].doc_ids for q in dense_set.qids}}
                for row, reranker in (("shipped, fused with dense", make()),
                                      ("shipped, no fusion", make(fuse_first_stage=False, scale_score=False))):
                    ranked = rerank_set(dense_set, reranker, cache)
                    dense_rows[row] = {q: r.ids() for q, r in ranked.rankings.items()}
                dense_values = {row: [ndcg_of(dense_set, r)[q] for q in dense_set.qids] for row, r in dense_rows.items()}
                record["dense_first_stage"] = {
                    "ndcg@10": {row: statistics.mean(v) for row, v in dense_values.items()},
                    "p fused vs dense": paired_randomization_test(dense_values["shipped, fused with dense"],
                                                                  dense_values["dense first stage"]),
                }
            record["seconds"] = round(time.time() - set_started)
            sets.append(record)
            console.print(entry.name, {k: round(v, 4) for k, v in record["ndcg@10"].items()})
    trec = prepare_set("trec-dl-2020", role=Role.CROSS_DOMAIN_TEST)
    timing = latency(backbone, args.router, trec, args.latency_queries, dense, has_lora, has_bi_encoder)
    rows = list(sets[0]["ndcg@10"])
    averages = {
        scope: {row: statistics.mean(s["ndcg@10"][row] for s in sets if scope == "all" or s["role"] == scope)
                for row in rows}
        for scope in ("all", Role.CROSS_DOMAIN_TEST.value)
    }
    result = {"command": shlex.join(["python", "benchmarks/test_sets.py", *sys.argv[1:]]), "max_queries": args.max_queries,
              "router": portable_path(args.router),
              "lora": None if config.lora is None else config.lora.model_dump(mode="json"),
              "machine": machine(), "seconds": round(time.time() - started), "rows": rows, "shipped_row": shipped_row,
              "sets": sets, "averages": averages, "latency": timing}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    return 0


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# The protocol test sets", "",
        f"`{result['command']}` ({result['seconds']} s). Router `{result['router']}`. nDCG@10, BM25 top-20 candidates, "
        "every row ranked by `RouteHeadReranker`. p: paired randomization tests of the shipped configuration. No "
        "choice was made on these sets.", "", machine_line(result), "",
        *quality_table(result),
    ]
    if any("dense_first_stage" in s for s in result["sets"]):
        lines += ["", "## A dense first stage (all-MiniLM-L6-v2 top 20 from the corpus)", "",
                  "| set | dense first stage | shipped, fused with dense | shipped, no fusion | p fused vs dense |",
                  "|---|---|---|---|---|"]
        for s in result["sets"]:
            d = s["dense_first_stage"]["ndcg@10"]
            lines.append(f"| {s['dataset']} | {d['dense first stage']:.3f} | {d['shipped, fused with dense']:.3f} | "
                         f"{d['shipped, no fusion']:.3f} | {s['dense_first_stage']['p fused vs dense']:.3f} |")
    calibration = ["## Calibration of the shipped probabilities", "",
                   "A score means a probability of relevance (grade >= the set's binary level); lists with every relevant "
                   "passage removed show how often a passage is kept at 0.5 anyway (the first queries of each set).", "",
                   "| set | pairs | relevant rate | ECE | precision at 0.5 | recall at 0.5 | kept at 0.5 | no-relevant lists | "
                   "lists with a passage kept | passages kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for s in result["sets"]:
        c, f = s["calibration"], s["false_keeps"]
        calibration.append(f"| {s['dataset']} | {c['pairs']} | {c['relevant_rate']:.3f} | {c['ece']:.3f} | {fmt(c['precision@0.5'])} | "
                     f"{fmt(c['recall@0.5'])} | {c['kept@0.5']:.3f} | {f['lists']} | {f['lists_with_a_keep']:.3f} | "
                     f"{f['passages_kept']:.3f} |")
    lines += ["", *calibration]
    path.with_name("calibration.md").write_text(
        "\n".join([f"# Calibration (from `{result['command']}`)", "", machine_line(result), "", *calibration]) + "\n",
        encoding="utf-8")
    if result["latency"]:
        t = result["latency"]
        lines += ["", f"Latency ({t['dataset']}, {t['queries']} queries, `rank` interleaved): "
                  + ", ".join(f"{k} {v:.3f} s" for k, v in t["median_seconds"].items())
                  + ("" if t["median_ratio"] is None else f"; median ratio with/without the LoRA {t['median_ratio']:.3f}x")
                  + ("" if t.get("median_ratio_to_routed_path") is None else
                     f"; median ratio shipped / routed path alone {t['median_ratio_to_routed_path']:.3f}x")
                  + "."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
