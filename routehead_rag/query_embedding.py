"""Query embeddings from the frozen LLM: the query alone, one short pass stopped at a chosen layer.

The hidden states after decoder layer ``layer`` (0-based; ``-1`` means the embedding
output before any layer) are pooled over the query's tokens.  The pass stops right
after that layer (later layers and the LM head never run).  The hook that reads the
hidden states is registered for our call only, removed in ``finally``, and acts only in
the calling thread, so a generator sharing the model is unaffected.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

_ACTIVE: ContextVar[dict | None] = ContextVar("routehead_query_embedding", default=None)


class _Stop(Exception):
    pass


class QueryEmbeddingConfig(BaseModel):
    """Which hidden states embed a query; recorded with a fitted router."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(15, ge=-1, description="decoder layer whose output is pooled (-1: token embeddings)")
    pooling: Literal["mean", "last"] = Field("mean", description="mean over the query tokens, or the last token")


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def embed_query(backbone, query: str, config: QueryEmbeddingConfig | None = None) -> torch.Tensor:
    """``[hidden]`` float32 embedding of ``query`` (the text alone, with the tokenizer's own special tokens)."""
    config = config or QueryEmbeddingConfig()
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if config.layer >= backbone.num_layers:
        raise ValueError(f"layer {config.layer} does not exist: the backbone has layers 0..{backbone.num_layers - 1}")
    decoder = backbone.decoder
    ids = backbone.tokenizer(query.strip(), return_tensors="pt")["input_ids"].to(backbone.device)  # [1, T]
    state: dict = {}

    def keep(module, args, output):
        if _ACTIVE.get() is state:
            state["hidden"] = _hidden(output)  # [1, T, hidden]
            raise _Stop

    if config.layer == -1:
        module = decoder.get_input_embeddings()
    else:
        module = decoder.layers[config.layer]
    handle = module.register_forward_hook(keep)
    token = _ACTIVE.set(state)
    try:
        with torch.inference_mode(), backbone.adapter_scope():
            decoder(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        _ACTIVE.reset(token)
        handle.remove()
    hidden = state["hidden"][0].float()  # [T, hidden]
    pooled = hidden.mean(dim=0) if config.pooling == "mean" else hidden[-1]
    return pooled.cpu()
