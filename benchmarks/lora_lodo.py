"""Leave one domain out for the LoRA choices, at one reduced budget applied to every choice alike.

A full leave-one-domain-out refit with LoRA training is too slow for a 2-core CPU (a train query takes
seconds, a fit has thousands), so every choice here gets the same reduced budget per fold: the fold's router
(fitted on the other five domains, as in ``lodo.py``, with the bi-encoder at its shipped weight as ``fit`` adds
it), then a LoRA trained on ``--train-queries`` of its train
queries (mixed over the five domains) for ``--epochs`` epochs, chosen on ``--dev-queries`` of its dev queries
(epoch 0, no LoRA, can win: then none is kept), scored on ``--eval-queries`` queries of the left-out domain
(the first by hash) live with the LoRA, beside the same router without it (what the fit would ship without a
LoRA). Choices compared: no LoRA, the query scope, the prompt scope (rank 8, alpha 16, attention and MLP
projections of layers 0 to the deepest routed layer, AdamW ``--lr``), each trained and chosen on the fused score
users get (the bi-encoder's term included). Paired randomization tests per fold and pooled. Choices are made here
and on fit dev data, never on the test sets.

``--fold-routers`` (``lodo.py --keep-routers``'s folder) trains each scope's LoRA for the fold's router as it was
fitted on the other five domains (``routehead_rag.fit.pipeline.train_lora_for_router``: the same split, routes,
fusion and bi-encoder term) instead of refitting the router for every scope, which saves a router fit per fold and
scope (about 12 min on 2 cores) and makes "no LoRA" exactly the LODO figure's router; the level weight and
calibration are then the router's, not refitted for the LoRA (ranks move little: the level term is small).

    python benchmarks/lora_lodo.py --dtype bfloat16
    python benchmarks/lora_lodo.py --dtype bfloat16 --fold-routers ROUTERS

Writes benchmarks/results/lora_lodo.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, console, grouped_bars, machine, machine_line, seeded

from routehead_rag import RouteHeadReranker
from routehead_rag.bi_encoder import CHOSEN_BY, DEFAULT_WEIGHT, BiEncoderConfig
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.engine.embedding import QueryEmbeddingConfig
from routehead_rag.eval.harness import prepare_set, rerank_set
from routehead_rag.eval.metrics import paired_randomization_test, per_query, rankings_to_run
from routehead_rag.fit.lora import LoraTrainingConfig
from routehead_rag.fit.pipeline import run_fit, train_lora_for_router
from routehead_rag.fit.records import FitRecords
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import beir_source
from routehead_rag.fit.training import TrainingConfig
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir
from routehead_rag.router.artifact import save_artifact
from routehead_rag.strategy import RoutedHeads

SEARCHES = [SearchConfig(pool_size=p, max_heads=h) for p in (32, 64) for h in (4, 8)]


def sample(qids, count: int) -> list[str]:
    return sorted(qids, key=lambda q: hashlib.sha256(f"eval:{q}".encode()).hexdigest())[:count]


def write(args, rows, folds, pooled, started) -> None:
    """benchmarks/results/<name>.{json,md} of the folds finished so far."""
    keys = list(pooled["no LoRA"])
    result = {"command": "python benchmarks/lora_lodo.py --dtype " + args.dtype
              + f" --train-queries {args.train_queries} --dev-queries {args.dev_queries} --eval-queries "
              f"{args.eval_queries} --epochs {args.epochs} --lr {args.lr:g} --scopes {' '.join(args.scopes)}"
              + (" --fold-routers ROUTERS" if args.fold_routers is not None else ""),
              "machine": machine(), "seconds": round(time.time() - started), "rows": rows, "folds": folds,
              "pooled": {**{row: statistics.mean(pooled[row][k] for k in keys) for row in rows},
                         **{f"p {row} vs no LoRA": paired_randomization_test(
                             [pooled[row][k] for k in keys], [pooled["no LoRA"][k] for k in keys]) for row in rows[1:]},
                         "queries": len(keys)}}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    lines = ["# Leave one domain out: the LoRA choices at one reduced budget", "",
             f"`{result['command']}` ({result['seconds']} s"
             + ("; ROUTERS: the fold routers of `benchmarks/lodo.py --keep-routers`, fitted with the bi-encoder"
                if args.fold_routers is not None else "") + "). Per fold: the router fitted on the other five domains, a "
             "LoRA trained on a sample of its train queries and chosen on a sample of its dev queries (epoch 0 = no "
             "LoRA can win), scored live on a sample of the left-out domain's queries; the same budget for every "
             "choice. nDCG@10, fused and calibrated as shipped. p: paired randomization test against the router "
             "without a LoRA. A scope's row is what a fit with that choice ships: the router alone where its LoRA did not "
             "beat it on dev (kept: no); its \"trained\" row scores the trained LoRA whatever dev said (with "
             "ROUTERS), which checks dev's choice.", "", machine_line(result), "",
             "| left-out domain | queries | " + " | ".join(rows) + " | " + " | ".join(f"p {r}" for r in rows[1:])
             + " | kept (dev base -> LoRA) |",
             "|---|---|" + "---|" * (2 * len(rows) - 1) + "---|"]
    for domain, fold in folds.items():
        kept = "; ".join(f"{scope}: {'yes' if t['kept'] else 'no'} ({t['dev_base'] or 0:.3f} -> {t['dev_lora'] or 0:.3f})"
                         for scope, t in fold["trained"].items())
        lines.append(f"| {domain} | {fold['queries']} | " + " | ".join(f"{fold[r]:.3f}" for r in rows) + " | "
                     + " | ".join(f"{fold[f'p {r} vs no LoRA']:.3f}" for r in rows[1:]) + f" | {kept} |")
    p = result["pooled"]
    lines.append(f"| **all sampled queries** | {p['queries']} | " + " | ".join(f"**{p[r]:.3f}**" for r in rows) + " | "
                 + " | ".join(f"{p[f'p {r} vs no LoRA']:.3f}" for r in rows[1:]) + " | |")
    seconds = {scope: [f["trained"][scope]["seconds_per_train_query"] for f in folds.values()
                       if f["trained"][scope]["seconds_per_train_query"]] for scope in args.scopes}
    lines += ["", "Seconds per train query (median over folds): "
              + ", ".join(f"{scope} scope {statistics.median(v):.2f} s" for scope, v in seconds.items() if v) + "."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(result, RESULTS / f"{args.name}.png")


def plot(result: dict, path: Path) -> None:
    """nDCG@10 of every row per left-out domain and pooled, as bars."""
    values = {**result["folds"], "all sampled queries": result["pooled"]}
    grouped_bars(path, list(values), result["rows"], lambda group, row: values[group][row],
                 "nDCG@10, left-out domain", "Leave one domain out: LoRA choices at one reduced budget",
                 figsize=(9, 4), tick_fontsize=7, rotation=15)

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--domains", nargs="*", default=None)
    parser.add_argument("--scopes", nargs="+", default=["query", "prompt"], choices=["query", "prompt"])
    parser.add_argument("--train-queries", type=int, default=200)
    parser.add_argument("--dev-queries", type=int, default=80)
    parser.add_argument("--eval-queries", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--fold-routers", type=Path, default=None,
                        help="lodo.py --keep-routers folder: train each LoRA for the fold's router instead of refitting it")
    parser.add_argument("--name", default="lora_lodo")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    domains = PROTOCOL.domains(Role.FIT)
    sources = {name: beir_source(name) for names in domains.values() for name in names}
    # "<scope> LoRA": what a fit with that choice ships (the router alone where its LoRA did not beat it on dev);
    # "<scope> LoRA, trained": the trained LoRA whatever dev said (with --fold-routers), to check dev's choice
    rows = ["no LoRA", *[f"{scope} LoRA" for scope in args.scopes]]
    if args.fold_routers is not None:
        rows += [f"{scope} LoRA, trained" for scope in args.scopes]
    folds, pooled = {}, {row: {} for row in rows}
    with tempfile.TemporaryDirectory() as scratch:
        for domain, names in domains.items():
            if args.domains and domain not in args.domains:
                continue
            fold_start = time.time()
            training = [s for n, s in sources.items() if n not in names]
            scores = {row: {} for row in rows}
            trained = {}
            for scope in args.scopes:
                scope_start = time.time()
                lora = LoraTrainingConfig(ranks=(8,), learning_rates=(args.lr,), epochs=args.epochs, scope=scope,
                                          train_queries=args.train_queries, dev_queries=args.dev_queries)
                if args.fold_routers is not None:
                    folder = args.fold_routers / f"all-queries-without-{domain.replace(' ', '-')}"
                    if not (folder / "config.json").is_file():
                        raise SystemExit(f"{folder}: no fold router; run benchmarks/lodo.py --keep-routers "
                                         f"{args.fold_routers}")
                    fit = train_lora_for_router(backbone, folder, training, lora, Path(scratch) / "checkpoints")
                    plain = RoutedHeads.from_folder(folder).resolve(backbone)  # the router with the trained LoRA
                    artifact = save_artifact(Path(scratch) / f"{scope}-{domain}", plain.router,
                                             plain.config.model_copy(update={"lora": fit.last.config}),
                                             "a fold router with a LoRA trained by lora_lodo.py\n", fit.last)
                    trained[scope] = {"kept": fit.lora is not None, "dev_base": fit.base_dev_ndcg,
                                      "dev_lora": fit.dev_ndcg, "epoch": fit.epoch,
                                      "seconds_per_train_query": fit.seconds_per_train_query}
                else:
                    fitted = run_fit(backbone, training, Path(scratch) / f"{scope}-{domain}", search=SEARCHES,
                                     training=TrainingConfig(), cache_dir=cache, storage_dtype="float32",
                                     query_embedding=QueryEmbeddingConfig(layer=backbone.num_layers // 2),
                                     report_dir=Path(scratch) / "reports", lora=lora,
                                     bi_encoder=BiEncoderConfig(weight=DEFAULT_WEIGHT, chosen_by=CHOSEN_BY))
                    record = FitRecords.of(fitted.config).training.lora
                    artifact = fitted.artifact
                    trained[scope] = {"kept": fitted.config.lora is not None, "dev_base": record.base_dev_ndcg,
                                      "dev_lora": record.dev_ndcg, "epoch": record.chosen_epoch,
                                      "seconds_per_train_query": record.seconds_per_train_query}
                trained[scope]["seconds_to_train"] = round(time.time() - scope_start)
                for name in names:
                    eval_set = prepare_set(name, role=Role.FIT)
                    eval_set.qids = sample(eval_set.qids, max(1, args.eval_queries // len(names)))
                    instruction = instruction_for("auto", name)
                    scored_row = f"{scope} LoRA, trained" if args.fold_routers is not None else f"{scope} LoRA"
                    variants = {scored_row: RouteHeadReranker(model=backbone, heads=artifact, instruction=instruction)}
                    if scope == args.scopes[0]:  # the router alone is the same in every scope's fit
                        variants["no LoRA"] = RouteHeadReranker(model=backbone, heads=artifact,
                                                                instruction=instruction, lora=False)
                    for row, reranker in variants.items():
                        ranked = rerank_set(eval_set, reranker, cache)
                        values = per_query(rankings_to_run({q: r.ids() for q, r in ranked.rankings.items()}),
                                           eval_set.dataset.qrels, "nDCG@10", qids=eval_set.qids)
                        scores[row].update({f"{name}/{q}": v for q, v in values.items()})
            if args.fold_routers is not None:  # shipped = trained where dev kept it, else the router alone
                for scope in args.scopes:
                    scores[f"{scope} LoRA"] = dict(scores[f"{scope} LoRA, trained" if trained[scope]["kept"] else "no LoRA"])
            keys = list(scores["no LoRA"])
            folds[domain] = {"queries": len(keys), "trained": trained, "seconds": round(time.time() - fold_start),
                             **{row: statistics.mean(scores[row][k] for k in keys) for row in rows},
                             **{f"p {row} vs no LoRA": paired_randomization_test(
                                 [scores[row][k] for k in keys], [scores["no LoRA"][k] for k in keys]) for row in rows[1:]},
                             "per_query": scores}
            for row in rows:
                pooled[row].update(scores[row])
            console.print(domain, {row: round(folds[domain][row], 4) for row in rows}, trained)
            write(args, rows, folds, pooled, started)  # after every fold: a cut run keeps its finished folds
    write(args, rows, folds, pooled, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
