"""Go/no-go for query-side LoRA adapters: does tuning how the query reads the passages lift dev nDCG@10?

The question the quality issue asks before anything ships: on a few hundred fit queries, does a
LoRA adapter that acts on the query part only (the real and the "N/A" suffix; the passages' prefix
runs on the base model, adapters off, so its KV cache is the base model's) raise dev nDCG@10 of the
routed heads by at least 2 points over the same heads without it?

Per fit query: the prefix pass without gradients, then both suffix passes with gradients through
the adapter, and a listwise loss (softmax cross-entropy against the relevance grades) on the
standardised calibrated score of the query's routed heads. Adapters: the library's query-side LoRA
(:mod:`routehead_rag.engine.lora`; rank r, alpha 2r) on the attention projections (with
``--mlp`` the MLP ones too) of every layer up to the deepest routed one. The committed results were
made at commit b5acaaf with this script's own copy of the same LoRA, before it moved into the library
(same math; its initial A differed by random draws). Dev nDCG@10 after every epoch; the baseline is the
same scoring with the adapter off.

    python benchmarks/adapter_go_no_go.py --train-queries 160 --dev-queries 80 --epochs 2
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, console, load_set, machine, machine_line, pooled, scorers_by_instruction, seeded

from routehead_rag.data.protocol import PROTOCOL, Role
from routehead_rag.engine.embedding import embed_query
from routehead_rag.engine.lora import Lora, LoraConfig, decoder_path, lora_targets
from routehead_rag.eval.metrics import paired_randomization_test
from routehead_rag.fit.training import split_train_dev
from routehead_rag.measures import batched_ndcg
from routehead_rag.model.backbone import load_backbone
from routehead_rag.paths import default_cache_dir
from routehead_rag.router.artifact import SHIPPED_ROUTERS
from routehead_rag.strategy import RoutedHeads


def plot(result, path: Path) -> None:
    """Dev nDCG@10 after each epoch, one line per (rank, learning rate), the adapter-off baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in result["runs"]:
        epochs = [h["epoch"] for h in run["history"]]  # epoch 0: the adapter untrained (exactly the base model)
        values = [h["dev_ndcg@10"] for h in run["history"]]
        ax.plot(epochs, values, marker="o", label=f"rank {run['rank']}, lr {run['lr']:g}")
    baseline = result["runs"][0]["baseline_dev_ndcg@10"]
    ax.axhline(baseline, linestyle="--", color="grey", label="adapter off")
    ax.axhline(baseline + 0.02, linestyle=":", color="red", label="go line (+2 points)")
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("dev nDCG@10")
    ax.set_title("query-side LoRA: go/no-go on fit dev")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_adapter(backbone, depth: int, rank: int, mlp: bool) -> Lora:
    """A fresh LoRA adapter (``B = 0``: the base model exactly) on layers ``0..depth``."""
    layers, targets = lora_targets(backbone.decoder, depth, mlp=mlp)
    config = LoraConfig(rank=rank, alpha=2.0 * rank, layers=layers, targets=targets,
                                decoder_path=decoder_path(backbone.model, backbone.decoder))
    return Lora.for_decoder(backbone.decoder, config)


def routed_scores(scorer, query, passages, heads, adapter, grad: bool) -> torch.Tensor:
    """Calibrated (real - N/A) scores of ``passages`` summed over ``heads`` ``[passage]``; adapter on the query part
    only (the library's scorer: :meth:`AttentionScorer.head_scores`)."""
    return scorer.aggregate(scorer.head_scores(query, passages, heads, adapter, differentiable=grad), heads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--router", type=Path, default=SHIPPED_ROUTERS / "smollm2-135m")
    parser.add_argument("--train-queries", type=int, default=160)
    parser.add_argument("--dev-queries", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rank", type=int, action="append", default=None)
    parser.add_argument("--lr", type=float, action="append", default=None)
    parser.add_argument("--heldout-queries", type=int, default=0,
                        help="further dev queries, never used to pick the epoch: scored once, without and with the "
                             "chosen adapter, with a paired test (0: none)")
    parser.add_argument("--mlp", action="store_true", help="also adapt the MLP projections (gate, up, down)")
    parser.add_argument("--name", default="adapter_go_no_go", help="result file stem")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ranks, lrs = args.rank or [8], args.lr or [1e-3]
    seeded()
    started = time.time()
    backbone = load_backbone("smollm2-135m", dtype=args.dtype)
    for parameter in backbone.model.parameters():
        parameter.requires_grad_(False)
    strategy = RoutedHeads.from_folder(args.router).resolve(backbone)
    scorers = scorers_by_instruction(backbone)
    sets = {e.name: load_set(e.name, Role.FIT, None, None, scorers, default_cache_dir()) for e in PROTOCOL.entries_for(Role.FIT)}
    pool = pooled(sets)
    data = pool.labelled_set()
    train_rows, dev_rows = split_train_dev(len(data.qids), 0.2, 0)  # the router's own split
    rng = random.Random(0)
    train_keys = rng.sample([data.qids[i] for i in train_rows.tolist()], args.train_queries)
    dev_pool = rng.sample([data.qids[i] for i in dev_rows.tolist()], args.dev_queries + args.heldout_queries)
    dev_keys, heldout_keys = dev_pool[: args.dev_queries], dev_pool[args.dev_queries :]
    passages_of = {}
    for name, (eval_set, _) in sets.items():
        for qid in eval_set.qids:
            passages_of[f"{name}/{qid}"] = eval_set.passages(qid)
    scorer_of = {name: scorers[PROTOCOL.spec(name).instruction] for name in sets}
    row_of = {key: i for i, key in enumerate(data.qids)}
    heads = {key: strategy.router.select(embed_query(backbone, pool.texts[key], strategy.config.query_embedding),
                                         strategy.config.selection) for key in train_keys + dev_pool}
    depth = max(max(h.layer for h in hs) for hs in heads.values())

    def per_query_ndcg(adapter, keys) -> tuple[list[float], float]:
        values, seconds = [], []
        for key in keys:
            begun = time.perf_counter()
            scores = routed_scores(scorer_of[key.split("/")[0]], pool.texts[key], passages_of[key], heads[key],
                                   adapter, grad=False).detach().double()
            seconds.append(time.perf_counter() - begun)
            row = row_of[key]
            count = len(pool.doc_ids[key])
            padded = torch.full((data.gains.shape[1],), -1e9, dtype=torch.float64)
            padded[:count] = scores
            values.append(float(batched_ndcg(padded, data.gains[row], data.valid[row], data.ideal_dcg[row])))
        return values, statistics.median(seconds)

    def dev_ndcg(adapter) -> tuple[float, float]:
        values, seconds = per_query_ndcg(adapter, dev_keys)
        return statistics.mean(values), seconds

    runs = []
    for rank in ranks:
        for lr in lrs:
            torch.manual_seed(0)
            adapter = make_adapter(backbone, depth, rank, args.mlp)
            baseline, inference_s = dev_ndcg(adapter)  # B = 0: exactly the base model
            heldout_base = per_query_ndcg(adapter, heldout_keys)[0] if heldout_keys else []
            best_state = copy.deepcopy(adapter.state_dict())
            optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
            history = [{"epoch": 0, "dev_ndcg@10": baseline}]
            train_seconds = []
            for epoch in range(1, args.epochs + 1):
                order = list(train_keys)
                random.Random(epoch).shuffle(order)
                for key in order:
                    begun = time.perf_counter()
                    scores = routed_scores(scorer_of[key.split("/")[0]], pool.texts[key], passages_of[key],
                                           heads[key], adapter, grad=True)
                    row = row_of[key]
                    gains = data.gains[row, : scores.numel()].float()
                    if gains.sum() <= 0:
                        continue
                    z = (scores - scores.mean()) / scores.std().clamp_min(1e-6)
                    loss = -(gains / gains.sum() * torch.log_softmax(z, dim=0)).sum()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    train_seconds.append(time.perf_counter() - begun)
                value, adapted_s = dev_ndcg(adapter)
                if value > max(h["dev_ndcg@10"] for h in history) + 1e-12:
                    best_state = copy.deepcopy(adapter.state_dict())
                history.append({"epoch": epoch, "dev_ndcg@10": value})
                console.print(f"rank {rank} lr {lr} epoch {epoch}: dev {value:.4f} (baseline {baseline:.4f})")
            best = max(history, key=lambda h: h["dev_ndcg@10"])
            runs.append({"rank": rank, "lr": lr, "baseline_dev_ndcg@10": baseline, "history": history,
                         "best_epoch": best["epoch"], "best_dev_ndcg@10": best["dev_ndcg@10"],
                         "gain_points": 100 * (best["dev_ndcg@10"] - baseline),
                         "seconds_per_train_query": statistics.median(train_seconds) if train_seconds else None,
                         "seconds_per_query_base": inference_s, "seconds_per_query_adapted": adapted_s})
            if heldout_keys:  # the chosen epoch's adapter on queries that never chose anything
                adapter.load_state_dict(best_state)
                heldout_adapted = per_query_ndcg(adapter, heldout_keys)[0]
                runs[-1].update({
                    "heldout_baseline_ndcg@10": statistics.mean(heldout_base),
                    "heldout_adapted_ndcg@10": statistics.mean(heldout_adapted),
                    "heldout_gain_points": 100 * (statistics.mean(heldout_adapted) - statistics.mean(heldout_base)),
                    "heldout_p": paired_randomization_test(heldout_adapted, heldout_base),
                })
                console.print({k: v for k, v in runs[-1].items() if k.startswith("heldout")})
    gain_key = "heldout_gain_points" if heldout_keys else "gain_points"
    go = any(r[gain_key] >= 2.0 for r in runs)
    result = {"benchmark": "adapter_go_no_go", "dtype": args.dtype, "train_queries": len(train_keys),
              "dev_queries": len(dev_keys), "heldout_queries": len(heldout_keys), "epochs": args.epochs, "targets": list(lora_targets(backbone.decoder, depth, mlp=args.mlp)[1]), "deepest_layer": depth,
              "runs": runs, "go": go, "machine": machine(), "seconds": round(time.time() - started)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Query-side LoRA adapters: go/no-go on fit dev", "",
             f"{len(train_keys)} train / {len(dev_keys)} dev fit queries (the router's own split), {args.dtype}; LoRA on "
             f"{', '.join(result['targets'])} of layers 0-{depth}; listwise loss on the routed heads' standardised calibrated "
             "score. Decision rule: go if dev nDCG@10 rises by at least 2 points over the same heads without it.", "",
             "| rank | lr | dev nDCG@10 without | best with (epoch) | gain (points) | s / train query | s / query (base, adapted) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['rank']} | {r['lr']:g} | {r['baseline_dev_ndcg@10']:.4f} | {r['best_dev_ndcg@10']:.4f} "
                     f"({r['best_epoch']}) | {r['gain_points']:+.2f} | {r['seconds_per_train_query'] or 0:.2f} | "
                     f"{r['seconds_per_query_base']:.2f}, {r['seconds_per_query_adapted']:.2f} |")
    if heldout_keys:
        lines += ["", f"Held out: {len(heldout_keys)} further dev queries that picked nothing, scored once without and with "
                  "each run's chosen adapter (p: paired randomization test); the decision uses these.", "",
                  "| rank | lr | held-out without | held-out with | gain (points) | p |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['lr']:g} | {r['heldout_baseline_ndcg@10']:.4f} | {r['heldout_adapted_ndcg@10']:.4f} | "
                  f"{r['heldout_gain_points']:+.2f} | {r['heldout_p']:.3f} |" for r in runs]
    lines += ["", f"Decision: **{'go' if go else 'no-go'}**.", "", machine_line(result), "",
              f"Produced by `python benchmarks/adapter_go_no_go.py {' '.join(sys.argv[1:])}` in {result['seconds']} s."]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(result, args.out / f"{args.name}.png")
    console.print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
