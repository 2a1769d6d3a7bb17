"""GPU check of the CUDA and bfloat16 paths (run on a machine with a GPU; CI never runs it).

1. **Correctness on the device**: on tiny random llama / qwen2 / gemma3 models, the captured
   attention rows equal eager ``output_attentions`` (float32 and bfloat16), the model's
   attention implementation is restored, and the scorer's debiased scores on the device
   match the same model's scores on CPU in float32.
2. **Speed and memory on the device** with SmolLM2-135M's exact architecture and tokenizer
   (random weights: the real weights cannot be fetched there, and latency and memory do not
   depend on the values): our scorer with all heads, with the shipped router's routed heads
   and with its static heads, against a naive reference (two full eager passes with
   ``output_attentions=True``), 20 passages x 100 words, float32 and bfloat16. Every case scores the
   passages whole (the prompt's budget is 100 words, not the default 128 tokens), as the naive pass does.

    python benchmarks/device_check.py --arch-dir DIR --out OUT   # DIR: config.json + tokenizer files

Writes ``OUT/device_check.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from routehead_rag.engine.capture import CaptureRequest, capture_scope, run_capture
from routehead_rag.engine.prompt import PromptConfig
from routehead_rag.engine.scorer import AttentionScorer, ScoringConfig
from routehead_rag.model.backbone import load_backbone

WHOLE = {"max_passage_words": 100, "max_passage_tokens": None}  # the speed inputs are 100-word passages, scored whole

WORDS = ("tide moon ocean gravity water coast wave sun orbit planet energy river city market price "
         "bread recipe player court team science cell protein gene study result method data").split()


def passages(count: int, words: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (count, words), generator=generator)
    return [" ".join(WORDS[i] for i in row.tolist()) for row in picks]


def correctness(device: str) -> list[dict]:
    from transformers import DynamicCache

    from tests.tiny_models import ARCHS, tiny_causal_lm, tiny_tokenizer

    rows = []
    for arch in ARCHS:
        for dtype in (torch.float32, torch.bfloat16):
            tokenizer = tiny_tokenizer()
            model = tiny_causal_lm(arch).to(device=device, dtype=dtype)
            backbone = load_backbone(model, tokenizer=tokenizer)
            ids = torch.randint(3, 400, (1, 96), generator=torch.Generator().manual_seed(1)).to(device)
            original = model.config._attn_implementation
            model.set_attn_implementation("eager")
            try:
                with torch.no_grad():
                    reference = model(ids, output_attentions=True).attentions
            finally:
                model.set_attn_implementation(original)
            start = ids.shape[1] - 8
            layers = list(range(backbone.num_layers))
            request = CaptureRequest(heads_by_layer={layer: None for layer in layers}, row_start=start)
            with capture_scope(backbone.decoder), torch.inference_mode():
                run_capture(backbone.decoder, ids, DynamicCache(), request)
            diff = max(
                float((request.rows[layer][0].float() - reference[layer][0, :, start:, :].float()).abs().max())
                for layer in layers
            )
            rows.append({"arch": arch, "dtype": str(dtype), "max_abs_diff_vs_eager": diff,
                         "attn_implementation_restored": model.config._attn_implementation == original})
        # device float32 scores against CPU float32 scores of the same weights
        cpu_model = tiny_causal_lm(arch)
        gpu_model = tiny_causal_lm(arch).to(device)
        texts = passages(6, 30)
        cpu = AttentionScorer(load_backbone(cpu_model, tokenizer=tiny_tokenizer()), ScoringConfig())
        gpu = AttentionScorer(load_backbone(gpu_model, tokenizer=tiny_tokenizer()), ScoringConfig())
        a = cpu.head_scores("ocean tide moon", texts).debiased
        b = gpu.head_scores("ocean tide moon", texts).debiased.cpu()
        rows.append({"arch": arch, "dtype": "torch.float32", "max_abs_diff_device_vs_cpu_scores": float((a - b).abs().max())})
    return rows


def timed(fn, device: str, repeats: int) -> tuple[float, float]:
    """(median seconds, peak memory growth in MB) of ``fn()`` on ``device``."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.startswith("cuda") else float("nan")
    return statistics.median(times), peak


def speed(arch_dir: Path, router_dir: Path | None, device: str, repeats: int, count: int, words: int) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from routehead_rag.reranker import RouteHeadReranker
    from routehead_rag.router.artifact import read_artifact_config

    rows = []
    query = "What causes the ocean tides?"
    texts = passages(count, words)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(arch_dir)
        model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(arch_dir)
        backbone = load_backbone(model, tokenizer=tokenizer)
        scorer = AttentionScorer(backbone, ScoringConfig(prompt=PromptConfig(**WHOLE)))
        cases = {"ours, all heads": lambda: scorer.passage_scores(query, texts, None)}
        if router_dir is not None:
            config = read_artifact_config(router_dir)
            prompt = config.scoring.prompt.model_copy(update=WHOLE)  # the router's prompt, the same budget
            routed = RouteHeadReranker(model=model, tokenizer=tokenizer, heads=router_dir, prompt=prompt)
            static = RouteHeadReranker(model=model, tokenizer=tokenizer, heads=list(config.static_heads), prompt=prompt)
            cases["ours, routed (router + its heads)"] = lambda: routed.rank(query, texts)
            cases["ours, static (the router's baseline heads)"] = lambda: static.rank(query, texts)
        full = tokenizer(" ".join(texts) + " " + query, return_tensors="pt")["input_ids"].to(device)

        def naive(original=model.config._attn_implementation):
            model.set_attn_implementation("eager")
            try:
                with torch.no_grad():
                    model(full, output_attentions=True)
                    model(full, output_attentions=True)
            finally:
                model.set_attn_implementation(original)

        cases["naive: 2 eager passes, output_attentions"] = naive
        for label, fn in cases.items():
            seconds, peak = timed(fn, device, repeats)
            rows.append({"dtype": str(dtype), "case": label, "median_s": seconds, "peak_mb": peak,
                         "prompt_tokens": int(full.shape[1])})
            print(rows[-1], flush=True)
    return rows


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# Device check: {result['device']} (torch {result['torch']})",
        "",
        "## Capture equals eager `output_attentions` on the device (tiny random models)",
        "",
        "| arch | dtype | max abs diff vs eager | attention implementation restored | device vs CPU scores (float32) |",
        "|---|---|---|---|---|",
    ]
    for row in result["correctness"]:
        if "max_abs_diff_vs_eager" in row:
            lines.append(f"| {row['arch']} | {row['dtype']} | {row['max_abs_diff_vs_eager']:.2e} | "
                         f"{row['attn_implementation_restored']} | |")
        else:
            lines.append(f"| {row['arch']} | {row['dtype']} | | | {row['max_abs_diff_device_vs_cpu_scores']:.2e} |")
    lines += ["", "## Latency and peak memory growth, SmolLM2-135M architecture (random weights), "
              f"{result['speed'][0]['prompt_tokens']}-token prompt", "",
              "| dtype | case | median s | vs naive | peak MB | vs naive |", "|---|---|---|---|---|---|"]
    for dtype in dict.fromkeys(r["dtype"] for r in result["speed"]):
        rows = [r for r in result["speed"] if r["dtype"] == dtype]
        naive = next(r for r in rows if r["case"].startswith("naive"))
        for r in rows:
            lines.append(f"| {dtype} | {r['case']} | {r['median_s']:.4f} | {r['median_s'] / naive['median_s']:.2f}x | "
                         f"{r['peak_mb']:.0f} | {r['peak_mb'] / naive['peak_mb']:.3f}x |")
    lines += ["", f"Produced by `python benchmarks/device_check.py --arch-dir DIR --router "
              f"routehead_rag/routers/smollm2-135m --out OUT` in {result['seconds']:.0f} s."]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch-dir", type=Path, required=True, help="config.json + tokenizer files of the backbone")
    parser.add_argument("--router", type=Path, default=None, help="a router artifact for the routed case")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--passages", type=int, default=20)
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render", type=Path, default=None, help="only write the markdown of this JSON")
    args = parser.parse_args()
    if args.render is not None:
        write_markdown(json.loads(args.render.read_text()), args.render.with_suffix(".md"))
        return 0
    started = time.time()
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "correctness": correctness(args.device),
    }
    print(json.dumps(result["correctness"], indent=1), flush=True)
    result["speed"] = speed(args.arch_dir, args.router, args.device, args.repeats, args.passages, args.words)
    result["seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / "device_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
