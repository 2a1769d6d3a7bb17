"""The in-domain target (>= static top-8 + 4 points of nDCG@10 on scifact and hotpotqa), three ways.

The protocol's in-domain test is "fit on the same domain's fit split, score its test queries". Two routers per
set: the shipped one (fitted on all six fit domains, this set among them) and one fitted on this set's fit split
alone by ``routehead-rag fit`` itself (the shipped router's command with only this set: what a user who fits on
this domain's logs gets; ``--bi-encoder-weight dev``, the default: 40 unless its dev queries prefer another weight
significantly).

1. **Fit dev** (choices and bounds; never the test sets): on the set's dev queries (the same queries in both fits:
   the split hashes query groups), cached extractions and cosines: BM25, dense all-MiniLM-L6-v2 (the cosine alone),
   each router's static top-8 (attention alone, the target's baseline), its routed heads alone (RouteHead, the
   paper), with its bi-encoder weight and level term (as shipped / as fitted) and at ``v = 40``; the shipped router
   with a per-query weight (``fit --bi-encoder-head`` trained on the six domains' train queries, this set's among
   them); and the best single ``v`` of each router on these dev queries themselves (an oracle: it reads the labels
   it is scored on; the most a weight adapted to the set could add).
2. **Leaving each domain out** (``--fold-routers``: ``benchmarks/lodo.py --keep-routers``' "all queries" fold
   routers): the dev rule that ``fit`` now applies by default, run by the fit's own code
   (:func:`routehead_rag.fit.term_weights.choose_bi_encoder_weight`) on each fold's dev queries, against the fixed
   ``v = 40``, scored on every labelled fit query of the left-out domain (cached extractions, the fit's nDCG@10,
   the fold's level term): whether the rule may be ``fit``'s default without costing domains nobody fitted on.
3. **The test queries** (every one the protocol names, live through ``RouteHeadReranker``): BM25, dense, the shipped
   router's static top-8 and shipped configuration, the set-alone router's static top-8, routed heads alone and
   shipped configuration, with paired randomization tests against each router's own static top-8.

    python benchmarks/in_domain.py --dtype bfloat16 --fold-routers ROUTERS

Writes benchmarks/results/in_domain.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bi_encoder_head import six_domains
from common import RESULTS, console, grouped_bars, machine, machine_line, seeded
from lodo import ndcg_per_query

from routehead_rag import RouteHeadReranker
from routehead_rag.bi_encoder import CHOSEN_BY, DEFAULT_WEIGHT, BiEncoderConfig, load_bi_encoder
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.eval.harness import prepare_set, rerank_set
from routehead_rag.eval.metrics import paired_randomization_test
from routehead_rag.fit.term_weights import choose_bi_encoder_weight, fit_bi_encoder_weight
from routehead_rag.fit.training import route_top_k, split_train_dev
from routehead_rag.heads import Head
from routehead_rag.measures import batched_ndcg
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir
from routehead_rag.recipe import final_scores
from routehead_rag.router.artifact import SHIPPED_ROUTERS, load_artifact

ORACLE_GRID = (0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0)
TARGET = 0.04  # the in-domain target: static top-8 + 4 points
SHIPPED_ROUTER = SHIPPED_ROUTERS / "smollm2-135m"


def fit_alone(name: str, out: Path, dtype: str, cache: Path) -> float:
    """``routehead-rag fit`` on one set's fit split: the shipped router's command with only this set. Seconds."""
    started = time.time()
    command = [sys.executable, "-m", "routehead_rag.cli", "fit", name, "--out", str(out), "--dtype", dtype,
               "--pool-size", "32", "--pool-size", "64", "--max-heads", "4", "--max-heads", "8",
               "--report-dir", str(out.parent), "--storage-dtype", "float32", "--cache-dir", str(cache), "--quiet"]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return time.time() - started


def flat_heads(grid, heads: list[str]) -> torch.Tensor:
    return torch.tensor([grid.flat(Head.parse(head)) for head in heads])  # [k] flat head indices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--fold-routers", type=Path, default=None, help="lodo.py --keep-routers folder (part 2)")
    parser.add_argument("--name", default="in_domain")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    shipped, config = load_artifact(SHIPPED_ROUTER)
    _, pooled, data, embeddings, cosines, domain_of_row = six_domains(backbone, config.scoring,
                                                                      config.query_embedding, cache)
    settings = config.training["settings"]
    groups = [pooled.groups[key] for key in data.qids]
    train, dev = split_train_dev(groups, settings["dev_fraction"], settings["seed"])
    signal = pooled.first_stage_signal(data)  # [query, passage] minus the first-stage rank
    grid = data.grid

    def ndcg(scores: torch.Tensor, rows: torch.Tensor) -> list[float]:  # scores [row, passage]
        return batched_ndcg(scores, data.gains[rows], data.valid[rows], data.ideal_dcg[rows]).tolist()

    def scored(attention: torch.Tensor, rows: torch.Tensor, level: float, v) -> torch.Tensor:  # [row, passage]
        return final_scores(attention[rows], None, None, None, data.valid[rows], level, cosines[rows], v)

    def routed_attention(router, artifact) -> torch.Tensor:  # [query, passage]
        top = route_top_k(router, embeddings, artifact.selection.k, [artifact.selection.depth_cost])[0]
        return data.sum_heads(top).double()

    shipped_attention = routed_attention(shipped, config)
    shipped_static = data.sum_heads(flat_heads(grid, config.static_heads).expand(len(data.qids), -1)).double()
    bi_encoder = BiEncoderConfig(weight=DEFAULT_WEIGHT, chosen_by=CHOSEN_BY)
    head = fit_bi_encoder_weight(shipped, embeddings, shipped_attention, signal, None, cosines, bi_encoder, data,
                                 train, dev, seed=settings["seed"])

    # what fit's dev rule makes of the shipped fit (all six domains' dev queries): the shipped weight, or another
    shipped_choice = choose_bi_encoder_weight(shipped_attention, signal, None, cosines, bi_encoder, data, dev)
    # part 1: fit dev of each in-domain set; part 3: its test queries
    encoder = load_bi_encoder(bi_encoder.model)  # the re-ranker's own (dtype auto, shared)
    sets, tests = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for entry in PROTOCOL.entries_for(Role.IN_DOMAIN_TEST):
            name = entry.name
            alone_dir = Path(scratch) / name
            fit_seconds = fit_alone(name, alone_dir, args.dtype, cache)
            alone, alone_config = load_artifact(alone_dir)
            rows = torch.tensor([i for i in dev.tolist() if data.qids[i].startswith(f"{name}/")])
            mine = [i for i, key in enumerate(data.qids) if key.startswith(f"{name}/")]
            alone_split = split_train_dev([groups[i] for i in mine], settings["dev_fraction"], settings["seed"])[1]
            if sorted(mine[i] for i in alone_split.tolist()) != rows.tolist():
                raise AssertionError(f"{name}: the set-alone fit's dev queries differ from the shipped fit's")
            alone_attention = routed_attention(alone, alone_config)
            alone_static = data.sum_heads(flat_heads(grid, alone_config.static_heads).expand(len(data.qids), -1)).double()
            level, alone_level = config.fusion.level_weight, alone_config.fusion.level_weight
            values = {
                "BM25": ndcg(signal[rows], rows),
                "dense MiniLM": ndcg(cosines[rows], rows),
                "shipped router: static top-8": ndcg(shipped_static[rows], rows),
                "shipped router: RouteHead (paper)": ndcg(shipped_attention[rows], rows),
                "shipped router: shipped (v=40)": ndcg(scored(shipped_attention, rows, level, DEFAULT_WEIGHT), rows),
                "shipped router: v per query (head)": ndcg(scored(shipped_attention, rows, level, head.weights[rows]),
                                                           rows),
                "set-alone fit: static top-8": ndcg(alone_static[rows], rows),
                "set-alone fit: RouteHead (paper)": ndcg(alone_attention[rows], rows),
                "set-alone fit: as fitted": ndcg(
                    scored(alone_attention, rows, alone_level, alone_config.bi_encoder.weight), rows),
                "set-alone fit: v=40": ndcg(scored(alone_attention, rows, alone_level, DEFAULT_WEIGHT), rows),
            }
            oracle = {}
            for label, attention, lvl in (("shipped router", shipped_attention, level),
                                          ("set-alone fit", alone_attention, alone_level)):
                by_v = {v: ndcg(scored(attention, rows, lvl, v), rows) for v in ORACLE_GRID}
                oracle[label] = max(ORACLE_GRID, key=lambda v: statistics.mean(by_v[v]))
                values[f"{label}: best single v (oracle)"] = by_v[oracle[label]]
            sets[name] = {
                "dev_queries": len(rows), "fit_queries": len(mine), "fit_seconds": round(fit_seconds),
                "ndcg@10": {row: statistics.mean(v) for row, v in values.items()},
                "p vs own static": p_vs_own_static(values),
                "oracle_v": oracle,
                "head": {"kept_on_dev": head.bi_encoder.mode == "per_query", "dev": head.dev,
                         "weight_mean": float(head.weights[rows].mean()), "weight_sd": float(head.weights[rows].std())},
                "set_alone_fit": {"bi_encoder": alone_config.bi_encoder.model_dump(mode="json"),
                                  "k": alone_config.selection.k, "depth_cost": alone_config.selection.depth_cost,
                                  "level_weight": alone_level, "static_heads": alone_config.static_heads,
                                  "dev_metrics": alone_config.dev_metrics},
            }
            console.print(name, "dev", {row: round(v, 4) for row, v in sets[name]["ndcg@10"].items()})
            tests[name] = score_test_queries(backbone, name, alone_dir, config.static_heads, alone_config.static_heads,
                                             config.scoring.prompt, encoder, cache)
            console.print(name, "test", {row: round(v, 4) for row, v in tests[name]["ndcg@10"].items()})
    lodo = leave_one_out(args.fold_routers, data, embeddings, cosines, signal, domain_of_row, pooled) \
        if args.fold_routers else None
    command = f"python benchmarks/in_domain.py --dtype {shlex.quote(args.dtype)}" + (
        " --fold-routers ROUTERS" if args.fold_routers else "") + (
        f" --name {shlex.quote(args.name)}" if args.name != "in_domain" else "")
    result = {"command": command,
              "router": "routehead_rag/routers/smollm2-135m", "machine": machine(), "seconds": round(time.time() - started),
              "oracle_grid": list(ORACLE_GRID),
              "shipped_fit_dev_rule": {"kept_v": shipped_choice.bi_encoder.weight, "p": shipped_choice.p_value,
                                       "dev_queries": len(dev), "dev": shipped_choice.dev}, "dev": sets, "test": tests, "lodo": lodo}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    rows = list(next(iter(tests.values()))["ndcg@10"])
    grouped_bars(RESULTS / f"{args.name}.png", list(tests), rows, lambda s, r: tests[s]["ndcg@10"][r],
                 "nDCG@10 (all test queries)", "In-domain test sets: the shipped router and a fit on the set alone",
                 figsize=(10, 4.5))
    return 0


def p_vs_own_static(values: dict[str, list[float]]) -> dict[str, float]:
    """Paired test of each router's rows (per-query nDCG@10) against that router's static top-8."""
    def static_of(row: str) -> list[float]:
        return values["set-alone fit: static top-8" if row.startswith("set-alone") else "shipped router: static top-8"]

    return {row: paired_randomization_test(v, static_of(row)) for row, v in values.items()
            if "static" not in row and row not in ("BM25", "dense MiniLM")}


def score_test_queries(backbone, name: str, alone_dir: Path, shipped_static_heads: list[str], alone_static_heads: list[str],
                       prompt, encoder, cache: Path) -> dict:
    """Part 3: every test query of the set, live through ``RouteHeadReranker`` (cached extractions)."""
    eval_set = prepare_set(name, role=Role.IN_DOMAIN_TEST)
    instruction = instruction_for("auto", name)

    def make(heads, **options):
        return RouteHeadReranker(model=backbone, heads=heads, instruction=instruction, **options)

    rankings = {"BM25": {q: eval_set.candidates[q].doc_ids for q in eval_set.qids}, "dense MiniLM": {}}
    for q in eval_set.qids:
        ids = eval_set.candidates[q].doc_ids
        cosine = encoder.cosines(eval_set.dataset.queries[q], eval_set.passages(ids))
        rankings["dense MiniLM"][q] = [ids[i] for i in torch.argsort(-cosine, stable=True).tolist()]
    configurations = {
        "shipped router: static top-8": make(list(shipped_static_heads), prompt=prompt),
        "shipped router: shipped": make(SHIPPED_ROUTER),
        "set-alone fit: static top-8": make(list(alone_static_heads), prompt=prompt),
        "set-alone fit: RouteHead (paper)": make(alone_dir, fuse_first_stage=False, scale_score=False, bi_encoder=False),
        "set-alone fit: as fitted": make(alone_dir),
    }
    for row, reranker in configurations.items():
        ranked = rerank_set(eval_set, reranker, cache)
        rankings[row] = {q: r.ids() for q, r in ranked.rankings.items()}
    per = {row: ndcg_per_query(eval_set, r) for row, r in rankings.items()}
    values = {row: [per[row][q] for q in eval_set.qids] for row in rankings}
    return {"queries": len(eval_set.qids), "ndcg@10": {row: statistics.mean(v) for row, v in values.items()},
            "p vs own static": p_vs_own_static(values),
            "p set-alone vs shipped": paired_randomization_test(values["set-alone fit: as fitted"],
                                                                values["shipped router: shipped"])}


def leave_one_out(folder: Path, data, embeddings, cosines, signal, domain_of_row, pooled) -> dict:
    """Part 2: ``fit``'s dev rule for the bi-encoder weight on each fold's dev queries, scored on the left-out
    domain's labelled fit queries against the fixed ``v = 40``."""
    bi_encoder = BiEncoderConfig(weight=DEFAULT_WEIGHT, chosen_by=CHOSEN_BY)
    folds, pooled_values = {}, {"v=40": [], "v chosen on the fold's dev": []}
    for domain in PROTOCOL.domains(Role.FIT):
        router, config = load_artifact(folder / f"all-queries-without-{domain.replace(' ', '-')}")
        settings = config.training["settings"]
        rows = torch.tensor([i for i, d in enumerate(domain_of_row) if d != domain])
        out = torch.tensor([i for i, d in enumerate(domain_of_row) if d == domain])
        _, dev = (rows[r] for r in split_train_dev([pooled.groups[data.qids[i]] for i in rows.tolist()],
                                                   settings["dev_fraction"], settings["seed"]))
        top = route_top_k(router, embeddings, config.selection.k, [config.selection.depth_cost])[0]
        attention = data.sum_heads(top).double()  # [query, passage]
        choice = choose_bi_encoder_weight(attention, signal, None, cosines, bi_encoder, data, dev)
        level = config.fusion.level_weight

        def left_out(v: float) -> list[float]:
            scores = final_scores(attention[out], None, None, None, data.valid[out], level, cosines[out], v)
            return batched_ndcg(scores, data.gains[out], data.valid[out], data.ideal_dcg[out]).tolist()

        fixed, chosen = left_out(DEFAULT_WEIGHT), left_out(choice.bi_encoder.weight)
        folds[domain] = {"left_out_queries": len(out), "dev_queries": len(dev), "chosen_v": choice.bi_encoder.weight,
                         "dev_best_v": max(choice.dev, key=choice.dev.get), "p_on_dev": choice.p_value,
                         "v=40": statistics.mean(fixed), "v chosen on the fold's dev": statistics.mean(chosen),
                         "p": paired_randomization_test(chosen, fixed)}
        pooled_values["v=40"] += fixed
        pooled_values["v chosen on the fold's dev"] += chosen
    return {"folds": folds, "pooled": {row: statistics.mean(v) for row, v in pooled_values.items()},
            "pooled_queries": len(pooled_values["v=40"]),
            "p": paired_randomization_test(pooled_values["v chosen on the fold's dev"], pooled_values["v=40"])}


def fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3f}"


def ndcg_table(columns: dict[str, dict]) -> list[str]:
    """A row per configuration, a column pair (nDCG@10, p against its own static top-8) per set."""
    rows = list(next(iter(columns.values()))["ndcg@10"])
    lines = ["| row | " + " | ".join(f"{label} | p" for label in columns) + " |", "|---|" + "---|---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{c['ndcg@10'][row]:.3f} | {fmt_p(c['p vs own static'].get(row))}"
                                                for c in columns.values()) + " |")
    return lines


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# The in-domain target: the shipped router and a fit on the set alone", "",
        f"`{result['command']}` ({result['seconds']} s; ROUTERS: the \"all queries\" fold routers of "
        "`benchmarks/lodo.py --keep-routers`, each fitted on five fit domains). nDCG@10, BM25 top-20 candidates. Target: a configuration's "
        "static top-8 + 4 points. p: paired randomization tests against the same router's static top-8. Rows marked "
        "oracle choose `v` on the queries they are scored on: bounds, not configurations.", "",
        machine_line(result), "",
        "## The test queries (every one the protocol names; no choice was made on them)", "",
    ]
    tests = result["test"]
    lines += ndcg_table({f"{name} ({t['queries']} q)": t for name, t in tests.items()})
    lines.append("| **target: shipped router's static + 4 / set-alone static + 4** | " + " | ".join(
        f"{t['ndcg@10']['shipped router: static top-8'] + TARGET:.3f} / "
        f"{t['ndcg@10']['set-alone fit: static top-8'] + TARGET:.3f} | " for t in tests.values()) + "|")
    lines += ["", "Set-alone fit as fitted against the shipped configuration: " + "; ".join(
        f"{name} p = {t['p set-alone vs shipped']:.3f}" for name, t in tests.items()) + ".", "",
        "## Fit dev queries (the same queries in both fits)", ""]
    dev = result["dev"]
    lines += ndcg_table({f"{name} ({s['dev_queries']} dev q)": s for name, s in dev.items()})
    for name, s in dev.items():
        f = s["set_alone_fit"]
        lines += ["", f"{name}: set-alone fit of {s['fit_queries']} queries in {s['fit_seconds']} s: k {f['k']}, depth "
                  f"cost {f['depth_cost']:g}, level {f['level_weight']:g}, bi-encoder weight {f['bi_encoder']['weight']:g} "
                  f"({f['bi_encoder']['chosen_by']}); oracle v: " + ", ".join(f"{k} {v:g}" for k, v in s["oracle_v"].items())
                  + f"; per-query head (six domains, dev {', '.join(f'{m} {x:.4f}' for m, x in s['head']['dev'].items())}, "
                  f"kept: {s['head']['kept_on_dev']}): v mean {s['head']['weight_mean']:.1f}, sd {s['head']['weight_sd']:.1f}."]
    rule = result["shipped_fit_dev_rule"]
    lines += ["", f"`fit`'s dev rule on the shipped fit (all six domains, {rule['dev_queries']} dev queries, no level "
              f"term): keeps v = {rule['kept_v']:g} (dev nDCG@10 by weight: "
              + ", ".join(f"{float(v):g} {x:.4f}" for v, x in rule["dev"].items())
              + ("" if rule["p"] is None else f"; best against 40: p = {rule['p']:.3f}") + ")."]
    lodo = result.get("lodo")
    if lodo:
        lines += ["", "## Leaving each domain out: `fit`'s dev rule for the bi-encoder weight against the fixed v = 40", "",
                  "Every labelled fit query of the left-out domain, the fold router's cached extractions and level term.", "",
                  "| left-out domain | queries | dev best v | p on dev | v kept | v=40 | v chosen on the fold's dev | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for domain, f in lodo["folds"].items():
            lines.append(f"| {domain} | {f['left_out_queries']} | {f['dev_best_v']:g} | {fmt_p(f['p_on_dev'])} | "
                         f"{f['chosen_v']:g} | {f['v=40']:.4f} | {f['v chosen on the fold' + chr(39) + 's dev']:.4f} | "
                         f"{f['p']:.3f} |")
        p = lodo["pooled"]
        lines.append(f"| **pooled** | {lodo['pooled_queries']} | | | | {p['v=40']:.4f} | "
                     f"{p['v chosen on the fold' + chr(39) + 's dev']:.4f} | {lodo['p']:.3f} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
