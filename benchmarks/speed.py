"""Speed and memory: our scorer vs a naive reference, same inputs, same run.

Naive reference: two full forward passes of the causal LM (real query, then "N/A") with
eager attention and ``output_attentions=True``, LM head included, then the same per-head
passage sums.  For the 100-passage case the naive reference scores the same windows our
scorer plans (one full prompt of 100 x 100 words exceeds SmolLM2's context).

Every (method, case) runs in a fresh subprocess so that peak-RSS growth over the loaded
model is measured cleanly (a sampler thread reads RSS every 2 ms).

The inputs are the ones the authors' timing used: passages cut to 100 words, not to the library's
default budget of 128 tokens (the prompt is passed explicitly), so the 100-word cases are scored whole
and the ICR row compares with the authors' 3.6 s. The static row sums 4 heads: the shipped router's
static baseline (its first 4) when one ships for the backbone, else 4 heads of the middle layer (only
the depth matters for speed).

    python benchmarks/speed.py                 # CPU: float32 and bfloat16
    python benchmarks/speed.py --device cuda   # GPU: also bf16 and fp32, card named in the JSON

Writes benchmarks/results/speed.{json,md,png} (speed-<device>.* for a non-CPU device).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import machine, machine_line

from routehead_rag.engine.prompt import PromptConfig

HERE = Path(__file__).resolve().parent
AUTHORS_ICR_MEDIAN_S = 3.6  # data/README.md: authors' ICR code, trec-dl-2019, this kind of machine
PROMPT = PromptConfig(max_passage_words=100, max_passage_tokens=None)  # the authors' (and data/README.md's) cut


def exact_word_passages(corpus_texts, count, words=100):
    """``count`` passages of exactly ``words`` words, cut from a stream of real corpus text."""
    stream = " ".join(corpus_texts).split()
    needed = count * words
    if len(stream) < needed:
        raise ValueError("corpus too small for the speed inputs")
    return [" ".join(stream[i * words : (i + 1) * words]) for i in range(count)]


def make_cases(data_dir):
    from routehead_rag.data.beir import load_beir
    from routehead_rag.data.protocol import select_queries

    dataset = load_beir("trec-dl-2019", data_dir=data_dir)
    qids = select_queries(dataset, 3)
    texts = [doc.full_text for doc in list(dataset.corpus.values())[:2000]]
    return {
        "20x100w": [(dataset.queries[q], exact_word_passages(texts[i * 300 :], 20)) for i, q in enumerate(qids)],
        "100x100w": [(dataset.queries[qids[0]], exact_word_passages(texts, 100))],
    }


class PeakRss:
    """Samples this process's RSS in a thread; ``peak`` since the last ``reset``."""

    def __init__(self, interval=0.002):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def current(self):
        return self._process.memory_info().rss

    def reset(self):
        self.peak = self.current()

    def stop(self):
        self._stop.set()
        self._thread.join()


def naive_scores(backbone, scorer, query, passages):
    """Two full eager passes with output_attentions per window; the same per-head sums."""
    import torch

    model = backbone.causal_lm
    prompts = scorer.prompts
    passage_ids = [prompts.cut_passage(p) for p in passages]
    from routehead_rag.engine.scorer import plan_windows

    costs = [prompts.passage_cost(ids, len(passages)) for ids in passage_ids]
    windows = plan_windows(costs, prompts.fixed_token_count(query), scorer._budget)
    out = torch.zeros(backbone.num_layers, backbone.num_heads, len(passages))
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for window in windows:
            layout = prompts.layout([], passage_ids=[passage_ids[i] for i in window])
            per_query = []
            for text in (query, scorer.config.prompt.content_free_query):
                part = prompts.query_part(text, layout.prefix_length)
                ids = torch.tensor([layout.prefix_ids + part.ids], device=backbone.device)
                with torch.no_grad():
                    attentions = model(ids, output_attentions=True).attentions
                sums = torch.stack(
                    [a[0, :, part.span.start : part.span.end, :].float().mean(dim=1) for a in attentions]
                )  # [layer, head, keys]
                del attentions
                per_query.append(torch.stack([sums[..., s.start : s.end].sum(-1) for s in layout.passage_spans], -1))
            out[:, :, window] = (per_query[0] - per_query[1]).cpu()
    finally:
        model.set_attn_implementation(original)
    return out


def static_heads(backbone):
    """4 static heads: the first 4 of the static baseline of the router shipped for the backbone (found by
    fingerprint), else 4 heads of the middle layer (only the depth matters for speed)."""
    from routehead_rag.heads import as_heads
    from routehead_rag.router.artifact import read_artifact_config, shipped_router_for

    shipped = shipped_router_for(backbone.fingerprint())
    if shipped is not None:
        return as_heads(read_artifact_config(shipped).static_heads[:4])
    middle = backbone.num_layers // 2
    return as_heads([(middle, h) for h in range(min(4, backbone.num_heads))])


def worker(args):
    import torch

    from routehead_rag.engine.scorer import AttentionScorer, ScoringConfig
    from routehead_rag.model.backbone import load_backbone

    torch.manual_seed(0)
    cases = make_cases(args.data_dir)[args.case]
    backbone = load_backbone(args.model, dtype=args.dtype, device=args.device)
    scorer = AttentionScorer(backbone, ScoringConfig(prompt=PROMPT))
    heads = None if args.method != "ours-static4" else static_heads(backbone)
    sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)

    def run(query, passages):
        if args.method == "naive":
            return naive_scores(backbone, scorer, query, passages)
        return scorer.head_scores(query, passages, heads).debiased

    # warm-up on a small input, then measure growth over the loaded model
    run(cases[0][0], cases[0][1][:2])
    gc.collect()
    sampler = PeakRss()
    if backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base = sampler.current()
    sampler.reset()
    times, tokens = [], []
    for _ in range(args.repeats):
        for query, passages in cases:
            sync()
            start = time.perf_counter()
            run(query, passages)
            sync()
            times.append(time.perf_counter() - start)
            layout_tokens = sum(
                scorer.prompts.passage_cost(scorer.prompts.cut_passage(p), len(passages)) for p in passages
            ) + scorer.prompts.fixed_token_count(query)
            tokens.append(layout_tokens)
    sampler.stop()
    result = {
        "method": args.method,
        "case": args.case,
        "dtype": args.dtype,
        "device": str(backbone.device),
        "median_s": statistics.median(times),
        "times_s": times,
        "prompt_tokens": statistics.median(tokens),
        "s_per_1k_tokens": statistics.median(t / n * 1000 for t, n in zip(times, tokens)),
        "rss_growth_mb": (sampler.peak - base) / 2**20,
        "threads": torch.get_num_threads(),
    }
    if backbone.device.type == "cuda":
        result["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
        result["card"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result), flush=True)


def icr_trec_latency(args):
    """Median seconds per trec-dl-2019 query of ``rank`` with every head (ICR; first N queries, their BM25 top 20
    cut to 100 words)."""
    import torch

    from routehead_rag import RouteHeadReranker
    from routehead_rag.eval.harness import prepare_set
    from routehead_rag.eval.metrics import evaluate, ranking_to_run
    from routehead_rag.model.backbone import load_backbone

    eval_set = prepare_set("trec-dl-2019", max_queries=args.icr_queries, data_dir=args.data_dir)
    dataset, qids = eval_set.dataset, eval_set.qids
    backbone = load_backbone(args.model, dtype=args.dtype, device=args.device)
    reranker = RouteHeadReranker(model=backbone, heads="all", prompt=PROMPT)
    reranker.rank("warm up", ["a short passage"])

    times, run = [], {}
    for qid in qids:
        documents = eval_set.documents(qid)
        start = time.perf_counter()
        ranked = reranker.rank(dataset.queries[qid], documents)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        run.update(ranking_to_run(qid, ranked.ids()))
    ndcg = evaluate(run, dataset.qrels, ["nDCG@10"], qids=qids)["nDCG@10"]
    print("RESULT " + json.dumps({"method": "icr-trec-dl-2019", "dtype": args.dtype, "device": str(backbone.device),
                                  "queries": len(qids), "median_s": statistics.median(times), "times_s": times,
                                  "ndcg@10": ndcg}), flush=True)


def spawn(args, **overrides):
    command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--repeats", str(args.repeats),
               "--icr-queries", str(args.icr_queries)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    for key, value in overrides.items():
        flag = f"--{key.replace('_', '-')}"
        command += [flag] if value is True else [flag, str(value)]
    print("running", " ".join(command[2:]), file=sys.stderr, flush=True)
    output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in output.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker failed: {output.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--icr-queries", type=int, default=43)
    parser.add_argument("--dtypes", default=None, help="comma list; default float32,bfloat16")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--render", action="store_true", help="only re-render md/png from the JSON in --out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return icr_trec_latency(args) if args.method == "icr-trec-dl-2019" else worker(args)

    suffix = "" if args.device == "cpu" else f"-{args.device}"
    if args.render:
        result = json.loads((args.out / f"speed{suffix}.json").read_text())
        write_markdown(result, args.out / f"speed{suffix}.md")
        plot(result, args.out / f"speed{suffix}.png")
        return 0
    started = time.time()
    dtypes = (args.dtypes or "float32,bfloat16").split(",")
    rows = []
    for dtype in dtypes:
        for case in ("20x100w", "100x100w"):
            # The naive reference runs in float32 only (it takes minutes per query on a CPU);
            # every row's ratio is against it.
            methods = (["naive"] if dtype == dtypes[0] else []) + ["ours-all", "ours-static4"]
            for method in methods:
                rows.append(spawn(args, worker=True, method=method, case=case, dtype=dtype).copy())
    icr = [spawn(args, worker=True, method="icr-trec-dl-2019", dtype=dtype) for dtype in dtypes]
    for row in rows:
        naive = next(r for r in rows if r["method"] == "naive" and r["case"] == row["case"])
        row["latency_vs_naive"] = row["median_s"] / naive["median_s"]
        row["rss_growth_vs_naive"] = row["rss_growth_mb"] / naive["rss_growth_mb"] if naive["rss_growth_mb"] > 0 else None
    for entry in icr:
        entry["vs_authors_icr_3.6s"] = entry["median_s"] / AUTHORS_ICR_MEDIAN_S
    import torch

    result = {
        "benchmark": "speed",
        "model": args.model,
        "device": args.device,
        "card": rows[0].get("card") or machine()["cpu"],
        "machine": machine(),
        "threads": rows[0]["threads"],
        "cases": {"20x100w": "3 trec-dl-2019 queries x 20 passages of exactly 100 words",
                  "100x100w": "1 query x 100 passages of exactly 100 words (windows of <= 4096 tokens)"},
        "rows": rows,
        "icr_trec_dl_2019": icr,
        "targets": {"latency_vs_naive": 0.55, "rss_growth_vs_naive": 0.2, "icr_vs_authors": 0.8},
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"speed{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / f"speed{suffix}.md")
    plot(result, args.out / f"speed{suffix}.png")
    print(f"wrote {args.out}/speed{suffix}.{{json,md,png}}", file=sys.stderr)


def write_markdown(result, path):
    lines = [
        f"# Speed and memory ({result['model']}, {result['device']}: {result['card']}, {result['threads']} threads)",
        "",
        "Naive reference = two full eager passes with `output_attentions=True` (LM head included), in float32;",
        "every ratio is against it (same inputs, same run).",
        "Peak-RSS growth is measured over the loaded model, in a fresh process per row.",
        "",
        "| case | dtype | method | prompt tokens | median s | s / 1k tokens | x naive latency | peak RSS growth MB | x naive memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mem_ratio = f"{r['rss_growth_vs_naive']:.3f}" if r["rss_growth_vs_naive"] is not None else "-"
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['method']} | {r['prompt_tokens']:.0f} | {r['median_s']:.2f} | "
            f"{r['s_per_1k_tokens']:.2f} | {r['latency_vs_naive']:.3f} | {r['rss_growth_mb']:.0f} | {mem_ratio} |"
        )
    lines += ["", "ICR (`rank` with every head) per trec-dl-2019 query, BM25 top 20, passages cut to 100 words:", "",
              "| dtype | queries | median s | x authors' 3.6 s | nDCG@10 (same run) |", "|---|---|---|---|---|"]
    for entry in result["icr_trec_dl_2019"]:
        lines.append(f"| {entry['dtype']} | {entry['queries']} | {entry['median_s']:.2f} | "
                     f"{entry['vs_authors_icr_3.6s']:.3f} | {entry['ndcg@10']:.4f} |")
    lines += ["", f"Targets: latency <= {result['targets']['latency_vs_naive']}x naive, memory growth <= "
              f"{result['targets']['rss_growth_vs_naive']}x naive, ICR <= {result['targets']['icr_vs_authors']}x 3.6 s.",
              "", machine_line(result) if "machine" in result else "",
              "", f"Produced by `python benchmarks/speed.py` in {result['seconds']:.0f} s."]
    path.write_text("\n".join(lines) + "\n")


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['case']}\n{r['dtype']}\n{r['method']}" for r in result["rows"]]
    axes[0].bar(range(len(labels)), [r["median_s"] for r in result["rows"]], color="tab:blue")
    axes[0].set_ylabel("median seconds per query")
    axes[0].set_yscale("log")
    axes[1].bar(range(len(labels)), [r["rss_growth_mb"] for r in result["rows"]], color="tab:orange")
    axes[1].set_ylabel("peak RSS growth (MB)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
    fig.suptitle(f"Speed and memory, {result['model']} on {result['device']} ({result['card']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
