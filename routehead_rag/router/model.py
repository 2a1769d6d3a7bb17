"""The router: a query embedding in, a score per attention head out.

Architecture (small on purpose: well under 5 MB saved, well under 1 ms per query on CPU)::

    q   = query embedding                         # [hidden]   frozen LLM, mean-pooled (see engine/embedding.py)
    z   = W2 · gelu(W1 · layernorm(q))            # [dim]      a small projection
    s_h = <z, e_h> / sqrt(dim) + b_h              # [head]     one learnable embedding e_h and bias b_h per head

Selection at inference: the top ``k`` heads, or every head whose probability
``sigmoid(s_h)`` passes ``threshold``, clamped to ``[min_heads, max_heads]``. With a
``depth_cost`` c, heads are ranked by ``s_h - c * layer(h) / (num_layers - 1)``: a query whose
best heads are deep but barely better than shallow ones is routed to the shallow ones, and
the forward pass stops earlier (the cost is chosen on dev by ``fit``).

With ``fusion_head``, the router also predicts how much this query should trust the first
stage (:mod:`routehead_rag.fusion`): ``w = softplus(<u, layernorm(q)> + c)``, one more small
linear map of the same query embedding. With ``bi_encoder_head``, likewise how much it should trust
the bi-encoder's cosine (:mod:`routehead_rag.bi_encoder`): its weight times
``exp(<t, layernorm(q)> + e)``, a factor that starts at 1 (``t = 0``, ``e = 0``) and is clamped to
``[exp(-MAX_LOG_SCALE), exp(MAX_LOG_SCALE)]``.
Training lives in :mod:`routehead_rag.fit.training`; this module never imports it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..heads import Head, HeadGrid

MAX_LOG_SCALE = 3.0  # the bi-encoder head scales the weight by at most e^3 (about 20) either way


class RouterConfig(BaseModel):
    """Shape of a router; saved in the artifact's ``config.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    input_dim: int = Field(..., ge=1, description="size of the query embedding (the backbone's hidden size)")
    num_layers: int = Field(..., ge=1)
    num_heads: int = Field(..., ge=1, description="query heads per layer")
    dim: int = Field(64, ge=1, description="width of the projection and of each head embedding")
    hidden: int = Field(256, ge=1, description="hidden width of the projection MLP")
    fusion_head: bool = Field(False, description="also predict a per-query first-stage weight")
    bi_encoder_head: bool = Field(False, description="also predict a per-query scale of the bi-encoder weight")


class SelectionConfig(BaseModel):
    """How many heads a query gets at inference."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    mode: Literal["top_k", "threshold"] = "top_k"
    k: int = Field(4, ge=1, description="heads per query in top_k mode")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, allow_inf_nan=False, description="least probability in threshold mode")
    min_heads: int = Field(1, ge=1)
    max_heads: int = Field(16, ge=1)
    depth_cost: float = Field(
        0.0, ge=0.0, allow_inf_nan=False,
        description="logit penalty for depth: layer / (num_layers - 1) times this (0: off)",
    )

    @model_validator(mode="after")
    def _bounds(self) -> SelectionConfig:
        if self.min_heads > self.max_heads:
            raise ValueError(f"min_heads ({self.min_heads}) must not exceed max_heads ({self.max_heads})")
        return self


class Router(nn.Module):
    """Scores every head of a backbone for a query embedding."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        total = config.num_layers * config.num_heads
        self.norm = nn.LayerNorm(config.input_dim)
        self.project = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.dim)
        )
        self.head_embeddings = nn.Parameter(torch.randn(total, config.dim) * 0.02)  # [head, dim]
        self.head_bias = nn.Parameter(torch.zeros(total))  # [head]
        if config.fusion_head:
            self.fusion_norm = nn.LayerNorm(config.input_dim)
            self.fusion = nn.Linear(config.input_dim, 1)
        if config.bi_encoder_head:
            self.bi_encoder_norm = nn.LayerNorm(config.input_dim)
            self.bi_encoder = nn.Linear(config.input_dim, 1)

    @property
    def grid(self) -> HeadGrid:
        return HeadGrid(self.config.num_layers, self.config.num_heads)

    @property
    def num_total_heads(self) -> int:
        return self.head_bias.numel()

    def forward(self, query_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, head]`` (heads flattened as ``layer * num_heads + head``) for ``[batch, input_dim]``."""
        if query_embeddings.shape[-1] != self.config.input_dim:
            raise ValueError(
                f"query embeddings have size {query_embeddings.shape[-1]}, this router takes {self.config.input_dim}"
            )
        z = self.project(self.norm(query_embeddings.float()))  # [batch, dim]
        return z @ self.head_embeddings.T / math.sqrt(self.config.dim) + self.head_bias  # [batch, head]

    def fusion_weights(self, query_embeddings: torch.Tensor) -> torch.Tensor:
        """Per-query first-stage weights ``[batch]`` (>= 0) for ``[batch, input_dim]``; needs ``fusion_head``."""
        if not self.config.fusion_head:
            raise ValueError("this router has no fusion head (RouterConfig.fusion_head is False)")
        q = self.fusion_norm(query_embeddings.float())
        return nn.functional.softplus(self.fusion(q)).squeeze(-1)  # [batch]

    def bi_encoder_scales(self, query_embeddings: torch.Tensor) -> torch.Tensor:
        """Per-query factors ``[batch]`` (> 0) of the bi-encoder weight for ``[batch, input_dim]``; needs
        ``bi_encoder_head``."""
        if not self.config.bi_encoder_head:
            raise ValueError("this router has no bi-encoder head (RouterConfig.bi_encoder_head is False)")
        q = self.bi_encoder_norm(query_embeddings.float())
        return torch.exp(self.bi_encoder(q).squeeze(-1).clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE))  # [batch]

    def depth_penalty(self, depth_cost: float) -> torch.Tensor:
        """``[head]``: ``depth_cost * layer / (num_layers - 1)`` per flat head index (zeros when off)."""
        layers = torch.arange(self.config.num_layers, dtype=torch.float64).repeat_interleave(self.config.num_heads)
        return depth_cost * layers / max(self.config.num_layers - 1, 1)

    def selection_logits(self, logits: torch.Tensor, depth_cost: float) -> torch.Tensor:
        """``logits`` ``[..., head]`` minus the depth penalty: what selection ranks heads by."""
        if not depth_cost:
            return logits
        return logits - self.depth_penalty(depth_cost).to(logits.dtype)

    @torch.no_grad()
    def select(self, query_embedding: torch.Tensor, selection: SelectionConfig) -> list[Head]:
        """The routed heads for one query embedding ``[input_dim]``, strongest (after the depth penalty) first."""
        logits = self.selection_logits(self(query_embedding.reshape(1, -1))[0], selection.depth_cost)  # [head]
        order = torch.argsort(logits, descending=True, stable=True)
        if selection.mode == "top_k":
            count = selection.k
        else:
            count = int((torch.sigmoid(logits) >= selection.threshold).sum())
        count = max(selection.min_heads, min(count, selection.max_heads, self.num_total_heads))
        return self.grid.heads(order[:count].tolist())
