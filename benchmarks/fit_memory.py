"""Peak memory of ``routehead-rag fit`` against the size of the query log.

A synthetic JSONL log of N queries over a shared corpus (beir-scifact's): each query is the first
words of one corpus document (its relevant passage) with 19 other documents drawn at random as
candidates, each cut to its first 30 words (``--words``: what ``fit`` keeps per query depends on the
number of heads and candidates, not on the passages' length, so short passages only make it faster). ``fit`` runs in its own process, from an empty extraction cache, on a random-weight model
with the embedded backbone's attention grid (30 layers x 9 heads, 3 key-value heads, its tokenizer)
but a small hidden size, so extraction is fast while everything ``fit`` keeps per query (heads x
candidates scores, labels, embeddings) has the real shape. Peak RSS is the child's ``ru_maxrss``;
it counts the pages of the memory-mapped labelled set (``fit`` keeps it in an unlinked temporary
file) that were read, which are page cache the kernel reclaims under pressure, so the child's
anonymous memory (``RssAnon`` of ``/proc/PID/status``, sampled every 50 ms) is reported beside it:
that is the memory a fit cannot give back. Each log is fitted twice: with glibc's default allocator
settings (from an empty cache), then with its mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_=131072``,
from the warm cache of the first run): glibc raises that threshold as large buffers are freed and then
keeps freed memory in its heap, so the default figures carry allocator retention as well as data; the
pinned figures are what the fit's data needs.

    python benchmarks/fit_memory.py --words 10      # N = 100, 1,000 and 4,000

Writes benchmarks/results/fit_memory.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import RESULTS, console, machine, machine_line

from routehead_rag.data.beir import load_beir
from routehead_rag.paths import default_data_dir

HIDDEN, HEADS, KV_HEADS, LAYERS = 72, 9, 3, 30


def random_backbone(folder: Path) -> Path:
    """A random llama with the embedded backbone's attention grid and tokenizer, small hidden size."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from routehead_rag.model.gguf_cache import convert_embedded

    embedded = convert_embedded()
    config = AutoConfig.from_pretrained(embedded)
    config.update({"hidden_size": HIDDEN, "intermediate_size": 4 * HIDDEN, "num_attention_heads": HEADS,
                   "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "head_dim": HIDDEN // HEADS})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(folder)
    return folder


def synthetic_log(path: Path, count: int, data_dir: Path, words: int, seed: int = 0) -> Path:
    corpus = load_beir(data_dir / "beir-scifact").corpus
    ids = sorted(corpus)
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for q in range(count):
            relevant, *others = rng.sample(ids, 20)
            query_words = corpus[relevant].text.split()[:12]
            candidates = [{"id": d, "text": corpus[d].as_passage(words)} for d in [relevant, *others]]
            rng.shuffle(candidates)
            handle.write(json.dumps({"id": f"q{q}", "query": " ".join(query_words), "candidates": candidates,
                                     "relevance": {relevant: 1}}) + "\n")
    return path


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return None


class PeakSampler(threading.Thread):
    """Largest ``RssAnon`` and ``RssFile`` of a running process, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval, self.done = pid, interval, threading.Event()
        self.peak = {"RssAnon": 0, "RssFile": 0}

    def run(self) -> None:
        while not self.done.is_set():
            for field in self.peak:
                value = _status_kib(self.pid, field)
                if value is not None:
                    self.peak[field] = max(self.peak[field], value)
            time.sleep(self.interval)


PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measured_fit(log: Path, model: Path, work: Path, extra_env: dict | None = None) -> dict:
    """Run ``routehead-rag fit`` on ``log`` in a child process; its peak RSS, peak anonymous memory and wall time."""
    env = {**os.environ, "ROUTEHEAD_CACHE": str(work / "cache"), **(extra_env or {})}
    command = [sys.executable, "-m", "routehead_rag.cli", "fit", str(log), "--out", str(work / "router"),
               "--model", str(model), "--dtype", "float32", "--quiet"]
    started = time.perf_counter()
    with (work / "stdout").open("wb") as stdout, (work / "stderr").open("wb") as stderr:
        child = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
        sampler = PeakSampler(child.pid)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        sampler.done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    out, err = (work / "stdout").read_text(), (work / "stderr").read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fit failed on {log.name}: {err.strip().splitlines()[-1:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "peak_anonymous_mib": sampler.peak["RssAnon"] / 1024,
            "peak_file_backed_mib": sampler.peak["RssFile"] / 1024, "seconds": seconds, "fit": _without_paths(json.loads(out.strip().splitlines()[-1]))}


def _without_paths(summary: dict) -> dict:
    """The fit's summary line minus where it wrote (a temporary folder of this run)."""
    return {k: v for k, v in summary.items() if k not in ("artifact", "report", "heatmap")}


def library_revision() -> str:
    """The git commit of the ``routehead_rag`` the fits import (``+changes`` when its checkout differs from it)."""
    import routehead_rag

    folder = Path(routehead_rag.__file__).parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([r["queries"] for r in rows], [r["peak_rss_mib"] for r in rows], marker="o", label="peak RSS")
    ax.plot([r["queries"] for r in rows], [r["peak_anonymous_mib"] for r in rows], marker="s", label="peak anonymous")
    ax.plot([r["queries"] for r in rows], [r["pinned_peak_anonymous_mib"] for r in rows], marker="^",
            label="peak anonymous, mmap threshold pinned")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_xlabel("queries in the log")
    ax.set_ylabel("memory of fit (MiB)")
    ax.set_title("fit memory against log size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, action="append", default=None, help="log sizes (default 100, 1000, 4000)")
    parser.add_argument("--words", type=int, default=30, help="words kept of each candidate passage")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="fit_memory", help="file stem of the results (default: fit_memory)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier result of this script (e.g. another library revision's) to set beside this one")
    args = parser.parse_args()
    sizes = args.queries or [100, 1000, 4000]
    data_dir = args.data_dir or default_data_dir()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_backbone(tmp / "model")
        for size in sizes:
            work = tmp / f"fit-{size}"
            work.mkdir()
            log = synthetic_log(work / "log.jsonl", size, data_dir, args.words)
            measured = measured_fit(log, model, work)
            pinned = measured_fit(log, model, work, PINNED)
            rows.append({"queries": size, "log_mib": log.stat().st_size / 2**20, **measured,
                         "pinned_peak_rss_mib": pinned["peak_rss_mib"], "pinned_peak_anonymous_mib": pinned["peak_anonymous_mib"]})
            console.print({k: v for k, v in rows[-1].items() if k != "fit"})
    first, last = rows[0], rows[-1]
    growth = (last["peak_rss_mib"] - first["peak_rss_mib"]) / (last["queries"] - first["queries"]) if len(rows) > 1 else None
    anonymous_growth = ((last["peak_anonymous_mib"] - first["peak_anonymous_mib"]) / (last["queries"] - first["queries"])
                        if len(rows) > 1 else None)
    pinned_growth = ((last["pinned_peak_anonymous_mib"] - first["pinned_peak_anonymous_mib"]) / (last["queries"] - first["queries"])
                     if len(rows) > 1 else None)
    before = rows[-2] if len(rows) > 2 else None  # past the head search's 256-query pieces
    tail_growth = ((last["pinned_peak_anonymous_mib"] - before["pinned_peak_anonymous_mib"]) / (last["queries"] - before["queries"])
                   if before else None)
    result = {"benchmark": "fit_memory", "model": f"random llama, {LAYERS} layers x {HEADS} heads, hidden {HIDDEN}",
              "candidates": 20, "words_per_candidate": args.words, "rows": rows, "ratio_last_vs_first": last["peak_rss_mib"] / first["peak_rss_mib"],
              "anonymous_ratio_last_vs_first": last["peak_anonymous_mib"] / first["peak_anonymous_mib"],
              "kib_per_query": growth * 1024 if growth is not None else None,
              "anonymous_kib_per_query": anonymous_growth * 1024 if anonymous_growth is not None else None,
              "pinned_anonymous_ratio_last_vs_first": last["pinned_peak_anonymous_mib"] / first["pinned_peak_anonymous_mib"],
              "pinned_anonymous_kib_per_query": pinned_growth * 1024 if pinned_growth is not None else None,
              "pinned_anonymous_kib_per_query_last_two": tail_growth * 1024 if tail_growth is not None else None, "seconds": round(time.time() - started),
              "library_revision": library_revision(), "machine": machine()}
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if baseline is not None:
        result["baseline"] = {"file": args.baseline.name, "library_revision": baseline.get("library_revision"),
                              "rows": baseline["rows"],
                              "pinned_anonymous_kib_per_query_last_two": baseline.get("pinned_anonymous_kib_per_query_last_two")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Peak memory of fit against log size", "",
             f"Synthetic JSONL logs over beir-scifact's corpus, 20 candidates x up to {args.words} words per query; {result['model']} "
             "(the embedded backbone's head grid), float32, empty cache, `routehead-rag fit LOG --out ...` in its own process.", "",
             "Peak RSS includes the pages read of the labelled set, which `fit` keeps in a memory-mapped temporary file "
             "(page cache the kernel reclaims); peak anonymous is the memory the fit cannot give back.", "",
             "| queries | log (MiB) | peak RSS (MiB) | peak anonymous (MiB) | peak anonymous, mmap threshold pinned (MiB) | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['queries']} | {r['log_mib']:.1f} | {r['peak_rss_mib']:.0f} | {r['peak_anonymous_mib']:.0f} | "
              f"{r['pinned_peak_anonymous_mib']:.0f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", f"Peak RSS at {last['queries']} queries is {result['ratio_last_vs_first']:.2f}x that at {first['queries']}"
              + (f" (growth {result['kib_per_query']:.0f} KiB per query); peak anonymous memory "
                 f"{result['anonymous_ratio_last_vs_first']:.2f}x ({result['anonymous_kib_per_query']:.0f} KiB per query); "
                 f"with the mmap threshold pinned {result['pinned_anonymous_ratio_last_vs_first']:.2f}x "
                 f"({result['pinned_anonymous_kib_per_query']:.1f} KiB per query). The scores themselves "
                 f"({LAYERS * HEADS} heads x 20 candidates, 10.5 KiB per query in float16) are in the memory-mapped file."
                 if growth is not None else "."),
              *([f"Between the last two sizes ({before['queries']} and {last['queries']} queries, past the head search's "
                 f"pieces of 256 queries), pinned anonymous memory grows {result['pinned_anonymous_kib_per_query_last_two']:.1f} "
                 "KiB per query: what the fit holds per query besides the scores (the log's index of query texts, candidate ids "
                 "and grades, the head labels, the candidates' grades and fused scores, and working arrays that grow with "
                 "the log)."] if before else []),
              "", machine_line(result), "",
              f"Produced by `python benchmarks/fit_memory.py {' '.join(sys.argv[1:])}` in {result['seconds']} s.",
              "", f"![fit memory]({args.name}.png)"]
    if baseline is not None:
        by_size = {r["queries"]: r for r in baseline["rows"]}
        at = lines.index(machine_line(result)) - 1  # before the machine line
        lines[at:at] = ["", f"Against `{args.baseline.name}` (library {baseline.get('library_revision')}, the same script and logs):", "",
                        "| queries | peak anonymous, then -> now (MiB) | pinned, then -> now (MiB) |", "|---|---|---|",
                        *[f"| {r['queries']} | {by_size[r['queries']]['peak_anonymous_mib']:.0f} -> {r['peak_anonymous_mib']:.0f} | "
                          f"{by_size[r['queries']]['pinned_peak_anonymous_mib']:.0f} -> {r['pinned_peak_anonymous_mib']:.0f} |"
                          for r in rows if r["queries"] in by_size]]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(result, args.out / f"{args.name}.png")
    console.print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
