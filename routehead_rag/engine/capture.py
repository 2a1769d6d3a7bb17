"""Capture query-row attention per head through transformers' own extension point.

We register one attention function, ``routehead_capture``, in transformers'
``AttentionInterface`` (and a matching mask function in ``AttentionMaskInterface``)
and switch a model's attention implementation to it only for the span of our
own call (:func:`capture_scope`), restoring the owner's setting in ``finally``.
The model's code is never copied or patched.

Inside that scope the function does two things per attention layer:

* when the *calling thread* has an active :class:`CaptureRequest` (a
  ``ContextVar``), it computes the softmax rows of the requested query positions
  for the requested heads only (``[heads, rows, keys]``, GQA mapped, causal or
  sliding-window mask applied) and stores them on the request; it never forms
  full ``[T, T]`` attention.  The layer output is computed with SDPA as usual,
  and once the deepest requested layer has updated its KV cache the forward is
  stopped (early exit: later layers and the LM head are never run);
* when the calling thread has no active request (say, a generator sharing the
  same model in another thread), it passes straight through to the model's
  original attention and mask functions, so that code behaves as before.

Two threads capturing at once each see only their own rows.

The same early exit serves :func:`run_hidden_states`: the hidden states after one decoder
layer (a query embedding), read by a forward hook that exists only for our call, acts
only in the calling thread, and stops the pass right there.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

CAPTURE_IMPLEMENTATION = "routehead_capture"


class _StopForward(Exception):
    """Raised inside the deepest needed layer to skip every later layer (attention rows or hidden states)."""


@dataclass
class CaptureRequest:
    """What one forward pass should capture.

    ``heads_by_layer`` maps a layer index to the query-head indices to capture
    (``None``: all heads).  Rows ``row_start:`` of this forward's query positions are
    captured; with ``mean_rows`` they are averaged over those rows on the fly, so
    a layer stores ``[batch, heads, keys]`` instead of ``[batch, heads, rows, keys]``.
    In a padded batch, ``row_counts[b]`` is how many of element ``b``'s rows are real
    (the rest are right padding, left out of the mean).
    """

    heads_by_layer: Mapping[int, Sequence[int] | None] = field(default_factory=dict)
    row_start: int = 0
    mean_rows: bool = False
    stop_after_layer: int | None = None
    row_counts: Sequence[int] | None = None  # real rows per batch element (None: every row)
    # filled in: layer -> [batch, heads, rows, keys] (or [batch, heads, keys] with mean_rows), float32
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    layers_seen: set[int] = field(default_factory=set)
    _head_index_cache: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def head_index(self, layer: int, device: torch.device) -> torch.Tensor | None:
        heads = self.heads_by_layer[layer]
        if heads is None:
            return None
        key = (layer, str(device))
        if key not in self._head_index_cache:  # heads come checked (routehead_rag.strategy)
            self._head_index_cache[key] = torch.as_tensor(list(heads), dtype=torch.long, device=device)
        return self._head_index_cache[key]


_ACTIVE: ContextVar[CaptureRequest | None] = ContextVar("routehead_capture_request", default=None)

# id(config) -> [config, original implementation name, number of open scopes]
_SWITCHED: dict[int, list] = {}
_SWITCH_LOCK = threading.Lock()
_REGISTERED = False


# ---------------------------------------------------------------------------------------------
# attention function
# ---------------------------------------------------------------------------------------------
def _row_logits_to_probs(
    logits: torch.Tensor,  # [batch, heads, rows, keys] float32, already scaled (and soft-capped)
    mask_rows: torch.Tensor | None,  # [batch | 1, 1, rows, keys] bool (True: attend) or additive float, or None
    first_row_position: int,  # absolute position of the first row (for a causal mask when none is given)
) -> torch.Tensor:
    if mask_rows is None:
        rows, keys = logits.shape[-2:]
        positions = torch.arange(rows, device=logits.device) + first_row_position
        allowed = torch.arange(keys, device=logits.device)[None, :] <= positions[:, None]  # [rows, keys]
        logits = logits.masked_fill(~allowed, float("-inf"))
    elif mask_rows.dtype == torch.bool:
        logits = logits.masked_fill(~mask_rows, float("-inf"))
    else:
        logits = logits + mask_rows.float()
    return torch.softmax(logits, dim=-1)


def _capture_rows(module: nn.Module, request: CaptureRequest, query, key, attention_mask, scaling, softcap):
    """Softmax rows ``[batch, heads, rows, keys]`` of the requested heads (or their mean over real rows)."""
    layer = module.layer_idx
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    groups = num_heads // num_kv_heads
    q_len, k_len = query.shape[2], key.shape[2]
    start = request.row_start
    heads = request.head_index(layer, query.device)
    if heads is None:
        q = query[:, :, start:, :]  # [batch, heads, rows, dim]
        k = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # [batch, heads, keys, dim]
    else:
        q = query[:, heads, start:, :]
        k = key[:, heads // groups]  # GQA: query head h reads key/value head h // groups
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # [batch, heads, rows, keys]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    mask_rows = None
    if isinstance(attention_mask, torch.Tensor):
        mask_rows = attention_mask[:, :1, start:, :k_len]  # [batch | 1, 1, rows, keys]
    probs = _row_logits_to_probs(logits, mask_rows, first_row_position=k_len - q_len + start)
    if request.mean_rows:
        if request.row_counts is None:
            probs = probs.mean(dim=2)  # [batch, heads, keys]
        else:  # padded rows (all masked, softmax undefined) are left out
            probs = torch.stack([probs[b, :, : max(count - start, 1)].mean(dim=1)
                                 for b, count in enumerate(request.row_counts)])
    request.rows[layer] = probs


def _eager_attention(module, query, key, value, attention_mask, scaling, softcap, dropout):
    """Reference attention for features SDPA lacks (logit soft-capping)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is None:
        q_len, k_len = query.shape[2], key.shape[2]
        positions = torch.arange(q_len, device=query.device) + (k_len - q_len)
        attention_mask = torch.arange(k_len, device=query.device)[None, :] <= positions[:, None]
    if attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, float("-inf"))
    else:
        logits = logits + attention_mask
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def _original_attention(module: nn.Module):
    """The attention function the model's owner had configured."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    entry = _SWITCHED.get(id(module.config))
    original = entry[1] if entry is not None else "sdpa"
    if original not in (None, "eager") and original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    # The modeling file's own eager function, found by feature detection; ours otherwise.
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is not None:
        return eager
    return lambda m, q, k, v, mask, scaling=None, dropout=0.0, softcap=None, **kw: _eager_attention(
        m, q, k, v, mask, scaling if scaling is not None else q.shape[-1] ** -0.5, softcap, dropout
    )


def capture_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``routehead_capture`` attention function (``AttentionInterface`` signature).

    Shapes: query ``[batch, heads, q_len, dim]``, key/value ``[batch, kv_heads, k_len, dim]``.
    """
    request = _ACTIVE.get()
    if request is None:
        return _original_attention(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    layer = module.layer_idx
    request.layers_seen.add(layer)
    if layer in request.heads_by_layer:
        _capture_rows(module, request, query, key, attention_mask, scaling, softcap)
    if request.stop_after_layer is not None and layer >= request.stop_after_layer:
        raise _StopForward
    if softcap is not None or kwargs.get("s_aux") is not None:
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError("attention sinks (s_aux) are not supported by routehead-rag's capture")
        return _eager_attention(module, query, key, value, attention_mask, scaling, softcap, dropout)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def capture_mask(*args, config=None, **kwargs):
    """Mask function for ``routehead_capture``: SDPA's mask while capturing, the owner's otherwise."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if _ACTIVE.get() is None and config is not None:
        entry = _SWITCHED.get(id(config))
        original = entry[1] if entry is not None else None
        if original in ALL_MASK_ATTENTION_FUNCTIONS:
            return ALL_MASK_ATTENTION_FUNCTIONS[original](*args, config=config, **kwargs)
        if original in (None, "eager"):
            return ALL_MASK_ATTENTION_FUNCTIONS["eager"](*args, config=config, **kwargs)
    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, config=config, **kwargs)


def register() -> None:
    """Register ``routehead_capture`` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, capture_mask)
    _REGISTERED = True


# ---------------------------------------------------------------------------------------------
# scoped switch of the implementation
# ---------------------------------------------------------------------------------------------
def attention_modules(decoder: nn.Module) -> dict[int, nn.Module]:
    """``layer_idx -> attention module`` for every attention module of a decoder (feature detection)."""
    found: dict[int, nn.Module] = {}
    for module in decoder.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and hasattr(module, "config") and (
            hasattr(module, "q_proj") or hasattr(module, "qkv_proj") or hasattr(module, "c_attn")
        ):
            found.setdefault(layer, module)
    return found


@contextlib.contextmanager
def capture_scope(decoder: nn.Module) -> Iterator[None]:
    """Route ``decoder``'s attention through ``routehead_capture`` for the duration of the block.

    Re-entrant and thread-safe: the owner's setting is restored when the last open
    scope on that model closes, in ``finally``.
    """
    register()
    configs = {id(decoder.config): decoder.config}
    for module in attention_modules(decoder).values():
        configs[id(module.config)] = module.config
    with _SWITCH_LOCK:
        for key, config in configs.items():
            entry = _SWITCHED.get(key)
            if entry is None:
                _SWITCHED[key] = [config, config._attn_implementation_internal, 1]
                config._attn_implementation_internal = CAPTURE_IMPLEMENTATION
            else:
                entry[2] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            for key in configs:
                entry = _SWITCHED[key]
                entry[2] -= 1
                if entry[2] == 0:
                    entry[0]._attn_implementation_internal = entry[1]
                    del _SWITCHED[key]


def _cache_argument_name(decoder: nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; detect which one this decoder takes."""
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def run_capture(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    cache,
    request: CaptureRequest,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> CaptureRequest:
    """One forward of ``input_ids`` ``[batch, T]`` through ``decoder`` (no LM head), capturing per ``request``.

    The caller holds :func:`capture_scope` and ``torch.inference_mode``.  ``cache`` (a
    ``DynamicCache``) is extended in place for every layer up to the deepest one run.  A padded
    batch passes its 2-D ``attention_mask`` ``[batch, past + T]`` and ``position_ids`` ``[batch, T]``.
    """
    extra = {}
    if attention_mask is not None:
        extra["attention_mask"] = attention_mask
    if position_ids is not None:
        extra["position_ids"] = position_ids
    token = _ACTIVE.set(request)
    try:
        decoder(input_ids=input_ids, use_cache=True, **{_cache_argument_name(decoder): cache}, **extra)
    except _StopForward:
        pass
    finally:
        _ACTIVE.reset(token)
    missing = set(request.heads_by_layer) - set(request.rows)
    if missing:
        raise RuntimeError(
            f"attention of layers {sorted(missing)} never reached routehead-rag's capture function: this "
            "model's attention does not go through transformers' AttentionInterface"
        )
    return request


# ---------------------------------------------------------------------------------------------
# hidden states after one layer (the same early exit)
# ---------------------------------------------------------------------------------------------
_HIDDEN: ContextVar[dict | None] = ContextVar("routehead_hidden_states", default=None)


def run_hidden_states(decoder: nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states ``[1, T, hidden]`` after decoder layer ``layer`` (``-1``: the token embeddings).

    The forward stops right after that layer.  The hook that reads the output is registered
    for this call only, removed in ``finally``, and acts only in the calling thread, so a
    generator sharing the model in another thread is unaffected.  The caller holds
    ``torch.inference_mode`` (and any adapter scope).
    """
    module = decoder.get_input_embeddings() if layer == -1 else decoder.layers[layer]
    state: dict = {}

    def keep(_module, _args, output):
        if _HIDDEN.get() is state:
            state["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

    handle = module.register_forward_hook(keep)
    token = _HIDDEN.set(state)
    try:
        decoder(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        _HIDDEN.reset(token)
        handle.remove()
    if "hidden" not in state:
        raise RuntimeError(f"the forward pass never reached decoder layer {layer}")
    return state["hidden"]
