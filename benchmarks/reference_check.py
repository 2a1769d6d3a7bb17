"""Check ICR against the reference figures of data/README.md, on their exact inputs, in float32.

trec-dl-2019 (43 queries) and musique-ans-migres200 (first 60 ids): first 20 candidates,
passages cut to 100 words, first-stage rank 1 next to the query, SmolLM2-135M in fp32;
the wording follows ICR's code per set (relevance for trec-dl, question for musique).

    python benchmarks/reference_check.py     # writes benchmarks/results/reference_check.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import REFERENCE, RESULTS, load_set, machine, machine_line, reference_check, scorers_by_instruction

from routehead_rag.data.protocol import Role
from routehead_rag.engine.prompt import INSTRUCTIONS
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir


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
    scorers = scorers_by_instruction(backbone)
    if args.instruction != "protocol":
        scorers = {n: scorers[args.instruction] for n in INSTRUCTIONS}
    cache = default_cache_dir()
    sets = {"trec-dl-2019": load_set("trec-dl-2019", Role.FIT, args.data_dir, None, scorers, cache),
            "musique-ans-migres200": load_set("musique-ans-migres200", Role.CROSS_DOMAIN_TEST, args.data_dir,
                                              REFERENCE["musique-ans-migres200"]["queries"], scorers, cache)}
    checks = reference_check(sets)
    result = {"benchmark": "reference_check", "model": args.model, "dtype": args.dtype, "instruction": args.instruction,
              "checks": checks, "seconds": round(time.time() - started, 1), "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Reference check ({args.model}, {args.dtype}, instruction: {args.instruction})", "",
             "Same inputs as data/README.md's reference table (ICR plain N/A calibration, all heads).", "",
             "| set | queries | figure | ours | reference | ours - reference |", "|---|---|---|---|---|---|"]
    pairs = [("first-stage", "first-stage"), ("ICR plain N/A (ours)", "ICR authors plain N/A"),
             ("no calibration (ours)", "no calibration"), ("best 4 static heads LOO (ours)", "best 4 static heads LOO")]
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
