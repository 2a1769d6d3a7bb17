"""Throughput of batched scoring (``rank_batch``) at batch 1, 4 and 16, and routed scoring against its floor.

* queries per second ranking trec-dl-2020's candidates (BM25 top 20, whole passages handed in, cut to the
  default passage budget of 128 tokens in every row) with every head and with the shipped router,
  ``rank_batch(batch_size=B)`` for B in 1, 4, 16, against the naive two-pass reference (two full eager
  passes with ``output_attentions=True``) at batch 1;
* the floor, as the scale issue defines it: one plain forward pass of the prompt (the passages)
  through the decoder filling a KV cache, stopped after the deepest routed layer, plus the two short
  suffixes (the real query and the content-free one) on that cache, no capture; against routed
  scoring of the same query, with routing (the router's own query-embedding pass) and without.
  The earlier, stricter floor (the whole prompt with the real query in one pass, no second suffix)
  is recorded beside it.

Timings are taken alone (nothing else running); the machine block names the CPU and its bfloat16
support.

    python benchmarks/throughput.py                  # CPU, dtype auto
    python benchmarks/throughput.py --device cuda    # on a GPU: also --dtype float32
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, console, machine, machine_line

from routehead_rag import RouteHeadReranker
from routehead_rag.engine.prompt import PromptConfig
from routehead_rag.eval.harness import prepare_set
from routehead_rag.model.backbone import load_backbone

BATCHES = (1, 4, 16)
BUDGET = PromptConfig().max_passage_tokens  # the default passage budget, the same in every row (a router's too)


def plot(result, path: Path) -> None:
    """Queries per second against batch size, one line per head choice, the naive reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for heads in dict.fromkeys(r["heads"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["heads"] == heads]
        ax.plot([r["batch"] for r in rows], [r["queries_per_second"] for r in rows], marker="o", label=heads)
    ax.axhline(result["naive_queries_per_second"], linestyle="--", color="grey", label="naive two-pass, batch 1")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(BATCHES), [str(b) for b in BATCHES])
    ax.set_xlabel("batch size")
    ax.set_ylabel("queries / s")
    ax.set_title(f"rank_batch throughput ({result['device']}, {result['dtype']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timed(function, repeats: int = 1) -> float:
    best = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        best = elapsed if best is None else min(best, elapsed)
    return best


def naive_seconds(backbone, reranker, query, passages) -> float:
    """Two full eager passes (real and N/A) with output_attentions, per-head passage sums: the reference."""
    model = backbone.causal_lm
    prompts = reranker.scorer.prompts
    layout = prompts.layout(passages)
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        started = time.perf_counter()
        for text in (query, prompts.config.content_free_query):
            part = prompts.query_part(text, layout.prefix_length)
            ids = torch.tensor([layout.prefix_ids + part.ids], device=backbone.device)
            with torch.no_grad():
                attentions = model(ids, output_attentions=True).attentions
            torch.stack([a[0, :, part.span.start : part.span.end].float().mean(dim=1) for a in attentions])
            del attentions
        return time.perf_counter() - started
    finally:
        model.set_attn_implementation(original)


def floor_with_suffixes_seconds(backbone, reranker, query, passages, deepest: int) -> float:
    """The prefix through layers 0..deepest into a KV cache, then the real and the content-free query parts
    on it (the cache cropped back between them): plain forward passes, a forward hook stops each one."""
    from transformers import DynamicCache

    class Stop(Exception):
        pass

    def stop(_module, _args, _output):
        raise Stop

    prompts, config = reranker.scorer.prompts, reranker.scorer.config
    layout = prompts.layout(passages)
    parts = [prompts.query_part(text, layout.prefix_length).ids for text in (query, config.prompt.content_free_query)]
    decoder = backbone.decoder
    cache_name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"  # transformers 5.x
    handle = decoder.layers[deepest].register_forward_hook(stop)
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            cache = DynamicCache()
            for ids in (layout.prefix_ids, *parts):
                try:
                    decoder(input_ids=torch.tensor([ids], device=backbone.device), use_cache=True, **{cache_name: cache})
                except Stop:
                    pass
                surplus = cache.get_seq_length() - layout.prefix_length
                if surplus > 0:
                    cache.crop(-surplus)
        return time.perf_counter() - started
    finally:
        handle.remove()


def floor_seconds(backbone, reranker, query, passages, deepest: int) -> float:
    """One plain forward pass of the whole prompt through layers 0..deepest (a forward hook stops it)."""
    from routehead_rag.engine.capture import run_hidden_states

    prompts = reranker.scorer.prompts
    layout = prompts.layout(passages)
    part = prompts.query_part(query, layout.prefix_length)
    ids = torch.tensor([layout.prefix_ids + part.ids], device=backbone.device)
    started = time.perf_counter()
    with torch.inference_mode():
        run_hidden_states(backbone.decoder, ids, deepest)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--naive-queries", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype, device=args.device)
    eval_set = prepare_set("trec-dl-2020", max_queries=args.queries, data_dir=args.data_dir)
    queries = [eval_set.dataset.queries[q] for q in eval_set.qids]
    documents = [eval_set.passages(eval_set.candidates[q].doc_ids) for q in eval_set.qids]
    result = {"benchmark": "throughput", "device": str(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch."),
              "queries": len(queries), "passage_budget_tokens": BUDGET, "rows": [], "machine": machine()}
    for heads in ("all", "auto"):
        reranker = RouteHeadReranker(model=backbone, heads=heads, max_passage_tokens=BUDGET)
        reranker.rank(queries[0], documents[0])  # warm-up
        for batch in BATCHES:
            seconds = timed(lambda: reranker.rank_batch(queries, documents, batch_size=batch))
            row = {"heads": "every head" if heads == "all" else "routed (shipped router)", "batch": batch,
                   "queries_per_second": len(queries) / seconds, "seconds": seconds}
            result["rows"].append(row)
            console.print(row)
    reranker = RouteHeadReranker(model=backbone, heads="all", max_passage_tokens=BUDGET)
    naive = [naive_seconds(backbone, reranker, q, d) for q, d in zip(queries[: args.naive_queries], documents)]
    result["naive_queries_per_second"] = 1 / statistics.median(naive)
    routed = RouteHeadReranker(model=backbone, max_passage_tokens=BUDGET)
    floors = []
    for query, passages in zip(queries, documents):
        deepest = max(h.layer for h in routed.heads_for(query))
        routing = timed(lambda: routed.heads_for(query))
        ours = timed(lambda: routed.rank(query, passages))
        floor = floor_with_suffixes_seconds(backbone, routed, query, passages, deepest)
        prompt_only = floor_seconds(backbone, routed, query, passages, deepest)
        floors.append({"deepest_layer": deepest, "routed_s": ours, "routing_s": routing, "floor_s": floor,
                       "prompt_only_floor_s": prompt_only, "ratio": ours / floor,
                       "ratio_without_routing": (ours - routing) / floor, "ratio_prompt_only": ours / prompt_only})
    result["floor"] = {"median_ratio": statistics.median(f["ratio"] for f in floors),
                       "median_ratio_without_routing": statistics.median(f["ratio_without_routing"] for f in floors),
                       "median_ratio_prompt_only": statistics.median(f["ratio_prompt_only"] for f in floors),
                       "median_routing_share": statistics.median(f["routing_s"] / f["routed_s"] for f in floors),
                       "per_query": floors}
    batch1 = {r["heads"]: r["queries_per_second"] for r in result["rows"] if r["batch"] == 1}
    for row in result["rows"]:
        row["vs_batch_1"] = row["queries_per_second"] / batch1[row["heads"]]
        row["vs_naive"] = row["queries_per_second"] / result["naive_queries_per_second"]
    result["seconds"] = round(time.time() - started)
    suffix = "" if backbone.device.type == "cpu" else f"-{backbone.device.type}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"throughput{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Throughput: batched scoring, {result['device']}, {result['dtype']}", "",
             f"trec-dl-2020, {len(queries)} queries x 20 candidates, each cut to {BUDGET} tokens; "
             "`rank_batch(batch_size=B)`. "
             f"Naive reference (two full eager passes with output_attentions, batch 1): "
             f"{result['naive_queries_per_second']:.3f} queries/s.", "",
             "| heads | batch | queries / s | vs batch 1 | vs naive |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['heads']} | {row['batch']} | {row['queries_per_second']:.3f} | {row['vs_batch_1']:.2f}x | "
                     f"{row['vs_naive']:.2f}x |")
    floor = result["floor"]
    lines += ["", "Routed scoring against its floor (a plain forward pass of the passages through the deepest routed layer "
              "into a KV cache, plus the real and the content-free query parts on it; no capture): median "
              f"{floor['median_ratio']:.2f}x with routing (the router's query-embedding pass, "
              f"{floor['median_routing_share']:.0%} of the routed time), {floor['median_ratio_without_routing']:.2f}x without; "
              f"against the whole prompt with the real query in one pass and no second suffix, "
              f"{floor['median_ratio_prompt_only']:.2f}x.", "", machine_line(result), "",
              f"Produced by `python benchmarks/throughput.py {' '.join(sys.argv[1:])}` in {result['seconds']} s."]
    (args.out / f"throughput{suffix}.md").write_text("\n".join(lines) + "\n")
    plot(result, args.out / f"throughput{suffix}.png")
    console.print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
