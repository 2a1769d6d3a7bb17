"""What the bi-encoder's cosine costs per candidate list, by dtype and batch size (the cost target of the shipped
configuration: its time per query against the routed path alone).

For two fit sets whose passages differ in length (``trec-dl-2019``: short web passages with a few long ones;
``beir-scifact``: abstracts, most at MiniLM's 256-word-piece limit), the first ``--queries`` fit queries and
their BM25 top-20 candidates: seconds per list of :meth:`routehead_rag.bi_encoder.BiEncoder.cosines` (the query
and its 20 candidates, as ``rank`` computes them), for every dtype and batch size, interleaved per list and
taken after one warm-up list. Beside each: the largest difference of its cosines from float32 at batch 32
(sentence-transformers' defaults), over every candidate. What the cosines in bfloat16 do to quality is
measured by leaving domains out (``benchmarks/bi_encoder_weight.py``), not here.

    python benchmarks/bi_encoder_cost.py --queries 10

Writes benchmarks/results/bi_encoder_cost.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, console, machine, machine_line, seeded

from routehead_rag.bi_encoder import CPU_BATCH_SIZE, BiEncoder
from routehead_rag.data.protocol import Role
from routehead_rag.eval.harness import prepare_set
from routehead_rag.model.devices import cpu_has_native_bf16

SETS = ("trec-dl-2019", "beir-scifact")
BATCHES = (1, 2, 4, 8, 16, 32)
REFERENCE = ("float32", 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--name", default="bi_encoder_cost")
    args = parser.parse_args()
    seeded()
    started = time.time()
    dtypes = ["float32", "bfloat16"] if cpu_has_native_bf16() else ["float32"]  # emulated bf16: minutes per list
    encoders = {dtype: BiEncoder("all-MiniLM-L6-v2", "cpu", dtype=dtype) for dtype in dtypes}
    tokenizer = encoders["float32"]._load().tokenizer
    sets = {}
    for name in SETS:
        eval_set = prepare_set(name, role=Role.FIT, max_queries=args.queries)
        lists = [(eval_set.dataset.queries[q], eval_set.passages(eval_set.candidates[q].doc_ids)) for q in eval_set.qids]
        pieces = [len(tokenizer(text)["input_ids"]) for _, texts in lists for text in texts]
        for query, texts in lists[:1]:  # warm-up
            for encoder in encoders.values():
                encoder.cosines(query, texts)
        times: dict[str, list[float]] = {}
        cosines: dict[str, list[torch.Tensor]] = {}
        for query, texts in lists:
            for dtype, encoder in encoders.items():
                for batch in BATCHES:
                    encoder.batch_size = batch
                    begun = time.perf_counter()
                    got = encoder.cosines(query, texts)
                    times.setdefault(f"{dtype} batch {batch}", []).append(time.perf_counter() - begun)
                    cosines.setdefault(f"{dtype} batch {batch}", []).append(got)
        reference = torch.cat(cosines[f"{REFERENCE[0]} batch {REFERENCE[1]}"])
        sets[name] = {
            "queries": len(lists), "candidates_per_list": statistics.mean(len(t) for _, t in lists),
            "word_pieces": {"median": statistics.median(pieces), "max": max(pieces),
                            "share_over_128": sum(p > 128 for p in pieces) / len(pieces)},
            "median_seconds": {k: statistics.median(v) for k, v in times.items()},
            "max_abs_cosine_difference": {k: float((torch.cat(v) - reference).abs().max()) for k, v in cosines.items()},
        }
        console.print(name, {k: round(v, 3) for k, v in sets[name]["median_seconds"].items()})
    result = {"command": f"python benchmarks/bi_encoder_cost.py --queries {args.queries}", "machine": machine(),
              "seconds": round(time.time() - started), "dtypes": dtypes, "batches": list(BATCHES),
              "shipped_cpu_batch_size": CPU_BATCH_SIZE, "sets": sets}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    plot(result, RESULTS / f"{args.name}.png")
    return 0


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# What the bi-encoder's cosine costs per list", "",
             f"`{result['command']}` ({result['seconds']} s, taken alone). all-MiniLM-L6-v2 on the CPU, "
             "`BiEncoder.cosines(query, 20 BM25 candidates)` per fit query, every setting interleaved per list; "
             "median seconds per list, and the largest difference of the cosines from float32 at batch 32 "
             "(sentence-transformers' defaults).", "", machine_line(result), ""]
    for name, s in result["sets"].items():
        w = s["word_pieces"]
        lines += [f"## {name} ({s['queries']} lists; word pieces per passage: median {w['median']:g}, max {w['max']}, "
                  f"{w['share_over_128']:.0%} over 128)", "",
                  "| dtype | " + " | ".join(f"batch {b}" for b in result["batches"]) + " |",
                  "|---|" + "---|" * len(result["batches"])]
        for dtype in result["dtypes"]:
            lines.append(f"| {dtype} s/list | " + " | ".join(
                f"{s['median_seconds'][f'{dtype} batch {b}']:.3f}" for b in result["batches"]) + " |")
            lines.append(f"| {dtype} max cosine diff | " + " | ".join(
                f"{s['max_abs_cosine_difference'][f'{dtype} batch {b}']:.1e}" for b in result["batches"]) + " |")
        lines.append("")
    lines += [f"Shipped: batch {result['shipped_cpu_batch_size']} on a CPU "
              "(`routehead_rag.bi_encoder.CPU_BATCH_SIZE`); dtype `auto` (bfloat16 where the CPU has it natively).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in result["sets"].items():
        for dtype in result["dtypes"]:
            ax.plot(result["batches"], [s["median_seconds"][f"{dtype} batch {b}"] for b in result["batches"]],
                    marker=".", linestyle="-" if dtype == "float32" else "--", label=f"{name}, {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (texts per forward pass)")
    ax.set_ylabel("median seconds per list of 20")
    ax.set_title("all-MiniLM-L6-v2 cosines per candidate list, CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
