"""A bi-encoder weight per query (the router's bi-encoder head, ``fit --bi-encoder-head``), by leaving each fit
domain out (never on the test sets).

For each of the six fit domains, the router fitted on the other five (``benchmarks/lodo.py --keep-routers``'s
"all queries" fold router, given as ``--routers``) gets a bi-encoder head trained by the fit's own code
(:func:`routehead_rag.fit.term_weights.fit_bi_encoder_weight`) on the fold's train queries (its train/dev split,
cached extractions, cached cosines), kept where it beats the one weight on the fold's dev queries, at each
learning rate of ``LEARNING_RATES``; the learning rate ``fit`` uses is the one with the best mean dev gain over
the folds (fit dev only). Then the left-out domain's queries (``--eval-queries`` by hash, as lodo.py) are ranked:

* BM25, dense all-MiniLM-L6-v2 (the cosine alone), and the fold router with the one weight ``v = 40``
  (``routehead_rag.bi_encoder.DEFAULT_WEIGHT``: the shipped configuration of ``lodo.md``);
* the head at each learning rate, as the fit keeps it (the one weight where dev rejected it);
* a grid policy, not a shipped configuration: a linear map of the query embedding choosing ``v`` from
  ``GRID`` to maximise the expected nDCG@10 of the train queries (the nDCG-aligned alternative to the listwise
  loss), epoch chosen on dev;
* best single ``v`` for the left-out domain, chosen on its own labels: not a configuration (it reads the labels
  it is scored on), the most any weight adapted per domain could add.

Every row's score is ``base + v(q) * cosine``: ``cosine`` is the re-ranker's own bi-encoder's (the shared
instance, dtype auto) and ``base`` is what ``RouteHeadReranker`` scores each left-out query with the fold router
(``scale_score=False``) minus ``40 * cosine`` (the standardised routed attention plus the level term); the head
``fit`` would train is also written as a router and ranked by the re-ranker, and must give the same nDCG@10 on
every query (checked). Paired randomization tests against the one weight, per domain and pooled.

    python benchmarks/bi_encoder_head.py --dtype bfloat16 --eval-queries 150 --routers ROUTERS

Writes benchmarks/results/bi_encoder_head.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, console, grouped_bars, machine, machine_line, seeded
from lodo import left_out_set, ndcg_per_query

from routehead_rag import RouteHeadReranker
from routehead_rag.bi_encoder import CHOSEN_BY, DEFAULT_WEIGHT, BiEncoderConfig, load_bi_encoder
from routehead_rag.data.protocol import PROTOCOL, Role, instruction_for
from routehead_rag.engine.embedding import embed_query
from routehead_rag.eval.harness import rerank_set
from routehead_rag.eval.metrics import paired_randomization_test
from routehead_rag.fit.extract import PooledExtractions, extract_sources, passage_cosines
from routehead_rag.fit.labelled import LabelledSetBuilder
from routehead_rag.fit.sources import beir_source
from routehead_rag.fit.term_weights import fit_bi_encoder_weight
from routehead_rag.fit.training import route_top_k, split_train_dev
from routehead_rag.measures import batched_ndcg
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir
from routehead_rag.recipe import final_scores
from routehead_rag.router.artifact import load_artifact, save_artifact

LEARNING_RATES = (1e-2, 1e-3, 1e-4, 3e-5)
FIT_LEARNING_RATE = inspect.signature(fit_bi_encoder_weight).parameters["learning_rate"].default  # what fit uses
GRID = (5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0)
ONE_WEIGHT = f"one weight (v={DEFAULT_WEIGHT:g})"


def head_row(lr: float) -> str:
    return f"head, lr {lr:g}"


def six_domains(backbone, scoring, query_embedding, cache: Path):
    """Every fit query of the six domains: the labelled set (cached extractions), embeddings, cosines, signal."""
    domains = PROTOCOL.domains(Role.FIT)
    sources = [beir_source(n) for names in domains.values() for n in names]
    pooled = PooledExtractions.of_sources(sources)
    builder = LabelledSetBuilder(pooled.doc_ids, pooled.qrels, backbone.num_layers, backbone.num_heads, depth=10,
                                 dtype=torch.float32, on_disk=True)
    extract_sources(backbone, sources, scoring, cache, None, storage_dtype="float32", pooled=pooled, sink=builder.put)
    data = builder.finish()
    embeddings = torch.stack([embed_query(backbone, pooled.texts[k], query_embedding) for k in data.qids]).float()
    cosines = passage_cosines(BiEncoderConfig(weight=DEFAULT_WEIGHT), sources, pooled, data,
                              list(range(len(data.qids))), None, cache)
    domain_of = {n: d for d, names in domains.items() for n in names}
    return domains, pooled, data, embeddings, cosines, [domain_of[k.split("/", 1)[0]] for k in data.qids]


def grid_policy(embeddings, utility_train, utility_dev, train, dev, epochs=300, lr=1e-3):
    """A linear map of the query embedding to a choice of ``v`` from GRID, trained to maximise the train queries'
    expected nDCG@10 (``utility`` ``[row, grid]``), the epoch chosen on dev; starts at ``v = 40`` everywhere."""
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(embeddings.shape[1]), torch.nn.Linear(embeddings.shape[1], len(GRID))
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[GRID.index(DEFAULT_WEIGHT)] = 1.0
    optimizer = torch.optim.AdamW([*norm.parameters(), *linear.parameters()], lr=lr, weight_decay=1e-4)

    def value(utility, rows):
        with torch.no_grad():
            return float(utility[torch.arange(len(rows)), linear(norm(embeddings[rows])).argmax(1)].mean())

    best = (value(utility_dev, dev), copy.deepcopy((norm.state_dict(), linear.state_dict())))
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        chosen = torch.softmax(linear(norm(embeddings[train])), 1).double()
        (-(chosen * utility_train).sum(1).mean()).backward()
        optimizer.step()
        if epoch % 10 == 0 and (current := value(utility_dev, dev)) > best[0] + 1e-12:
            best = (current, copy.deepcopy((norm.state_dict(), linear.state_dict())))
    norm.load_state_dict(best[1][0])
    linear.load_state_dict(best[1][1])
    return lambda e: torch.tensor(GRID, dtype=torch.float64)[linear(norm(e.float())).argmax(1)].detach()


def utility(data, attention, cosines, level, rows):
    """``[row, grid]``: each row's nDCG@10 at every ``v`` of GRID (the fit's own nDCG, over its judged documents)."""
    return torch.stack([batched_ndcg(final_scores(attention[rows], None, None, None, data.valid[rows], level,
                                                  cosines[rows], v), data.gains[rows], data.valid[rows],
                                     data.ideal_dcg[rows]) for v in GRID], 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--eval-queries", type=int, default=150)
    parser.add_argument("--routers", type=Path, required=True, help="lodo.py --keep-routers folder")
    parser.add_argument("--name", default="bi_encoder_head")
    args = parser.parse_args()
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    cache = default_cache_dir()
    folder_of = lambda domain: args.routers / f"all-queries-without-{domain.replace(' ', '-')}"  # noqa: E731
    domains = PROTOCOL.domains(Role.FIT)
    _, first = load_artifact(folder_of(next(iter(domains))))
    domains, pooled, data, embeddings, cosines, domain_of_row = six_domains(backbone, first.scoring,
                                                                            first.query_embedding, cache)
    signal = pooled.first_stage_signal(data)
    bi_encoder = BiEncoderConfig(weight=DEFAULT_WEIGHT, chosen_by=CHOSEN_BY)
    encoder = load_bi_encoder(bi_encoder.model)  # the one the re-rankers below use (dtype auto, shared)
    folds, ndcg = {}, {}  # ndcg: row -> domain -> {query key: nDCG@10}
    with tempfile.TemporaryDirectory() as scratch:
        for domain, names in domains.items():
            fold_start = time.time()
            router, config = load_artifact(folder_of(domain))
            settings = config.training["settings"]
            rows = torch.tensor([i for i, d in enumerate(domain_of_row) if d != domain])
            train, dev = (rows[r] for r in split_train_dev([pooled.groups[data.qids[i]] for i in rows.tolist()],
                                                           settings["dev_fraction"], settings["seed"]))
            routed = route_top_k(router, embeddings, config.selection.k, [config.selection.depth_cost])[0]
            attention = data.sum_heads(routed).double()  # [query, passage]
            level = config.fusion.level_weight
            heads = {lr: fit_bi_encoder_weight(router, embeddings, attention, signal, None, cosines, bi_encoder, data,
                                               train, dev, seed=settings["seed"], learning_rate=lr)
                     for lr in LEARNING_RATES}
            policy = grid_policy(embeddings, utility(data, attention, cosines, level, train),
                                 utility(data, attention, cosines, level, dev), train, dev)
            folds[domain] = {"left_out_sets": names, "train_queries": len(train), "dev_queries": len(dev),
                             "dev": {str(lr): fit.dev for lr, fit in heads.items()},
                             "kept": {str(lr): fit.bi_encoder.mode == "per_query" for lr, fit in heads.items()}}
            parts = []  # (key, eval set, qid, base [passage], cosine [passage], embedding)
            eval_sets = {name: left_out_set(name, max(1, args.eval_queries // len(names))) for name in names}
            for name, eval_set in eval_sets.items():
                instruction = instruction_for("auto", name)
                with_cosine = rerank_set(eval_set, RouteHeadReranker(
                    model=backbone, heads=folder_of(domain), instruction=instruction, scale_score=False), cache)
                for qid in eval_set.qids:
                    ids, query = eval_set.candidates[qid].doc_ids, eval_set.dataset.queries[qid]
                    full = {r.id: r.score for r in with_cosine.rankings[qid]}
                    cosine = encoder.cosines(query, eval_set.passages(ids))  # [passage] the re-ranker's own encoder
                    base = torch.tensor([full[d] for d in ids], dtype=torch.float64) - DEFAULT_WEIGHT * cosine
                    embedding = embed_query(backbone, query, config.query_embedding)
                    parts.append((f"{name}/{qid}", eval_set, qid, base, cosine, embedding))
            query_embeddings = torch.stack([p[5] for p in parts]).float()
            weights = {"BM25": None, "dense MiniLM": None, ONE_WEIGHT: torch.full((len(parts),), DEFAULT_WEIGHT)}
            for lr, fit in heads.items():
                weights[head_row(lr)] = (DEFAULT_WEIGHT * fit.router.bi_encoder_scales(query_embeddings).detach().double()
                                         if fit.bi_encoder.mode == "per_query" else weights[ONE_WEIGHT])
            weights["grid policy"] = policy(query_embeddings)
            for v in GRID:
                weights[f"v={v:g}"] = torch.full((len(parts),), v)
            for row, per_query in weights.items():
                for index, (key, eval_set, qid, base, cosine, _) in enumerate(parts):
                    ids = eval_set.candidates[qid].doc_ids
                    if row == "BM25":
                        order = list(ids)
                    else:
                        score = cosine if row == "dense MiniLM" else base + float(per_query[index]) * cosine
                        order = [ids[i] for i in torch.argsort(-score, stable=True).tolist()]
                    value = ndcg_per_query(eval_set, {qid: order})[qid]
                    ndcg.setdefault(row, {}).setdefault(domain, {})[key] = value
            best_v = max(GRID, key=lambda v: statistics.mean(ndcg[f"v={v:g}"][domain].values()))
            ndcg.setdefault("best single v (oracle)", {})[domain] = dict(ndcg[f"v={best_v:g}"][domain])
            folds[domain]["best_single_v"] = best_v
            folds[domain]["live_check_max_difference"] = live_check(
                backbone, heads[FIT_LEARNING_RATE], config, scratch, domain, eval_sets, cache, ndcg,
                head_row(FIT_LEARNING_RATE))
            folds[domain]["seconds"] = round(time.time() - fold_start)
            console.print(domain, {row: round(statistics.mean(ndcg[row][domain].values()), 4) for row in ndcg
                                   if not row.startswith("v=")})
    chosen_lr = max(LEARNING_RATES, key=lambda lr: statistics.mean(
        folds[d]["dev"][str(lr)]["per_query"] - folds[d]["dev"][str(lr)]["global"] for d in folds))
    rows = ["BM25", "dense MiniLM", ONE_WEIGHT, *[head_row(lr) for lr in LEARNING_RATES], "grid policy",
            "best single v (oracle)"]
    keys = {d: list(ndcg[ONE_WEIGHT][d]) for d in folds}
    pooled_keys = [(d, k) for d in folds for k in keys[d]]
    result = {
        "command": f"python benchmarks/bi_encoder_head.py --dtype {args.dtype} --eval-queries {args.eval_queries} "
                   "--routers ROUTERS",
        "machine": machine(), "seconds": round(time.time() - started), "rows": rows,
        "learning_rates": list(LEARNING_RATES), "chosen_learning_rate": chosen_lr,
        "fit_learning_rate": FIT_LEARNING_RATE, "grid": list(GRID), "folds": folds,
        "mean": {row: {d: statistics.mean(ndcg[row][d].values()) for d in folds} for row in rows},
        "pooled": {row: statistics.mean(ndcg[row][d][k] for d, k in pooled_keys) for row in rows},
        "p vs one weight": {row: {**{d: paired_randomization_test([ndcg[row][d][k] for k in keys[d]],
                                                                   [ndcg[ONE_WEIGHT][d][k] for k in keys[d]])
                                     for d in folds},
                                  "pooled": paired_randomization_test([ndcg[row][d][k] for d, k in pooled_keys],
                                                                      [ndcg[ONE_WEIGHT][d][k] for d, k in pooled_keys])}
                            for row in rows if row != ONE_WEIGHT},
        "queries": {d: len(keys[d]) for d in folds},
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / f"{args.name}.md")
    grouped_bars(RESULTS / f"{args.name}.png", [*folds, "pooled"], [ONE_WEIGHT, head_row(chosen_lr), "grid policy",
                                                                      "best single v (oracle)"],
                 lambda g, r: result["pooled"][r] if g == "pooled" else result["mean"][r][g], "nDCG@10",
                 "bi-encoder weight per query, each domain left out", figsize=(10, 4), tick_fontsize=7, rotation=20)
    return 0


def live_check(backbone, fit, config, scratch, domain, eval_sets, cache, ndcg, row) -> float | None:
    """The kept head written as a router and its left-out queries ranked by the re-ranker (``rerank_set``): every
    query's nDCG@10 must equal the row's. Returns the largest difference (``None``: dev did not keep the head)."""
    if fit.bi_encoder.mode != "per_query":
        return None
    folder = save_artifact(Path(scratch) / domain.replace(" ", "-"), fit.router,
                           config.model_copy(update={"router": fit.router.config, "bi_encoder": fit.bi_encoder}),
                           "card")
    worst = 0.0
    for name, eval_set in eval_sets.items():
        ranked = rerank_set(eval_set, RouteHeadReranker(model=backbone, heads=folder, scale_score=False,
                                                        instruction=instruction_for("auto", name)), cache)
        live = ndcg_per_query(eval_set, {q: r.ids() for q, r in ranked.rankings.items()})
        worst = max(worst, *(abs(value - ndcg[row][domain][f"{name}/{q}"]) for q, value in live.items()))
    if worst > 1e-9:
        raise AssertionError(f"{domain}: the live ranking's nDCG@10 differs from the row's by {worst:.2e}")
    return worst


def write_markdown(result: dict, path: Path) -> None:
    folds, rows = list(result["folds"]), result["rows"]
    lines = [
        "# A bi-encoder weight per query, by leaving each domain out", "",
        f"`{result['command']}` ({result['seconds']} s; ROUTERS: the \"all queries\" fold routers of "
        "`benchmarks/lodo.py --keep-routers`). Per fold, the router fitted on the other five domains gets a "
        "bi-encoder head (`fit --bi-encoder-head`: `v(q) = 40 * exp(<t, layernorm(q)> + e)`, trained listwise on the "
        "fold's train queries, kept only where it beats the one weight on the fold's dev queries) at each learning "
        "rate; the left-out domain's queries are ranked by `RouteHeadReranker` (BM25 top-20 candidates; "
        "`base + v(q) * cosine`: the cosine of the re-ranker's own bi-encoder, the base the re-ranker's score with the "
        "fold router minus 40 x cosine; the head at `fit`'s learning rate, where kept, also written as a router and "
        "ranked by the re-ranker: identical nDCG@10 on every query). nDCG@10; p: paired randomization test against "
        "the one weight.", "",
        machine_line(result), "",
        "| row | " + " | ".join(f"{d} ({result['queries'][d]})" for d in folds) + " | pooled | p pooled |",
        "|---|" + "---|" * (len(folds) + 2),
    ]
    for row in rows:
        p = result["p vs one weight"].get(row, {}).get("pooled")
        lines.append(f"| {row} | " + " | ".join(f"{result['mean'][row][d]:.3f}" for d in folds)
                     + f" | {result['pooled'][row]:.4f} | {'' if p is None else f'{p:.3f}'} |")
    lines += ["", "Fit dev per fold (the five domains' dev queries): nDCG@10 with the one weight -> with the head, and "
              "whether the fit kept it, per learning rate:", "",
              "| left-out domain | " + " | ".join(f"lr {lr:g}" for lr in result["learning_rates"]) + " | best single v |",
              "|---|" + "---|" * (len(result["learning_rates"]) + 1)]
    for d in folds:
        fold = result["folds"][d]
        cells = [f"{fold['dev'][str(lr)]['global']:.4f} -> {fold['dev'][str(lr)]['per_query']:.4f} "
                 f"({'kept' if fold['kept'][str(lr)] else 'not kept'})" for lr in result["learning_rates"]]
        lines.append(f"| {d} | " + " | ".join(cells) + f" | {fold['best_single_v']:g} |")
    lines += ["", f"Learning rate with the best mean dev gain over the folds: {result['chosen_learning_rate']:g}; "
              f"`fit` uses {result['fit_learning_rate']:g} (the row checked live).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
