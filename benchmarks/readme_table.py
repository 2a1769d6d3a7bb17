"""Write the README's results block and its plot from the committed results (never retyped by hand).

    python benchmarks/readme_table.py          # rewrite the block in README.md and benchmarks/results/quality_vs_time.png
    python benchmarks/readme_table.py --check  # exit 1 if README.md is out of date

The block sits between the ``<!-- benchmark-table:start -->`` and ``<!-- benchmark-table:end -->`` markers and is
built from ``benchmarks/results/test_sets.json`` (the protocol test sets, every configuration ranked by
``RouteHeadReranker``) and ``benchmarks/results/lodo.json`` (leave one domain out). A unit test checks that the
README matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- benchmark-table:start -->", "<!-- benchmark-table:end -->"
PLOT = "quality_vs_time.png"


def quality_table(tests: dict) -> list[str]:
    """The test sets' nDCG@10 table (markdown lines) of a ``test_sets.json`` result: the README's and test_sets.md's."""
    rows, shipped = tests["rows"], tests["shipped_row"]
    lines = [
        "| set | queries | " + " | ".join(rows) + " | p vs BM25 | p vs dense |",
        "|---|---|" + "---|" * len(rows) + "---|---|",
    ]
    for s in tests["sets"]:
        cells = [f"**{s['ndcg@10'][r]:.3f}**" if r == shipped else f"{s['ndcg@10'][r]:.3f}" for r in rows]
        lines.append(f"| {s['dataset']} ({s['role']}) | {s['queries']} | " + " | ".join(cells)
                     + f" | {s['p shipped vs BM25']:.3f} | {s['p shipped vs dense']:.3f} |")
    for scope, label in (("all", "average, all test sets"), ("cross-domain-test", "average, cross-domain")):
        lines.append(f"| **{label}** | | " + " | ".join(f"{tests['averages'][scope][r]:.3f}" for r in rows) + " | | |")
    return lines


def table(results: Path = RESULTS) -> str:
    tests = json.loads((results / "test_sets.json").read_text())
    shipped = tests["shipped_row"]
    cross = tests["averages"]["cross-domain-test"]
    lines = [
        "nDCG@10 on the protocol's test sets (never used for a choice"
        + (f"; the first {tests['max_queries']} queries of each" if tests.get("max_queries") else "")
        + "), BM25 top-20 candidates, every row ranked by "
        f"`RouteHeadReranker` with the shipped router ({tests['router']}); **{shipped}** is what the package ranks with. "
        "p: paired randomization tests of the shipped configuration.",
        "",
        *quality_table(tests),
    ]
    lodo_path = results / "lodo.json"
    if lodo_path.is_file():
        lodo = json.loads(lodo_path.read_text())
        macro = lodo["macro"]
        lines += ["", "Leave one domain out (a router fitted on five fit domains, scored on the sixth; mean over the six "
                  "domains): " + ", ".join(f"{row} {macro[row]:.3f}" for row in lodo["rows"])
                  + ". Details: [`benchmarks/results/lodo.md`](benchmarks/results/lodo.md)."]
    in_domain_path = results / "in_domain.json"
    if in_domain_path.is_file():
        in_domain = json.loads(in_domain_path.read_text())
        lines += ["", "In domain, every test query the protocol names (the 30 above are the first of them): "
                  + "; ".join(f"{name} ({t['queries']} queries) static top-8 {t['ndcg@10']['shipped router: static top-8']:.3f}, "
                              f"shipped {t['ndcg@10']['shipped router: shipped']:.3f}, a router `fit` on the set alone "
                              f"{t['ndcg@10']['set-alone fit: as fitted']:.3f}" for name, t in in_domain["test"].items())
                  + ". Details: [`benchmarks/results/in_domain.md`](benchmarks/results/in_domain.md)."]
    latency = tests.get("latency")
    if latency:
        t = latency["median_seconds"]
        lines += ["", f"Time per query ({latency['dataset']}, 20 candidates, {tests['machine'].get('cpu', 'CPU')}, "
                  f"{tests['machine'].get('torch_threads')} threads): shipped {t['shipped']:.2f} s, "
                  + (f"without the LoRA {t['no LoRA']:.2f} s, " if "no LoRA" in t else "")
                  + (f"the routed attention alone (no bi-encoder) {t['routed path alone']:.2f} s, "
                     if "routed path alone" in t else "")
                  + f"every head (ICR) {t['ICR (all heads)']:.2f} s, dense MiniLM "
                  f"{t['dense MiniLM']:.3f} s. Cross-domain average: shipped {cross[shipped]:.3f}, BM25 {cross['BM25']:.3f}, "
                  f"dense MiniLM {cross['dense MiniLM']:.3f}."]
    dense = any("dense_first_stage" in s for s in tests["sets"])
    lines += ["", f"![quality against time per query](benchmarks/results/{PLOT})", "",
              "Details: [`benchmarks/results/test_sets.md`](benchmarks/results/test_sets.md) (with "
              + ("the dense first stage and " if dense else "") + "the calibration tables)."]
    return "\n".join(lines)


def plot(results: Path = RESULTS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = json.loads((results / "test_sets.json").read_text())
    cross = tests["averages"]["cross-domain-test"]
    t = (tests.get("latency") or {}).get("median_seconds", {})
    points = {"BM25": (0.0, cross["BM25"]), "dense MiniLM": (t.get("dense MiniLM"), cross["dense MiniLM"]),
              "ICR (all heads)": (t.get("ICR (all heads)"), cross["ICR (all heads)"]),
              "RouteHead + fusion": (t.get("routed path alone", t.get("no LoRA")), cross["RouteHead + fusion"]),
              tests["shipped_row"]: (t.get("shipped"), cross[tests["shipped_row"]])}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in points.items():
        if x is None:
            continue
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("seconds per query (20 candidates, CPU)")
    ax.set_ylabel("nDCG@10, cross-domain test average")
    ax.set_title("Quality against time per query")
    fig.tight_layout()
    out = results / PLOT
    fig.savefig(out, dpi=120)
    return out


def render(readme: str, block: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README.md has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    path = ROOT / "README.md"
    readme = path.read_text(encoding="utf-8")
    wanted = render(readme, table())
    if args.check:
        if wanted != readme:
            print("README.md's results block is out of date: run python benchmarks/readme_table.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted, encoding="utf-8")
    plot()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
