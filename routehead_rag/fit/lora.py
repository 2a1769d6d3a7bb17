"""``routehead-rag fit --lora``: train a LoRA for a fitted router, listwise on its routed heads (training side).

What the LoRA is and how it is applied: :mod:`routehead_rag.engine.lora`. Two scopes:

* ``query``: only the query part (the real query and the content-free "N/A") reads with it; the prefix
  (header and passages) runs on the base model without gradients, so its KV cache is the base model's;
* ``prompt``: the whole prompt reads with it and gradients flow through the passages' pass too, so the
  passages' keys and values become relevance-aware (QRRanker-style training of the scoring heads).

Per fit query of a (sampled) train split, mixed over every source: the routed heads' debiased attention
is computed with the LoRA on (:meth:`AttentionScorer.head_scores` with ``differentiable=True``: the same
scoring code as inference) and the loss is listwise: softmax cross-entropy of the recipe's fused score
(:func:`routehead_rag.recipe.final_scores`, standardised attention where the router does not fuse) against
the relevance grades; one AdamW step per ``batch_queries`` queries (their mean loss). Where the router has a
bi-encoder (:mod:`routehead_rag.bi_encoder`), its term is part of that fused score, in training and on dev, as
users get it: the LoRA is trained and chosen for what the cosine leaves to the attention.

After every epoch the LoRA is scored on dev queries (the router's own dev split, sampled) with the scores a
user gets (the router's first-stage fusion applied), and the best epoch over every (rank, learning rate)
tried is kept; epoch 0 is the LoRA untrained, exactly the base model, so a LoRA that never beats the router
on dev is not kept. The backbone computes in its own dtype (bfloat16 where the CPU has it natively, as
``dtype="auto"`` loads it); the factors stay float32.

Resumable: after each epoch the run's state (factors, optimizer, history, best so far) is written atomically
to the checkpoint folder; a killed fit restarts from the last finished epoch and ends with the same LoRA as
an uninterrupted one. The prefix work is not cached across epochs (for the query scope its KV cache up to the
deepest adapted layer would be ~50 MB per protocol query: more than memory for a fit; for the prompt scope it
changes with every step); the epochs recompute it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from ..atomic import atomic_write
from ..engine.lora import Lora, LoraConfig, decoder_path, lora_targets
from ..engine.scorer import AttentionScorer
from ..heads import Head
from ..measures import batched_ndcg, candidate_ideal_dcg
from ..recipe import final_scores as recipe_final_scores


class LoraTrainingConfig(BaseModel):
    """How the LoRA is trained and chosen (every choice on dev)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    ranks: tuple[StrictInt, ...] = Field((8,), min_length=1, description="LoRA ranks to try (alpha = 2 x rank)")
    learning_rates: tuple[float, ...] = Field((1e-3,), min_length=1, description="AdamW learning rates to try")
    epochs: StrictInt = Field(3, ge=1, le=100, description="epochs per (rank, learning rate); best epoch on dev")
    mlp: bool = Field(True, description="adapt the MLP projections too (else the attention projections only)")
    scope: Literal["query", "prompt"] = Field(
        "query", description="what reads with the LoRA: the query part only, or the whole prompt (passages too)"
    )
    batch_queries: StrictInt = Field(
        1, ge=1, le=256, description="train queries per optimizer step (their mean loss; 1: a step per query)"
    )
    train_queries: StrictInt | None = Field(
        240, ge=1, description="train queries sampled from the router's train split (None: all of them)"
    )
    dev_queries: StrictInt | None = Field(
        120, ge=1, description="dev queries sampled from the router's dev split (None: all of them)"
    )
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _in_range(self) -> LoraTrainingConfig:
        if any(r < 1 or r > 256 for r in self.ranks):
            raise ValueError(f"LoRA ranks must be in 1..256, got {list(self.ranks)}")
        if any(not 0 < lr < 1 for lr in self.learning_rates):
            raise ValueError(f"LoRA learning rates must be in (0, 1), got {list(self.learning_rates)}")
        return self


@dataclass
class LoraQuery:
    """One fit query as LoRA training sees it: its text, passages (candidates order), grades and route."""

    key: str
    text: str
    passages: list[str]
    gains: torch.Tensor  # [passage] relevance grades (0 for unjudged)
    heads: list[Head]  # the router's heads for it
    scorer: AttentionScorer  # in its source's prompt wording
    first_stage: torch.Tensor  # [passage] first-stage signal (raw: scores, or minus the rank)
    fusion_weight: float | None  # the router's first-stage weight for it (None: no fusion)
    level_weight: float = 0.0  # the router's attention-level weight (routehead_rag.recipe.final_scores)
    cosine: torch.Tensor | None = None  # [passage] the router's bi-encoder's cosines (None: the router has none)
    cosine_weight: float = 0.0  # what one unit of cosine adds (the router's bi-encoder weight)


@dataclass
class LoraFit:
    """The result of :func:`train_lora`."""

    lora: Lora | None  # the best over every run and epoch; None when epoch 0 (no LoRA) won
    rank: int | None
    learning_rate: float | None
    epoch: int
    base_dev_ndcg: float  # the router's dev nDCG@10 without a LoRA (fused as shipped)
    dev_ndcg: float  # with the chosen LoRA (= base when none is kept)
    runs: list[dict] = field(default_factory=list)
    dev_attention: dict[str, torch.Tensor] = field(default_factory=dict)  # [passage] routed scores, chosen LoRA
    seconds_per_train_query: float | None = None
    seconds_per_dev_query: dict[str, float] = field(default_factory=dict)  # "base", "adapted"
    last: Lora | None = None  # the last (rank, learning rate) run after its last epoch, kept or not (for ablations)


def routed_attention(query: LoraQuery, adapter: Lora | None, differentiable: bool = False) -> torch.Tensor:
    """The debiased attention of ``query``'s routed heads ``[passage]``, the LoRA on where its scope says."""
    scores = query.scorer.head_scores(query.text, query.passages, query.heads, adapter, differentiable=differentiable)
    return query.scorer.aggregate(scores, query.heads)


def final_scores(query: LoraQuery, attention: torch.Tensor) -> torch.Tensor:
    """What a user ranks by ``[passage]``: the recipe's formula with the router's first-stage weight for the query."""
    return recipe_final_scores(attention, query.first_stage, query.fusion_weight, level_weight=query.level_weight,
                               cosine=query.cosine, cosine_weight=query.cosine_weight)


def ndcg_at_10(scores: torch.Tensor, gains: torch.Tensor) -> float:
    """nDCG@10 of one ranking by ``scores`` ``[passage]`` against ``gains``, over the candidate-only ideal
    (:func:`routehead_rag.measures.candidate_ideal_dcg`: what a re-ranker can reach)."""
    valid = torch.ones_like(gains, dtype=torch.bool)
    return float(batched_ndcg(scores.double(), gains.double(), valid, candidate_ideal_dcg(gains)))


def listwise_loss(query: LoraQuery, attention: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the recipe's fused scores ``[passage]`` (standardised attention where the router
    does not fuse; the bi-encoder's term added where the router has one, so the LoRA learns what the cosine
    misses) against the grades (as a distribution)."""
    scores = recipe_final_scores(attention, query.first_stage, query.fusion_weight or 0.0, level_weight=query.level_weight,
                                 cosine=query.cosine, cosine_weight=query.cosine_weight)
    target = query.gains.double() / query.gains.double().sum()
    return -(target * torch.log_softmax(scores, dim=0)).sum()


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _save_atomic(state: dict, path: Path) -> None:
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def train_lora(
    backbone,
    queries: dict[str, LoraQuery],
    train_keys: Sequence[str],
    dev_keys: Sequence[str],
    config: LoraTrainingConfig,
    checkpoint_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> LoraFit:
    """Train, choose on dev, return the best LoRA (see the module notes). ``queries`` holds every key."""
    report = progress or (lambda stage, done, total: None)
    train_keys = [k for k in train_keys if float(queries[k].gains.sum()) > 0]  # nothing to learn from the rest
    if not train_keys:
        raise ValueError("no train query has a relevant passage: the LoRA has nothing to learn from")
    if not dev_keys:
        raise ValueError("no dev queries to choose the LoRA on")
    deepest = max(h.layer for k in [*train_keys, *dev_keys] for h in queries[k].heads)
    layers, targets = lora_targets(backbone.decoder, deepest, mlp=config.mlp)
    path = decoder_path(backbone.model, backbone.decoder)
    checkpoints = None
    if checkpoint_dir is not None:  # keyed by everything that changes the result
        settings = config.model_dump(exclude={"epochs"})  # more epochs continue a finished shorter run
        key = _digest({"fingerprint": backbone.fingerprint(), "dtype": str(backbone.dtype), "config": settings,
                       "train": [(k, queries[k].text, [str(h) for h in queries[k].heads]) for k in train_keys],
                       "dev": [(k, queries[k].fusion_weight, [str(h) for h in queries[k].heads]) for k in dev_keys],
                       "cosines": [(k, queries[k].cosine_weight, None if queries[k].cosine is None
                                    else [round(float(c), 6) for c in queries[k].cosine]) for k in [*train_keys, *dev_keys]],
                       "prompts": sorted({queries[k].scorer.config.model_dump_json() for k in train_keys})})
        checkpoints = Path(checkpoint_dir) / f"adapter-{key}"
        checkpoints.mkdir(parents=True, exist_ok=True)

    def evaluate(adapter: Lora | None) -> tuple[float, dict[str, torch.Tensor], float]:
        values, attention, seconds = [], {}, []
        for index, key in enumerate(dev_keys):
            begun = time.perf_counter()
            scores = routed_attention(queries[key], adapter).detach()
            seconds.append(time.perf_counter() - begun)
            attention[key] = scores
            values.append(ndcg_at_10(final_scores(queries[key], scores), queries[key].gains))
            report("LoRA dev", index + 1, len(dev_keys))
        return statistics.mean(values), attention, statistics.median(seconds)

    base_dev, base_attention, base_seconds = evaluate(None)
    best: dict = {"dev": base_dev, "state": None, "rank": None, "lr": None, "epoch": 0, "attention": base_attention}
    runs, train_seconds, adapted_seconds = [], [], []
    for rank in config.ranks:
        for lr in config.learning_rates:
            adapter_config = LoraConfig(rank=rank, alpha=2.0 * rank, layers=layers, targets=targets,
                                        decoder_path=path, scope=config.scope)
            torch.manual_seed(config.seed)
            adapter = Lora.for_decoder(backbone.decoder, adapter_config).to(backbone.device)
            parameters = list(adapter.parameters())
            optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
            run = {"rank": rank, "lr": lr, "history": [{"epoch": 0, "dev_ndcg": base_dev}]}
            run_best = {"dev": base_dev, "state": None, "epoch": 0, "attention": base_attention}
            start = 1
            checkpoint = checkpoints / f"run-r{rank}-lr{lr:g}.pt" if checkpoints is not None else None
            if checkpoint is not None and checkpoint.is_file():  # resume after the last finished epoch
                saved = torch.load(checkpoint, weights_only=False)
                adapter.load_state_dict(saved["adapter"])
                optimizer.load_state_dict(saved["optimizer"])
                run["history"], run_best, start = saved["history"], saved["best"], saved["epoch"] + 1
            for epoch in range(start, config.epochs + 1):
                order = list(train_keys)
                random.Random(config.seed * 1000 + epoch).shuffle(order)
                adapter.train()
                for start_index in range(0, len(order), config.batch_queries):
                    batch = order[start_index : start_index + config.batch_queries]
                    for parameter in parameters:
                        parameter.grad = None
                    for key in batch:
                        begun = time.perf_counter()
                        query = queries[key]
                        loss = listwise_loss(query, routed_attention(query, adapter, differentiable=True)) / len(batch)
                        # gradients of the LoRA only (the base model's parameters get no .grad: not ours); None for
                        # factors past what the routed heads read (e.g. the MLP of the deepest layer): AdamW skips them
                        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
                        for parameter, grad in zip(parameters, grads):
                            if grad is not None:
                                parameter.grad = grad if parameter.grad is None else parameter.grad + grad
                        train_seconds.append(time.perf_counter() - begun)
                    optimizer.step()
                    report(f"LoRA ({config.scope}) r{rank} lr {lr:g} epoch {epoch}", start_index + len(batch), len(order))
                adapter.eval()
                value, attention, seconds = evaluate(adapter)
                adapted_seconds.append(seconds)
                run["history"].append({"epoch": epoch, "dev_ndcg": value})
                if value > run_best["dev"] + 1e-12:
                    run_best = {"dev": value, "state": copy.deepcopy(adapter.state_dict()), "epoch": epoch,
                                "attention": attention}
                if checkpoint is not None:
                    _save_atomic({"adapter": adapter.state_dict(), "optimizer": optimizer.state_dict(),
                                  "history": run["history"], "best": run_best, "epoch": epoch}, checkpoint)
            run.update({"best_epoch": run_best["epoch"], "best_dev_ndcg": run_best["dev"]})
            runs.append(run)
            if run_best["dev"] > best["dev"] + 1e-12:
                best = {**run_best, "rank": rank, "lr": lr, "config": adapter_config}
    adapter.eval().requires_grad_(False)  # the last run's, after its last epoch
    chosen = None
    if best["state"] is not None:
        chosen = Lora.for_decoder(backbone.decoder, best["config"])
        chosen.load_state_dict(best["state"])
        chosen = chosen.to(backbone.device).eval().requires_grad_(False)
    return LoraFit(
        lora=chosen, rank=best["rank"], learning_rate=best["lr"], epoch=best["epoch"], base_dev_ndcg=base_dev,
        dev_ndcg=best["dev"], runs=runs, dev_attention=best["attention"],
        seconds_per_train_query=statistics.median(train_seconds) if train_seconds else None,
        seconds_per_dev_query={"base": base_seconds, **({"adapted": statistics.median(adapted_seconds)}
                                                        if adapted_seconds else {})},
        last=adapter,
    )
