"""What explaining costs: ``RouteHeadReranker.explain`` against ``rank`` on the same inputs, same run.

For each query of a protocol set (20 BM25 candidates each, the passage budget of the options), with the
shipped router (``heads="auto"``) and with every head (``"all"``): the best of ``--repeats`` timings of
``rank(query, passages)`` and of ``explain(query, passages)`` (attended words for the 5 best passages, the
default), interleaved so that drift hits both alike, and ``explain(..., attended="all")`` as a third row.
Every explanation's ranking is checked against ``rank``'s. The target (issue 23): explain <= 1.15x rank.

    python benchmarks/explain_cost.py                      # CPU, the embedded SmolLM2-135M, trec-dl-2020
    python benchmarks/explain_cost.py --device cuda        # on a GPU (explain_cost-cuda.*)

Writes benchmarks/results/explain_cost.{json,md,png}. ``--model`` takes a folder too (``--out`` elsewhere then:
a quick check of this script on a tiny model is not a result).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, console, machine, machine_line

from routehead_rag import RouteHeadReranker
from routehead_rag.eval.harness import prepare_set
from routehead_rag.model.backbone import load_backbone

TARGET = 1.15
HEAD_CHOICES = {"auto": "heads=\"auto\" (the shipped router)", "all": "heads=\"all\""}


def timed(function) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def same_ranking(explanation, ranked) -> bool:
    return [(r.index, r.score) for r in explanation.ranking] == [(r.index, r.score) for r in ranked]


def measure(reranker, query, passages, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of rank, explain and explain(attended="all"), interleaved."""
    calls = {"rank": lambda: reranker.rank(query, passages), "explain": lambda: reranker.explain(query, passages),
             "explain_all": lambda: reranker.explain(query, passages, attended="all")}
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], timed(call))
    if not same_ranking(reranker.explain(query, passages), reranker.rank(query, passages)):
        raise SystemExit(f"explain's ranking differs from rank's for {query!r}: a bug, not a result")
    return {**{f"{name}_s": seconds for name, seconds in best.items()},
            "ratio": best["explain"] / best["rank"], "ratio_all": best["explain_all"] / best["rank"]}


def summarise(rows: list[dict]) -> dict:
    ratios = sorted(r["ratio"] for r in rows)
    return {
        "queries": len(rows),
        "median_ratio": statistics.median(ratios),
        "p90_ratio": ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))],
        "total_ratio": sum(r["explain_s"] for r in rows) / sum(r["rank_s"] for r in rows),
        "median_ratio_all": statistics.median(r["ratio_all"] for r in rows),
        "median_rank_s": statistics.median(r["rank_s"] for r in rows),
        "median_explain_s": statistics.median(r["explain_s"] for r in rows),
    }


def plot(result: dict, path: Path) -> None:
    """Per-query explain/rank ratio, one box per head choice and attended setting, the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, data = [], []
    for name, block in result["heads"].items():
        labels += [f"{name}\nattended=5", f"{name}\nattended=all"]
        data += [[r["ratio"] for r in block["per_query"]], [r["ratio_all"] for r in block["per_query"]]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.axhline(TARGET, linestyle="--", color="firebrick", label=f"target {TARGET}x")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("explain time / rank time")
    ax.set_title(f"Cost of explain ({result['set']}, {result['device']}, {result['dtype']})")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"# Cost of explain: `explain` vs `rank`, {result['device']}, {result['dtype']}", "",
             f"{result['set']}, {result['queries']} queries x {result['candidates']} BM25 candidates, the default "
             f"passage budget; best of {result['repeats']} timings per call, interleaved. Attended words for the 5 "
             f"best passages (the default) and for all. Target: explain <= {TARGET}x rank.", "",
             "| heads | median rank s | median explain s | median ratio | p90 ratio | total ratio | median ratio, attended=all | target met |",
             "|---|---|---|---|---|---|---|---|"]
    for name, block in result["heads"].items():
        s = block["summary"]
        met = "yes" if s["median_ratio"] <= TARGET else "no"
        lines.append(f"| {name} | {s['median_rank_s']:.3f} | {s['median_explain_s']:.3f} | {s['median_ratio']:.3f} | "
                     f"{s['p90_ratio']:.3f} | {s['total_ratio']:.3f} | {s['median_ratio_all']:.3f} | {met} |")
    lines += ["", machine_line(result), "", f"Command: `{result['command']}` ({result['seconds']} s).", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--set", default="trec-dl-2020")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.time()
    backbone = load_backbone(args.model, dtype=args.dtype, device=args.device)
    eval_set = prepare_set(args.set, max_queries=args.queries, top_k=args.candidates, data_dir=args.data_dir)
    inputs = [(eval_set.dataset.queries[q], eval_set.documents(q)) for q in eval_set.qids]  # (doc id, text) pairs
    result = {"benchmark": "explain_cost", "model": args.model, "set": eval_set.name, "device": str(backbone.device),
              "dtype": str(backbone.dtype).removeprefix("torch."), "queries": len(inputs), "candidates": args.candidates,
              "repeats": args.repeats, "target": TARGET, "heads": {}, "machine": machine(),
              "command": "python benchmarks/explain_cost.py " + " ".join(sys.argv[1:])}
    for heads, name in HEAD_CHOICES.items():
        reranker = RouteHeadReranker(model=backbone, heads=heads)
        reranker.explain(*inputs[0]), reranker.rank(*inputs[0])  # warm-up
        rows = [measure(reranker, query, passages, args.repeats) for query, passages in inputs]
        name = f"{name}: {reranker.resolved_strategy.describe()}"  # what "auto" resolved to
        result["heads"][name] = {"summary": summarise(rows), "per_query": rows}
        console.print(name, result["heads"][name]["summary"])
    result["seconds"] = round(time.time() - started)
    suffix = "" if backbone.device.type == "cpu" else f"-{backbone.device.type}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"explain_cost{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"explain_cost{suffix}.md").write_text(markdown(result))
    plot(result, args.out / f"explain_cost{suffix}.png")
    console.print(f"wrote {args.out / f'explain_cost{suffix}'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
