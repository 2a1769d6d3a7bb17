"""The passage budget, chosen on fit dev data for quality and cost: nDCG@10 and seconds per query per budget.

For a sample of fit-dev queries of every fit domain (the fit's own group-aware dev split, the first
``--per-domain`` of each domain by hash), the re-ranker as users get it (``RouteHeadReranker`` with the
given router, default the shipped one: fusion, calibration and LoRA as fitted) ranks each query's
candidates (BM25 top 20, whole passages handed in) with the passage cut to 100 words (the protocol's
old cut) and to 128, 192, 256 and 512 tokens of the model's tokenizer. Seconds per query are ``rank``'s
wall time (the prompt grows with the budget; past ``max_prompt_tokens`` the list is scored in windows).
Paired randomization tests of each budget against the first. Never the test sets.

    python benchmarks/passage_budget.py --dtype bfloat16

Writes benchmarks/results/passage_budget.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import RESULTS, console, machine, machine_line, seeded

from routehead_rag import RouteHeadReranker
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.eval.harness import prepare_set
from routehead_rag.eval.metrics import paired_randomization_test, per_query, rankings_to_run
from routehead_rag.fit.training import split_train_dev
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import portable_path
from routehead_rag.router.artifact import SHIPPED_ROUTERS, read_artifact_config

BUDGETS = {"100 words": (100, None), "128 tokens": (None, 128), "192 tokens": (None, 192), "256 tokens": (None, 256),
           "512 tokens": (None, 512)}


def dev_sample(per_domain: int) -> list[tuple[str, object, list[str]]]:
    """``(domain, eval set, dev qids)`` for every fit set: its group-aware dev queries, the first few by hash."""
    out = []
    domains = PROTOCOL.domains(Role.FIT)
    for domain, names in domains.items():
        for name in names:
            eval_set = prepare_set(name, role=Role.FIT)
            spec = PROTOCOL.spec(name)
            groups = [f"{name}/{spec.group(q)}" for q in eval_set.qids]
            _, dev = split_train_dev(groups, 0.2, 0)
            dev_qids = [eval_set.qids[i] for i in dev.tolist()][: max(1, per_domain // len(names))]
            out.append((domain, eval_set, dev_qids))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--per-domain", type=int, default=20)
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--name", default="passage_budget")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    router_prompt = read_artifact_config(args.router).scoring.prompt
    sample = dev_sample(args.per_domain)
    console.print(f"{sum(len(q) for _, _, q in sample)} dev queries")
    rows: dict[str, list[dict]] = {}
    for label in args.budgets:
        words, tokens = BUDGETS[label]
        prompt = router_prompt.model_copy(update={"max_passage_words": words, "max_passage_tokens": tokens})
        rerankers = {}
        results = []
        for domain, eval_set, qids in sample:
            instruction = instruction_for("auto", eval_set.name)
            if instruction not in rerankers:
                rerankers[instruction] = RouteHeadReranker(model=backbone, heads=args.router, prompt=prompt,
                                                           instruction=instruction)
                rerankers[instruction].rank("warm up", ["a passage", "another"])
            reranker = rerankers[instruction]
            qrels = eval_set.dataset.qrels
            for qid in qids:
                begun = time.perf_counter()
                ranked = reranker.rank(eval_set.dataset.queries[qid], eval_set.documents(qid),
                                       first_stage_scores=eval_set.candidates[qid].scores)
                seconds = time.perf_counter() - begun
                run = rankings_to_run({qid: ranked.ids()})
                first = rankings_to_run({qid: eval_set.candidates[qid].doc_ids})
                results.append({"domain": domain, "set": eval_set.name, "qid": qid, "seconds": seconds,
                                "ndcg@10": per_query(run, qrels, "nDCG@10", qids=[qid])[qid],
                                "bm25": per_query(first, qrels, "nDCG@10", qids=[qid])[qid]})
        rows[label] = results
        console.print(label, round(statistics.mean(r["ndcg@10"] for r in results), 4),
                      round(statistics.median(r["seconds"] for r in results), 2), "s")
    first = args.budgets[0]
    summary = {}
    for label, results in rows.items():
        by_domain = {}
        for r in results:
            by_domain.setdefault(r["domain"], []).append(r)
        summary[label] = {
            "ndcg@10": statistics.mean(r["ndcg@10"] for r in results),
            "bm25": statistics.mean(r["bm25"] for r in results),
            "median_seconds": statistics.median(r["seconds"] for r in results),
            "mean_seconds": statistics.mean(r["seconds"] for r in results),
            "per_domain": {d: {"ndcg@10": statistics.mean(r["ndcg@10"] for r in v),
                               "median_seconds": statistics.median(r["seconds"] for r in v)} for d, v in by_domain.items()},
            "p_vs_first": None if label == first else paired_randomization_test(
                [r["ndcg@10"] for r in results], [r["ndcg@10"] for r in rows[first]]),
        }
    result = {"command": "python benchmarks/passage_budget.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("dtype", args.dtype), ("per_domain", args.per_domain))),
        "router": portable_path(args.router), "queries": len(rows[first]), "machine": machine(),
        "seconds": round(time.time() - started), "budgets": summary, "per_query": rows}
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    plot(result, RESULTS / f"{args.name}.png")
    return 0


def write_markdown(result: dict, path: Path) -> None:
    domains = list(next(iter(result["budgets"].values()))["per_domain"])
    lines = [
        "# Passage budget on fit dev data",
        "",
        f"`{result['command']}` ({result['seconds']} s). Router: `{result['router']}`. {result['queries']} fit-dev "
        "queries (the fit's group-aware dev split, by hash), BM25 top-20 candidates handed in whole; the passage "
        "budget cuts each to its first N words or tokens. p: paired randomization test against the first row.",
        "",
        machine_line(result),
        "",
        "| budget | nDCG@10 | p | median s/query | mean s/query | " + " | ".join(domains) + " |",
        "|---|---|---|---|---|" + "---|" * len(domains),
    ]
    for label, row in result["budgets"].items():
        p = "" if row["p_vs_first"] is None else f"{row['p_vs_first']:.3f}"
        lines.append(f"| {label} | {row['ndcg@10']:.4f} | {p} | {row['median_seconds']:.2f} | {row['mean_seconds']:.2f} | "
                     + " | ".join(f"{row['per_domain'][d]['ndcg@10']:.3f}" for d in domains) + " |")
    first = next(iter(result["budgets"].values()))
    lines += ["", f"BM25 on the same queries: {first['bm25']:.4f}.", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["budgets"])
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [result["budgets"][k]["median_seconds"] for k in labels]
    ys = [result["budgets"][k]["ndcg@10"] for k in labels]
    ax.plot(xs, ys, "o-")
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(next(iter(result["budgets"].values()))["bm25"], color="grey", linestyle="--", label="BM25")
    ax.set_xlabel("median seconds per query (rank)")
    ax.set_ylabel("nDCG@10, fit-dev sample")
    ax.set_title("Passage budget: quality against cost")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
