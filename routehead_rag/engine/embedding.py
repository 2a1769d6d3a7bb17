"""Query embeddings from the frozen LLM: the query alone, one short pass stopped at a chosen layer.

The hidden states after decoder layer ``layer`` (0-based; ``-1`` means the embedding
output before any layer) are pooled over the query's tokens.  The pass stops right
after that layer (:func:`routehead_rag.engine.capture.run_hidden_states`): later layers
and the LM head never run.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .capture import run_hidden_states
from .prompt import encodable


class QueryEmbeddingConfig(BaseModel):
    """Which hidden states embed a query; recorded with a fitted router."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    layer: StrictInt = Field(15, ge=-1, description="decoder layer whose output is pooled (-1: token embeddings)")
    pooling: Literal["mean", "last"] = Field("mean", description="mean over the query tokens, or the last token")


def query_token_ids(backbone, query: str) -> list[int]:
    """The ids the embedding pass reads: the query text alone, with the tokenizer's own special tokens."""
    return list(backbone.tokenizer(encodable(query.strip()))["input_ids"])


def embed_query(backbone, query: str, config: QueryEmbeddingConfig | None = None) -> torch.Tensor:
    """``[hidden]`` float32 embedding of ``query`` (the text alone, with the tokenizer's own special tokens)."""
    config = config or QueryEmbeddingConfig()
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if config.layer >= backbone.num_layers:
        raise ValueError(f"layer {config.layer} does not exist: the backbone has layers 0..{backbone.num_layers - 1}")
    ids = torch.tensor([query_token_ids(backbone, query)], device=backbone.device)  # [1, T]
    with torch.inference_mode(), backbone.peft_adapter_scope():
        hidden = run_hidden_states(backbone.decoder, ids, config.layer)[0].float()  # [T, hidden]
    pooled = hidden.mean(dim=0) if config.pooling == "mean" else hidden[-1]
    return pooled.cpu()
