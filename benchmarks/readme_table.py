"""Write the README's benchmark table from the committed results (never retyped by hand).

    python benchmarks/readme_table.py          # rewrite the block in README.md
    python benchmarks/readme_table.py --check  # exit 1 if README.md is out of date

The block sits between the ``<!-- benchmark-table:start -->`` and ``<!-- benchmark-table:end -->``
markers and is built from ``benchmarks/results/routehead.json`` (BM25, ICR, static heads,
RouteHead, the hindsight oracle) and ``benchmarks/results/quality.json`` (the dense baseline).
A unit test checks that the README matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"


def table(results: Path = RESULTS) -> str:
    routehead = json.loads((results / "routehead.json").read_text())
    quality = json.loads((results / "quality.json").read_text())
    dense = {row["dataset"]: row["ndcg@10"].get("dense MiniLM-L6") for row in quality["test"]}
    statics = [s for s in routehead["test"][0]["ndcg@10"] if s.startswith("static") and "chosen on fit" in s]
    columns = ["BM25", "ICR (all heads)", *statics, "RouteHead (paper)", "RouteHead", "oracle (hindsight)"]
    lines = [
        f"nDCG@10 on the protocol test sets, {routehead['model']} ({routehead['dtype']}), first 20 candidates; "
        "static heads and the router are fitted on the protocol's fit splits only; the oracle picks each "
        "query's heads with hindsight (a ceiling, not a method). RouteHead (paper): the routed heads' attention "
        "alone; RouteHead: the shipped configuration (the same router, fused with the first stage as its fit "
        "chose). p: paired randomization test of RouteHead against BM25 / static.",
        "",
        "| set | queries | " + " | ".join(columns) + " | dense MiniLM-L6 | p vs BM25 / static |",
        "|---|---|" + "---|" * (len(columns) + 2),
    ]
    for row in routehead["test"]:
        values = row["ndcg@10"]
        d = dense.get(row["dataset"])
        dense_cell = f"{d:.3f}" if d is not None else "-"
        lines.append(
            f"| {row['dataset']} ({row['role']}) | {row['queries']} | "
            + " | ".join(f"{values[c]:.3f}" for c in columns)
            + f" | {dense_cell} | {row['p_routed_vs']['BM25']:.3f} / {row['p_routed_vs'][statics[0]]:.3f} |"
        )
    for label, values in routehead["average"].items():
        rows = [r for r in quality["test"] if label == "all test sets" or r["role"] == "cross-domain-test"]
        dense_mean = sum(r["ndcg@10"]["dense MiniLM-L6"] for r in rows) / len(rows)
        lines.append(f"| **average, {label}** | | " + " | ".join(f"{values[c]:.3f}" for c in columns) + f" | {dense_mean:.3f} | |")
    speed = routehead["speed"]
    lines += [
        "",
        f"Routed ranking takes {speed['routed_vs_all']:.2f}x the time of all-heads ranking with the same engine "
        f"({speed['dataset']}, median of {speed['queries']} queries); stopping after the deepest routed layer "
        f"skips {speed['forward_share_saved_by_early_stop']:.0%} of the decoder layers. "
        "Details: [`benchmarks/results/routehead.md`](benchmarks/results/routehead.md).",
    ]
    return "\n".join(lines)


def render(readme: str, block: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = parser.parse_args()
    path = ROOT / "README.md"
    current = path.read_text(encoding="utf-8")
    updated = render(current, table())
    if args.check:
        if updated != current:
            print("README.md's benchmark table is out of date: run python benchmarks/readme_table.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
