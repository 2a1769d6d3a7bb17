"""Check ICR against the reference figures of data/README.md, on their exact inputs, in float32.

trec-dl-2019 (43 queries) and musique-ans-migres200 (first 60 ids): first 20 candidates, passages cut to
100 words, first-stage rank 1 next to the query, SmolLM2-135M in fp32; the wording follows ICR's code per set
(relevance for trec-dl, question for musique). The reference's inputs, not the library's defaults: the prompt
is passed explicitly with the 100-word cut (the default budget is 128 tokens), and musique's candidates are
each pool's first 20 paragraphs in source order, as the reference took them (the protocol's rule since is BM25's
top 20 of the pool).

Every figure is a ranking by ``RouteHeadReranker`` (:func:`routehead_rag.eval.harness.rerank_set`) from one
cached all-heads extraction per query: ICR with the plain "N/A" subtraction (every head), no calibration
(every head, ``subtract_content_free=False``: the same passes' real scores), and the best 4 static heads
chosen leave-one-out on the other queries of the same set.

    python benchmarks/reference_check.py     # writes benchmarks/results/reference_check.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, console, machine, machine_line
from rich.progress import Progress

from routehead_rag import RouteHeadReranker
from routehead_rag.data.beir import CandidateSource
from routehead_rag.data.candidates import Candidates, first_stage_lists
from routehead_rag.data.protocol import PROTOCOL, Role, load_protocol_set
from routehead_rag.engine.prompt import INSTRUCTIONS, PromptConfig
from routehead_rag.eval.harness import EvalSet, extract_set, first_stage_run, rerank_set
from routehead_rag.eval.metrics import evaluate, per_query
from routehead_rag.fit.labelled import build_labelled_set, rank_heads
from routehead_rag.model.backbone import load_backbone
from routehead_rag.offline.extraction import QueryExtraction
from routehead_rag.paths import default_cache_dir

REFERENCE = {  # data/README.md, SmolLM2-135M fp32, same inputs
    "trec-dl-2019": {"queries": 43, "first-stage": 0.5456, "ICR authors masked N/A": 0.5422, "ICR authors plain N/A": 0.5433,
                     "no calibration": 0.4829, "independent re-implementation": 0.5350, "best 4 static heads LOO": 0.5643},
    "musique-ans-migres200": {"queries": 60, "first-stage": 0.2814, "ICR authors masked N/A": 0.5658,
                              "ICR authors plain N/A": 0.5848, "no calibration": 0.3041,
                              "independent re-implementation": 0.5905, "best 4 static heads LOO": 0.6981},
}
ROLES = {"trec-dl-2019": Role.FIT, "musique-ans-migres200": Role.CROSS_DOMAIN_TEST}  # the splits the figures used
PROMPT = PromptConfig(max_passage_words=100, max_passage_tokens=None)  # the reference's passage cut
LOO_HEADS = 4


def reference_set(name: str, data_dir) -> EvalSet:
    """The reference's queries and candidates: a ranking's first 20 (trec-dl-2019's BM25 run), or a pool's
    first 20 paragraphs in source order (musique; its scores only restate that order)."""
    dataset, qids = load_protocol_set(name, ROLES[name], data_dir)
    qids = qids[: REFERENCE[name]["queries"]]
    top_k = PROTOCOL.top_k
    if dataset.candidate_source is CandidateSource.POOL:
        pools = {q: dataset.candidates[q][:top_k] for q in qids}
        lists = {q: Candidates(list(ids), [float(-rank) for rank in range(len(ids))]) for q, ids in pools.items()}
        return EvalSet(dataset, qids, lists, first_stage="source order", top_k=top_k)
    return EvalSet(dataset, qids, first_stage_lists(dataset, qids, top_k), top_k=top_k)


def mean_ndcg(eval_set: EvalSet, run) -> float:
    return evaluate(run, eval_set.dataset.qrels, ["nDCG@10"], qids=eval_set.qids)["nDCG@10"]


def leave_one_out_static(eval_set: EvalSet, extractions: dict[str, QueryExtraction], backbone, prompt) -> float:
    """Each query ranked with the best ``LOO_HEADS`` heads by single-head nDCG@10 on the other queries of the set."""
    qrels, values = eval_set.dataset.qrels, []
    for qid in eval_set.qids:
        rest = [q for q in eval_set.qids if q != qid]
        data = build_labelled_set({q: extractions[q].debiased for q in rest}, {q: extractions[q].doc_ids for q in rest},
                                  qrels)
        heads = [str(h) for h, _ in rank_heads(data)[:LOO_HEADS]]
        one = EvalSet(eval_set.dataset, [qid], {qid: eval_set.candidates[qid]}, eval_set.first_stage, eval_set.top_k)
        reranker = RouteHeadReranker(model=backbone, heads=heads, prompt=prompt)
        ranked = rerank_set(one, reranker, extractions={qid: extractions[qid]})
        values.append(per_query(ranked.run, qrels, "nDCG@10", qids=[qid])[qid])
    return statistics.mean(values)


def check_set(name: str, backbone, instruction: str, data_dir, cache: Path) -> dict:
    """Our figures on one set of the reference table, beside the table's."""
    eval_set = reference_set(name, data_dir)
    prompt = PROMPT.with_instruction(instruction)
    icr = RouteHeadReranker(model=backbone, heads="all", prompt=prompt)
    raw = RouteHeadReranker(model=backbone, heads="all", prompt=prompt, subtract_content_free=False)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{name}: extracting", total=len(eval_set.qids))
        extractions = extract_set(eval_set, icr.scorer, cache, progress=lambda n: progress.advance(task, n))
    # without the subtraction the scorer runs only the real query part: the same passes' real scores
    real_only = {q: QueryExtraction(q, e.doc_ids, e.real, e.real) for q, e in extractions.items()}
    ours = {
        "queries": len(eval_set.qids),
        "first-stage": mean_ndcg(eval_set, first_stage_run(eval_set)),
        "ICR plain N/A (ours)": mean_ndcg(eval_set, rerank_set(eval_set, icr, extractions=extractions).run),
        "no calibration (ours)": mean_ndcg(eval_set, rerank_set(eval_set, raw, extractions=real_only).run),
        f"best {LOO_HEADS} static heads LOO (ours)": leave_one_out_static(eval_set, extractions, backbone, prompt),
    }
    console.print(name, ours)
    return {"ours": ours, "reference": REFERENCE[name], "first_stage": eval_set.first_stage,
            "prompt": prompt.model_dump(mode="json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--instruction", choices=["protocol", *INSTRUCTIONS], default="protocol",
                        help="prompt wording: the protocol's per set (ICR's code: question for multi-hop), or one for all")
    parser.add_argument("--name", default="reference_check", help="output file stem")
    args = parser.parse_args()
    started = time.time()
    backbone = load_backbone(args.model, dtype=args.dtype)
    cache = default_cache_dir()
    checks = {}
    for name in REFERENCE:
        instruction = PROTOCOL.spec(name).instruction if args.instruction == "protocol" else args.instruction
        checks[name] = check_set(name, backbone, instruction, args.data_dir, cache)
    result = {"benchmark": "reference_check", "model": args.model, "dtype": args.dtype, "instruction": args.instruction,
              "checks": checks, "seconds": round(time.time() - started, 1), "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Reference check ({args.model}, {args.dtype}, instruction: {args.instruction})", "",
             "Same inputs as data/README.md's reference table (ICR plain N/A calibration, all heads): first 20 "
             "candidates (musique: each pool's first 20 in source order), passages cut to 100 words. Every figure is "
             "a ranking by `RouteHeadReranker`.", "",
             "| set | queries | figure | ours | reference | ours - reference |", "|---|---|---|---|---|---|"]
    pairs = [("first-stage", "first-stage"), ("ICR plain N/A (ours)", "ICR authors plain N/A"),
             ("no calibration (ours)", "no calibration"),
             (f"best {LOO_HEADS} static heads LOO (ours)", "best 4 static heads LOO")]
    for name, check in checks.items():
        for ours_key, ref_key in pairs:
            ours, ref = check["ours"][ours_key], check["reference"][ref_key]
            lines.append(f"| {name} | {check['ours']['queries']} | {ref_key} | {ours:.4f} | {ref:.4f} | {ours - ref:+.4f} |")
        other = check["reference"]
        lines.append(f"| {name} | | ICR authors masked N/A / independent re-implementation | | "
                     f"{other['ICR authors masked N/A']:.4f} / {other['independent re-implementation']:.4f} | |")
    command = "python benchmarks/reference_check.py" + (
        f" --instruction {args.instruction} --name {args.name}" if args.instruction != "protocol" else "")
    lines += ["", machine_line(result), "", f"Produced by `{command}` in {result['seconds']:.0f} s."]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
