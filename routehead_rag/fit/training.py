"""Router training: labels from the head search, early stopping and model choice on dev nDCG@10.

Never imported by inference code.  Steps, all seeded:

1. split the labelled queries into train and dev (``dev_fraction``, shuffled with ``seed``);
2. for each sparsity weight, train the router with BCE on the pseudo-labels plus
   ``sparsity * mean(sigmoid(logits))``; every ``eval_every`` epochs score the *routed
   aggregation* on dev (for every candidate ``k``: sum the debiased scores of each dev
   query's top-k routed heads, nDCG@10) and keep the best state;
3. choose (sparsity weight, k, epoch) by dev nDCG@10 — never by the loss;
4. choose the depth cost (:func:`choose_depth_cost`): the one whose routed heads stop the
   forward pass earliest on dev while dev nDCG@10 stays within ``depth_tolerance`` of no cost.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..measures import batched_ndcg
from ..router.model import Router, RouterConfig
from .labelled import QUERY_CHUNK, LabelledSet, single_head_quality

TRAIN_CHUNK = 2048  # train queries per backward pass; a larger train set sums the full-batch gradient over pieces


class TrainingConfig(BaseModel):
    """Router training settings; recorded with a fitted router."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    seed: int = 0
    dev_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    epochs: int = Field(300, ge=1, description="full-batch epochs per candidate setting")
    eval_every: int = Field(10, ge=1)
    patience: int = Field(8, ge=1, description="evaluations without dev improvement before stopping")
    learning_rate: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    sparsity_weights: tuple[float, ...] = Field((0.0, 0.01, 0.1), description="candidates, chosen on dev")
    ks: tuple[int, ...] = Field((1, 2, 4, 8), description="candidate heads per query, chosen on dev")
    dim: int = Field(64, ge=1)
    hidden: int = Field(256, ge=1)
    depth_costs: tuple[float, ...] = Field(
        (0.0, 0.5, 1.0, 2.0, 4.0, 8.0), description="depth-cost candidates (see SelectionConfig.depth_cost); 0 is always tried"
    )
    depth_tolerance: float = Field(
        0.005, ge=0.0, description="most dev nDCG@10 a depth cost may give up against no cost (0.005 = half a point)"
    )

    @field_validator("depth_costs")
    @classmethod
    def _depth_costs(cls, costs: tuple[float, ...]) -> tuple[float, ...]:
        bad = [c for c in costs if not math.isfinite(c) or c < 0]
        if bad:
            raise ValueError(f"depth costs must be finite and >= 0, got {bad}")
        return costs


def split_train_dev(groups: Sequence[str], dev_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train rows, dev rows)`` of queries whose groups are ``groups`` (one per query): a query is dev when its
    group hashes (with ``seed``) below ``dev_fraction``, so a query is dev in every fit it takes part in, and
    queries of one group (e.g. the paraphrases of one StackExchange thread) never straddle train and dev.
    Both sides non-empty."""
    if len(groups) < 2:
        raise ValueError(f"need at least 2 labelled queries to split train/dev, got {len(groups)}")
    if len(set(groups)) < 2:
        raise ValueError(f"need at least 2 groups of queries to split train/dev, got one ({groups[0]!r}) for all "
                         f"{len(groups)} queries")

    def position(group: str) -> float:
        digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    placed = torch.tensor([position(g) for g in groups], dtype=torch.float64)  # [query] in [0, 1)
    dev = placed < dev_fraction
    if bool(dev.all()) or not bool(dev.any()):  # too few groups for the fraction: the lowest-hashed group is dev
        first = groups[int(placed.argmin())]
        dev = torch.tensor([g == first for g in groups])
    rows = torch.arange(len(groups))
    return rows[~dev], rows[dev]


def routed_ndcg(logits: torch.Tensor, data: LabelledSet, rows: torch.Tensor, k: int, depth: int = 10) -> torch.Tensor:
    """Per-query nDCG@``depth`` of summing each query's top-``k`` heads by ``logits`` ``[rows, head]``."""
    top = torch.topk(logits, k=min(k, logits.shape[1]), dim=1).indices  # [rows, k]
    summed = data.sum_heads(top, rows)  # [rows, passage]
    return batched_ndcg(summed, data.gains[rows], data.valid[rows], data.ideal_dcg[rows], depth)


def route_top_k(router: Router, embeddings: torch.Tensor, k: int, depth_costs: Sequence[float],
                rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each query's top-``k`` heads (flat indices, strongest first) under each depth cost: ``[row, k]`` per cost.

    The router runs on pieces of at most ``QUERY_CHUNK`` of ``rows`` (all by default), so the
    ``[query, head]`` logits held do not grow with the log; only the chosen indices are kept."""
    rows = torch.arange(embeddings.shape[0]) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    picked: list[list[torch.Tensor]] = [[] for _ in depth_costs]
    with torch.no_grad():
        for start in range(0, len(rows), QUERY_CHUNK):
            logits = router(embeddings[rows[start : start + QUERY_CHUNK]].float()).double()  # [piece, head]
            for index, cost in enumerate(depth_costs):
                chosen = torch.topk(router.selection_logits(logits, cost), k=min(k, logits.shape[1]), dim=1).indices
                picked[index].append(chosen)
    return [torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long) for parts in picked]


@dataclass
class DepthChoice:
    depth_cost: float
    curve: list[dict]  # per cost tried: dev nDCG@10, mean deepest routed layer, mean share of layers run


def choose_depth_cost(
    router: Router, embeddings: torch.Tensor, data: LabelledSet, dev_rows: torch.Tensor, k: int,
    costs: tuple[float, ...], tolerance: float,
) -> DepthChoice:
    """The depth cost whose routed top-``k`` heads run the fewest layers on dev, among those within
    ``tolerance`` dev nDCG@10 of no cost (ties: the better nDCG, then the smaller cost).

    The forward pass stops after a query's deepest routed layer, so its cost is that layer + 1 of
    ``num_layers``; the curve records it for every cost tried."""
    costs_tried = sorted({0.0, *costs})
    tops = route_top_k(router, embeddings, k, costs_tried, dev_rows)  # per cost: [dev, k]
    curve = []
    for cost, top in zip(costs_tried, tops):
        summed = data.sum_heads(top, dev_rows)
        ndcg = batched_ndcg(summed, data.gains[dev_rows], data.valid[dev_rows], data.ideal_dcg[dev_rows], 10)
        deepest = torch.div(top, data.num_heads, rounding_mode="floor").max(dim=1).values.double()  # [dev]
        curve.append({"depth_cost": cost, "dev_ndcg": float(ndcg.mean()), "mean_deepest_layer": float(deepest.mean()),
                      "layer_share": float(((deepest + 1) / data.num_layers).mean())})
    floor = curve[0]["dev_ndcg"] - tolerance
    eligible = [row for row in curve if row["dev_ndcg"] >= floor - 1e-12]
    best = min(eligible, key=lambda row: (round(row["layer_share"], 9), -row["dev_ndcg"], row["depth_cost"]))
    return DepthChoice(depth_cost=best["depth_cost"], curve=curve)


@dataclass
class TrainingResult:
    router: Router
    k: int
    sparsity: float
    epoch: int
    dev_ndcg: float
    dev_static_ndcg: float  # the best static top-k over train, on the same dev queries
    train_rows: list[int]
    dev_rows: list[int]
    history: list[dict] = field(default_factory=list)


def train_router(
    embeddings: torch.Tensor,  # [query, input_dim], rows aligned with data.qids
    labels: torch.Tensor,  # [query, head] multi-hot from the head search
    data: LabelledSet,
    config: TrainingConfig | None = None,
    groups: Sequence[str] | None = None,
) -> TrainingResult:
    """Fit a router and choose its k and sparsity weight on dev nDCG@10 of the routed aggregation.

    ``groups`` (one per query, default the query keys) decide the train/dev split (:func:`split_train_dev`)."""
    config = config or TrainingConfig()
    if embeddings.shape[0] != labels.shape[0] or labels.shape[0] != len(data.qids):
        raise ValueError("embeddings, labels and the labelled set must have one row per query, in the same order")
    train_rows, dev_rows = split_train_dev(list(groups) if groups is not None else data.qids, config.dev_fraction,
                                           config.seed)
    x = embeddings.float()
    # [query, head]: multi-hot labels stay bool, each piece is made float as it is used (a float copy of them all
    # would grow with the log)
    y = labels if labels.dtype == torch.bool else labels.float()
    router_config = RouterConfig(
        input_dim=x.shape[1], num_layers=data.num_layers, num_heads=data.num_heads, dim=config.dim, hidden=config.hidden
    )
    best: dict | None = None
    history: list[dict] = []
    # Start every router at the label prior: the head bias is the log-odds of each head's label
    # frequency on train, so before any query-dependent learning the router routes like a static
    # "most often useful" head set; training then learns the query-dependent deviations.
    prior = y[train_rows].float().mean(dim=0).clamp(1e-3, 1 - 1e-3)  # [head]
    for sparsity in config.sparsity_weights:
        torch.manual_seed(config.seed)
        router = Router(router_config)
        with torch.no_grad():
            router.head_bias.copy_(torch.log(prior / (1 - prior)))
        optimizer = torch.optim.AdamW(router.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        best_here, stale = -1.0, 0
        for epoch in range(0, config.epochs + 1):
            if epoch:  # epoch 0 evaluates the prior-initialised router before any update
                router.train()
                optimizer.zero_grad()
                loss = full_batch_backward(router, x, y, train_rows, sparsity)
                optimizer.step()
            if epoch % config.eval_every and epoch != config.epochs:
                continue
            router.eval()
            with torch.no_grad():
                dev_logits = router(x[dev_rows]).double()
            for k in config.ks:
                value = float(routed_ndcg(dev_logits, data, dev_rows, k).mean())
                history.append({"sparsity": sparsity, "epoch": epoch, "k": k, "dev_ndcg": value,
                                "loss": loss if epoch else None})
                if best is None or value > best["dev_ndcg"] + 1e-12:
                    best = {"dev_ndcg": value, "k": k, "sparsity": sparsity, "epoch": epoch,
                            "state": copy.deepcopy(router.state_dict())}
            top = max(h["dev_ndcg"] for h in history if h["sparsity"] == sparsity and h["epoch"] == epoch)
            if top > best_here + 1e-12:
                best_here, stale = top, 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    assert best is not None  # at least one evaluation ran
    router = Router(router_config)
    router.load_state_dict(best["state"])
    router.eval()
    return TrainingResult(
        router=router, k=best["k"], sparsity=best["sparsity"], epoch=best["epoch"], dev_ndcg=best["dev_ndcg"],
        dev_static_ndcg=static_dev_ndcg(data, train_rows, dev_rows, best["k"]),
        train_rows=train_rows.tolist(), dev_rows=dev_rows.tolist(), history=history,
    )


def full_batch_backward(router: Router, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, sparsity: float) -> float:
    """Gradients of BCE on the labels plus ``sparsity * mean(sigmoid(logits))`` over all ``rows``, in pieces of at
    most ``TRAIN_CHUNK`` rows (each piece's mean weighted by its share), so the activations held do not grow with
    the train set; one piece is the plain full-batch pass. Returns the loss."""
    pieces = [rows[start : start + TRAIN_CHUNK] for start in range(0, len(rows), TRAIN_CHUNK)]
    total = 0.0
    for piece in pieces:
        logits = router(x[piece])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[piece].float())
        loss = loss + sparsity * torch.sigmoid(logits).mean()
        if len(pieces) > 1:
            loss = loss * (len(piece) / len(rows))
        loss.backward()
        total += float(loss.detach())
    return total


def static_dev_ndcg(data: LabelledSet, train_rows: torch.Tensor, dev_rows: torch.Tensor, k: int) -> float:
    """Dev nDCG@10 of the k heads with the best single-head quality on train (the static baseline)."""
    quality = single_head_quality(data, rows=train_rows)  # [head]
    heads = torch.argsort(quality, descending=True, stable=True)[:k]
    logits = torch.full((len(dev_rows), data.num_flat_heads), -1.0, dtype=torch.float64)
    logits[:, heads] = 1.0
    return float(routed_ndcg(logits, data, dev_rows, k).mean())
