"""Write the README's benchmark table from the committed results (never retyped by hand).

    python benchmarks/readme_table.py          # rewrite the block in README.md
    python benchmarks/readme_table.py --check  # exit 1 if README.md is out of date

The block sits between the ``<!-- benchmark-table:start -->`` and ``<!-- benchmark-table:end -->``
markers and is built from ``benchmarks/results/routehead.json`` (BM25, ICR, static heads,
RouteHead, the hindsight oracle), ``benchmarks/results/quality.json`` (the dense baseline) and,
when the shipped router has a query adapter, ``benchmarks/results/adapter.json`` (its rows, used
only if they were measured with the adapter file that ships: same sha256).
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


SHIPPED_CONFIG = ROOT / "routehead_rag" / "routers" / "smollm2-135m" / "config.json"
ADAPTED = "RouteHead + query adapter (shipped)"


def adapter_rows(results: Path) -> dict | None:
    """``adapter.json`` if the shipped router has a query adapter and it was measured with that very file."""
    shipped = json.loads(SHIPPED_CONFIG.read_text())
    path = results / "adapter.json"
    if shipped.get("query_adapter") is None:
        return None
    if not path.is_file():
        raise ValueError("the shipped router has a query adapter but benchmarks/results/adapter.json is missing: "
                         "run python benchmarks/adapter.py")
    adapter = json.loads(path.read_text())
    if adapter.get("adapter_sha256") != shipped["files"]["adapter_model.safetensors"]["sha256"]:
        raise ValueError("benchmarks/results/adapter.json was measured with another adapter than the one that ships: "
                         "run python benchmarks/adapter.py")
    return adapter


def table(results: Path = RESULTS) -> str:
    routehead = json.loads((results / "routehead.json").read_text())
    quality = json.loads((results / "quality.json").read_text())
    adapter = adapter_rows(results)
    adapted = {row["dataset"]: row for row in adapter["test"]} if adapter else {}
    dense = {row["dataset"]: row["ndcg@10"].get("dense MiniLM-L6") for row in quality["test"]}
    statics = [s for s in routehead["test"][0]["ndcg@10"] if s.startswith("static") and "chosen on fit" in s]
    methods = ["BM25", "ICR (all heads)", *statics, "RouteHead (paper)", "RouteHead"]
    oracle = "oracle (hindsight)"
    shipped = ADAPTED if adapter else "RouteHead"
    lines = [
        f"nDCG@10 on the protocol test sets, {routehead['model']} ({routehead['dtype']}), first 20 candidates; "
        "static heads and the router are fitted on the protocol's fit splits only; the oracle picks each "
        "query's heads with hindsight (a ceiling, not a method). RouteHead (paper): the routed heads' attention "
        "alone; RouteHead: the same router fused with the first stage as its fit chose"
        + (f"; {ADAPTED}: that, with the router's query-side LoRA adapter reading the query part (`fit --adapter`), "
           "what the package ranks with. p: paired randomization tests of RouteHead against BM25 / static, and of "
           "the shipped configuration against BM25 / RouteHead without the adapter."
           if adapter else " (the shipped configuration). p: paired randomization test of RouteHead against BM25 / "
           "static."),
        "",
        "| set | queries | " + " | ".join(methods + ([ADAPTED] if adapter else []) + [oracle])
        + " | dense MiniLM-L6 | p RouteHead vs BM25 / static |" + (" p shipped vs BM25 / no adapter |" if adapter else ""),
        "|---|---|" + "---|" * (len(methods) + bool(adapter) + 3 + bool(adapter)),
    ]

    def cells(values: dict, own: float | None) -> str:
        shown = [f"**{values[c]:.3f}**" if c == shipped else f"{values[c]:.3f}" for c in methods]
        if adapter:
            shown.append(f"**{own:.3f}**")
        return " | ".join([*shown, f"{values[oracle]:.3f}"])

    for row in routehead["test"]:
        d = dense.get(row["dataset"])
        own = adapted.get(row["dataset"])
        adapter_p = f" {own['p']['vs BM25']:.3f} / {own['p']['vs shipped, no adapter']:.3f} |" if adapter else ""
        lines.append(
            f"| {row['dataset']} ({row['role']}) | {row['queries']} | "
            + cells(row["ndcg@10"], own["ndcg@10"]["shipped + adapter"] if adapter else None)
            + f" | {f'{d:.3f}' if d is not None else '-'} | {row['p_routed_vs']['BM25']:.3f} / "
            f"{row['p_routed_vs'][statics[0]]:.3f} |" + adapter_p
        )
    for label, values in routehead["average"].items():
        rows = [r for r in quality["test"] if label == "all test sets" or r["role"] == "cross-domain-test"]
        dense_mean = sum(r["ndcg@10"]["dense MiniLM-L6"] for r in rows) / len(rows)
        lines.append(f"| **average, {label}** | | "
                     + cells(values, adapter["average"][label]["shipped + adapter"] if adapter else None)
                     + f" | {dense_mean:.3f} | |" + (" |" if adapter else ""))
    speed = routehead["speed"]
    lines += [
        "",
        f"Routed ranking takes {speed['routed_vs_all']:.2f}x the time of all-heads ranking with the same engine "
        f"({speed['dataset']}, median of {speed['queries']} queries); stopping after the deepest routed layer "
        f"skips {speed['forward_share_saved_by_early_stop']:.0%} of the decoder layers. "
        "Details: [`benchmarks/results/routehead.md`](benchmarks/results/routehead.md).",
    ]
    if adapter:
        latency = adapter["latency"]
        lines[-1] += (f" The query adapter's rows are scored live (the cached extraction is the base model's): "
                      f"[`benchmarks/results/adapter.md`](benchmarks/results/adapter.md); it costs "
                      f"{latency['median_ratio']:.2f}x the routed time per query without it.")
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
