"""Fitting on a query log without judgments: teacher labels against real labels, on held-out queries.

For each given fit set, its queries are split as the fit splits them (group-aware, by hash); the train
part is fitted on twice, once with its real relevance labels and once with the labels of a local teacher
(``fit --teacher minilm``: the packaged all-MiniLM-L6-v2 bi-encoder; graded labels from its ranking, see
``routehead_rag.fit.teacher``), with the shipped fit's settings (the bi-encoder at its shipped weight
included, as ``fit`` adds it by default); both routers and the shipped router then
rank the held-out part (real labels for scoring only), beside BM25 and the teacher itself re-ranking the
same candidates. Paired randomization tests of teacher-fit against label-fit and against BM25. The
shipped router was fitted on every fit domain, this set's train part included (say so when reading it); the
honest stand-in for "the shipped router on a domain it never saw" is the leave-one-domain-out fold router
fitted on the other five domains (``--fold-routers``: ``lodo.py --keep-routers``'s folder), a row of its own.

    python benchmarks/teacher_fit.py --dtype bfloat16 --sets beir-scifact stackfaq --fold-routers ROUTERS

Writes benchmarks/results/teacher_fit.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, console, grouped_bars, machine, machine_line, seeded

from routehead_rag import RouteHeadReranker
from routehead_rag.bi_encoder import CHOSEN_BY, DEFAULT_WEIGHT, BiEncoderConfig
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.eval.harness import prepare_set, rerank_set
from routehead_rag.eval.metrics import paired_randomization_test, per_query, rankings_to_run
from routehead_rag.fit.pipeline import run_fit
from routehead_rag.fit.search import SearchConfig
from routehead_rag.fit.sources import beir_source
from routehead_rag.fit.teacher import Teacher, label_with_teacher
from routehead_rag.fit.training import TrainingConfig, split_train_dev
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir
from routehead_rag.router.artifact import SHIPPED_ROUTERS

ROWS = ("BM25", "teacher (MiniLM) re-ranking", "shipped router", "label-fit", "teacher-fit")
FOLD_ROW = "fold router (never saw this domain)"
SEARCHES = [SearchConfig(pool_size=p, max_heads=h) for p in (32, 64) for h in (4, 8)]


def restricted(source, qids):
    keep = set(qids)
    return dataclasses.replace(
        source, queries={q: t for q, t in source.queries.items() if q in keep},
        candidates={q: c for q, c in source.candidates.items() if q in keep},
        qrels={q: g for q, g in source.qrels.items() if q in keep},
        first_stage_scores={q: s for q, s in (source.first_stage_scores or {}).items() if q in keep},
        groups={q: g for q, g in (source.groups or {}).items() if q in keep})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sets", nargs="+", default=["beir-scifact", "stackfaq"])
    parser.add_argument("--fold-routers", type=Path, default=None,
                        help="lodo.py --keep-routers folder: adds the router fitted without the set's domain")
    parser.add_argument("--name", default="teacher_fit")
    args = parser.parse_args()
    rows = (*ROWS, FOLD_ROW) if args.fold_routers is not None else ROWS
    domain_of = {name: domain for domain, names in PROTOCOL.domains(Role.FIT).items() for name in names}
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    teacher = Teacher("minilm")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.sets:
            source = beir_source(name)
            qids = list(source.candidates)
            spec = PROTOCOL.spec(name)
            train_rows, dev_rows = split_train_dev([f"{name}/{spec.group(q)}" for q in qids], 0.2, 0)
            train_qids, dev_qids = [qids[i] for i in train_rows.tolist()], [qids[i] for i in dev_rows.tolist()]
            train = restricted(source, train_qids)
            begun = time.time()
            taught = label_with_teacher(train, teacher)
            labelling_seconds = round(time.time() - begun)
            agreement = statistics.mean(
                max(taught.qrels[q], key=taught.qrels[q].get) in {d for d, g in train.qrels.get(q, {}).items() if g > 0}
                for q in train_qids)
            routers, fit_seconds = {}, {}
            for label, fit_source in (("label-fit", train), ("teacher-fit", taught)):
                begun = time.time()
                routers[label] = run_fit(backbone, [fit_source], Path(scratch) / f"{name}-{label}", search=SEARCHES,
                                         training=TrainingConfig(), cache_dir=cache, storage_dtype="float32",
                                         report_dir=Path(scratch) / "reports",
                                         bi_encoder=BiEncoderConfig(weight=DEFAULT_WEIGHT, chosen_by=CHOSEN_BY)).artifact
                fit_seconds[label] = round(time.time() - begun)
                console.print(name, label, f"{fit_seconds[label]} s")
            eval_set = prepare_set(name, role=Role.FIT)
            eval_set.qids = dev_qids
            instruction = instruction_for("auto", name)
            rankings = {"BM25": {q: eval_set.candidates[q].doc_ids for q in dev_qids}}
            teacher_rank = {}
            for q in dev_qids:
                ids = eval_set.candidates[q].doc_ids
                scores = teacher.scores(eval_set.dataset.queries[q], eval_set.passages(ids))
                teacher_rank[q] = [d for _, d in sorted(zip(scores, ids), key=lambda pair: -pair[0])]
            rankings["teacher (MiniLM) re-ranking"] = teacher_rank
            scored = [("shipped router", SHIPPED_ROUTERS / "smollm2-135m"), ("label-fit", routers["label-fit"]),
                      ("teacher-fit", routers["teacher-fit"])]
            if args.fold_routers is not None:
                fold = args.fold_routers / f"all-queries-without-{domain_of[name].replace(' ', '-')}"
                if not (fold / "config.json").is_file():
                    raise SystemExit(f"{fold}: no fold router; run benchmarks/lodo.py --keep-routers {args.fold_routers}")
                scored.append((FOLD_ROW, fold))
            for row, heads in scored:
                reranker = RouteHeadReranker(model=backbone, heads=heads, instruction=instruction, lora=False)
                ranked = rerank_set(eval_set, reranker, cache)
                rankings[row] = {q: r.ids() for q, r in ranked.rankings.items()}
            per = {row: per_query(rankings_to_run(r), eval_set.dataset.qrels, "nDCG@10", qids=dev_qids)
                   for row, r in rankings.items()}
            values = {row: [per[row][q] for q in dev_qids] for row in rows}
            results[name] = {
                "train_queries": len(train_qids), "dev_queries": len(dev_qids),
                "teacher_top1_is_relevant": agreement,
                **{row: statistics.mean(values[row]) for row in rows},
                "p teacher-fit vs label-fit": paired_randomization_test(values["teacher-fit"], values["label-fit"]),
                "p teacher-fit vs BM25": paired_randomization_test(values["teacher-fit"], values["BM25"]),
                "fit_seconds": fit_seconds, "teacher_labelling_seconds": labelling_seconds,
            }
            if args.fold_routers is not None:
                results[name]["p teacher-fit vs fold router"] = paired_randomization_test(values["teacher-fit"],
                                                                                          values[FOLD_ROW])
            console.print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()})
    command = "python benchmarks/teacher_fit.py --dtype " + args.dtype + " --sets " + " ".join(args.sets)
    if args.fold_routers is not None:
        command += " --fold-routers ROUTERS"
    result = {"command": command, "machine": machine(), "seconds": round(time.time() - started), "rows": list(rows),
              "sets": results,
              "note": "The shipped router's fit included these sets' train parts (with their real labels); the LoRA is "
                      "left off in every row so the rows differ by the router alone"}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    lines = ["# Fitting without judgments: teacher labels against real labels", "",
             f"`{result['command']}` ({result['seconds']} s; ROUTERS: the fold routers of `benchmarks/lodo.py "
             f"--keep-routers`). {result['note']}. nDCG@10 on each set's held-out "
             "(dev) queries; the teacher's top-1 agreement is the share of train queries whose teacher-best candidate "
             "is judged relevant. Labels: graded from the teacher's ranking (2 for its best candidate, 1 for the next "
             "two), not listwise.", "", machine_line(result), "",
             "| set | train / dev queries | teacher top-1 relevant | " + " | ".join(rows)
             + " | p teacher vs label | p teacher vs BM25 |" + (" p teacher vs fold router |" if FOLD_ROW in rows else ""),
             "|---|---|---|" + "---|" * len(rows) + "---|---|" + ("---|" if FOLD_ROW in rows else "")]
    for name, row in results.items():
        lines.append(f"| {name} | {row['train_queries']} / {row['dev_queries']} | {row['teacher_top1_is_relevant']:.2f} | "
                     + " | ".join(f"{row[r]:.3f}" for r in rows)
                     + f" | {row['p teacher-fit vs label-fit']:.3f} | {row['p teacher-fit vs BM25']:.3f} |"
                     + (f" {row['p teacher-fit vs fold router']:.3f} |" if FOLD_ROW in rows else ""))
    lines += ["", "Fit time end to end (seconds, this machine): "
              + "; ".join(f"{name}: teacher labels {row['teacher_labelling_seconds']}, label-fit "
                          f"{row['fit_seconds']['label-fit']}, teacher-fit {row['fit_seconds']['teacher-fit']}"
                          for name, row in results.items())
              + " (extractions from the cache where present)."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(result, RESULTS / f"{args.name}.png")
    return 0


def plot(result: dict, path: Path) -> None:
    grouped_bars(path, list(result["sets"]), result["rows"], lambda name, row: result["sets"][name][row],
                 "nDCG@10, held-out queries", "Teacher labels vs real labels")

if __name__ == "__main__":
    raise SystemExit(main())
