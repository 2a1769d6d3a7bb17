"""Query-side LoRA: low-rank deltas that change how the query part reads the passages, and nothing else.

A :class:`QueryAdapter` holds LoRA factors ``A [rank, in]`` and ``B [out, rank]`` for linear
projections of the decoder layers ``0..deepest``; with it on, a projection's output becomes
``W x + (alpha / rank) * B A x`` (PEFT's LoRA, exactly). It acts only where the scorer switches it
on: the query part (the real query and the content-free "N/A") of a prompt. The prefix (header and
passages) runs with it off, so the KV cache the query parts attend to is the base model's.

How it is applied, so that a model we are handed (a shared generator) is left as it was:

* the deltas are added by forward hooks registered on the target projections for the span of our
  own call (:meth:`QueryAdapter.attached`) and removed in ``finally``; no module is replaced, no
  parameter added, so the model's module tree and parameters are the same objects before, during
  and after;
* a hook adds its delta only while *its own* attachment is switched on in the calling thread (a
  ``ContextVar``, set by :meth:`AttachedAdapter.on`): a generator running the same model in another
  thread, or another ranker with another attachment, passes through it unchanged.

On disk the adapter is in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``
with ``base_model.model.<module>.lora_A.weight`` keys), so ``peft.PeftModel.from_pretrained`` reads
the same files; a test checks that PEFT's own LoRA gives the same query-part activations.

Training (``routehead-rag fit --adapter``) lives in :mod:`routehead_rag.fit.adapter`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from torch import nn

from .capture import attention_modules

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class QueryAdapterConfig(BaseModel):
    """Which projections carry LoRA factors, and their rank and scale (recorded with a router)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    rank: StrictInt = Field(..., ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(..., gt=0, description="LoRA alpha; the delta is scaled by alpha / rank")
    layers: tuple[StrictInt, ...] = Field(..., min_length=1, description="decoder layers that carry deltas")
    targets: tuple[str, ...] = Field(
        ..., min_length=1, description="linear projections inside each of those layers, as paths from the layer "
        "(e.g. 'self_attn.q_proj', 'mlp.down_proj')"
    )
    decoder_path: str = Field(
        "model", description="where the decoder layers sit in the causal LM ('model' for most: model.layers.N)"
    )

    @model_validator(mode="after")
    def _distinct(self) -> QueryAdapterConfig:
        if len(set(self.layers)) != len(self.layers) or any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be distinct non-negative layer indices, got {list(self.layers)}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets repeat a projection: {list(self.targets)}")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def module_name(self, layer: int, target: str) -> str:
        """The projection's name in the causal LM, as PEFT names it (``model.layers.3.self_attn.q_proj``)."""
        return f"{self.decoder_path}.layers.{layer}.{target}"

    def peft_config(self, base_model: str | None = None) -> dict:
        """``adapter_config.json`` in PEFT's LoRA layout (explicit module names, so no pattern guessing)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "init_lora_weights": True,
            "target_modules": sorted(self.module_name(layer, t) for layer in self.layers for t in self.targets),
            "base_model_name_or_path": base_model,
            "inference_mode": True,
        }


def adapter_targets(decoder: nn.Module, deepest: int, mlp: bool = True) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Layers ``0..deepest`` and the linear projections to adapt in them, found in the model (no name lists).

    The attention projections are the ``nn.Linear`` modules inside each layer's attention module;
    with ``mlp``, every other ``nn.Linear`` of the layer too (the MLP projections).
    """
    if not 0 <= deepest < len(decoder.layers):
        raise ValueError(f"deepest layer {deepest} is outside the decoder's layers 0..{len(decoder.layers) - 1}")
    layer = decoder.layers[0]
    attention = attention_modules(decoder).get(0)
    if attention is None:
        raise ValueError("found no attention module in decoder layer 0, so no projections to adapt")
    attention_names = {id(m) for m in attention.modules()}
    targets = [name for name, module in layer.named_modules()
               if isinstance(module, nn.Linear) and (mlp or id(module) in attention_names)]
    if not targets:
        raise ValueError("decoder layer 0 has no nn.Linear projections to adapt")
    return tuple(range(deepest + 1)), tuple(targets)


def decoder_path(causal_lm: nn.Module, decoder: nn.Module) -> str:
    """The decoder's module path inside ``causal_lm`` (a PeftModel unwrapped), e.g. ``"model"``."""
    from ..model.architecture import unwrap_peft

    base = unwrap_peft(causal_lm)
    for name, module in base.named_modules():
        if module is decoder:
            return name
    raise ValueError("the decoder is not a submodule of the causal LM")


class QueryAdapter(nn.Module):
    """LoRA factors for the query part (see the module notes). ``B`` starts at zero: the base model exactly."""

    def __init__(self, config: QueryAdapterConfig, in_features: dict[str, int], out_features: dict[str, int]):
        super().__init__()
        self.config = config
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for layer in config.layers:
            for target in config.targets:
                key = self.key(layer, target)
                a = torch.empty(config.rank, in_features[target])
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default LoRA init
                self.lora_A[key] = nn.Parameter(a)
                self.lora_B[key] = nn.Parameter(torch.zeros(out_features[target], config.rank))

    @staticmethod
    def key(layer: int, target: str) -> str:
        return f"{layer}:{target}".replace(".", "/")  # ParameterDict keys cannot hold dots

    @classmethod
    def for_decoder(cls, decoder: nn.Module, config: QueryAdapterConfig) -> QueryAdapter:
        """A fresh adapter (``B = 0``) shaped for ``decoder``'s projections; errors name a missing target."""
        check_fits(decoder, config)
        layer = decoder.layers[config.layers[0]]
        shapes = {t: layer.get_submodule(t) for t in config.targets}
        return cls(config, {t: m.in_features for t, m in shapes.items()}, {t: m.out_features for t, m in shapes.items()})

    # -- PEFT layout -----------------------------------------------------------------------------
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``{base_model.model.<module>.lora_A.weight: [rank, in], ...lora_B.weight: [out, rank]}`` (float32, CPU)."""
        state = {}
        for layer in self.config.layers:
            for target in self.config.targets:
                key, name = self.key(layer, target), self.config.module_name(layer, target)
                state[f"base_model.model.{name}.lora_A.weight"] = self.lora_A[key].detach().float().cpu().contiguous()
                state[f"base_model.model.{name}.lora_B.weight"] = self.lora_B[key].detach().float().cpu().contiguous()
        return state

    @classmethod
    def from_peft_state_dict(cls, config: QueryAdapterConfig, state: dict[str, torch.Tensor]) -> QueryAdapter:
        """The adapter from PEFT-layout tensors; ``ValueError`` naming what is missing, extra or misshapen."""
        expected = {}
        for layer in config.layers:
            for target in config.targets:
                for factor in "AB":
                    expected[f"base_model.model.{config.module_name(layer, target)}.lora_{factor}.weight"] = (layer, target)
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"adapter weights do not match adapter_config.json: missing {missing[:3]}, extra {extra[:3]}")
        in_features, out_features = {}, {}
        for name, tensor in state.items():
            target = expected[name][1]
            if tensor.dim() != 2 or not tensor.is_floating_point() or not bool(tensor.isfinite().all()):
                raise ValueError(f"adapter tensor {name!r} is not a finite 2-D floating-point matrix")
            if _KEY.match(name)["factor"] == "A":
                if tensor.shape[0] != config.rank or in_features.setdefault(target, tensor.shape[1]) != tensor.shape[1]:
                    raise ValueError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, not [rank {config.rank}, in]")
            elif tensor.shape[1] != config.rank or out_features.setdefault(target, tensor.shape[0]) != tensor.shape[0]:
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, not [out, rank {config.rank}]")
        adapter = cls(config, in_features, out_features)
        with torch.no_grad():
            for name, (layer, target) in expected.items():
                factor = adapter.lora_A if _KEY.match(name)["factor"] == "A" else adapter.lora_B
                factor[cls.key(layer, target)].copy_(state[name].float())
        return adapter

    # -- applying it -----------------------------------------------------------------------------
    def attached(self, decoder: nn.Module) -> AttachedAdapter:
        """Context manager: hooks on ``decoder``'s target projections for the block, removed on exit."""
        return AttachedAdapter(self, decoder)

    def delta(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``(alpha / rank) * B A x`` for ``x`` ``[..., in]`` -> ``[..., out]``, in the factors' dtype."""
        a, b = self.lora_A[key], self.lora_B[key]
        return (x.to(a.dtype) @ a.t()) @ b.t() * self.config.scale


def check_fits(decoder: nn.Module, config: QueryAdapterConfig) -> None:
    """``ValueError`` if a configured layer or projection does not exist (or is not linear) in ``decoder``."""
    count = len(decoder.layers)
    bad_layers = [layer for layer in config.layers if layer >= count]
    if bad_layers:
        raise ValueError(f"the adapter targets layers {bad_layers}, but the decoder has layers 0..{count - 1}")
    for target in config.targets:
        try:
            module = decoder.layers[config.layers[0]].get_submodule(target)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            linear = [n for n, m in decoder.layers[0].named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"the adapter targets {target!r}, which is not a linear projection of this model's "
                             f"decoder layers (they have {linear}); fit the adapter for this backbone")


_SWITCHED_ON: ContextVar[AttachedAdapter | None] = ContextVar("routehead_query_adapter", default=None)


class AttachedAdapter:
    """An adapter's hooks on one decoder, for one ``with`` block; deltas only inside :meth:`on`, only in that thread."""

    def __init__(self, adapter: QueryAdapter, decoder: nn.Module):
        self.adapter, self.decoder = adapter, decoder
        self._handles: list = []

    def __enter__(self) -> AttachedAdapter:
        check_fits(self.decoder, self.adapter.config)
        try:
            for layer in self.adapter.config.layers:
                for target in self.adapter.config.targets:
                    module = self.decoder.layers[layer].get_submodule(target)
                    self._handles.append(module.register_forward_hook(self._hook(QueryAdapter.key(layer, target))))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, key: str):
        def add_delta(module, args, output):
            if _SWITCHED_ON.get() is not self:
                return None  # another thread, another attachment, or the prefix: the base projection
            return output + self.adapter.delta(key, args[0]).to(output.dtype)

        return add_delta

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        """The deltas act in this block, in the calling thread only."""
        token = _SWITCHED_ON.set(self)
        try:
            yield
        finally:
            _SWITCHED_ON.reset(token)


@contextlib.contextmanager
def query_part_switch(adapter: QueryAdapter | None, decoder: nn.Module) -> Iterator:
    """``with query_part_switch(adapter, decoder) as on: ... with on(): <query-part pass>``.

    ``on()`` switches the adapter on for the block; without an adapter it does nothing.
    """
    if adapter is None:
        yield contextlib.nullcontext
        return
    with adapter.attached(decoder) as attachment:
        yield attachment.on


def query_adapter_bytes(adapter: QueryAdapter, base_fingerprint: dict, base_model: str | None) -> tuple[bytes, str]:
    """The adapter's ``adapter_model.safetensors`` bytes (PEFT keys, base fingerprint in the metadata)
    and its ``adapter_config.json`` text."""
    import json

    from safetensors.torch import save

    weights = save(adapter.peft_state_dict(), metadata={
        "format": "pt", "routehead_base_fingerprint": json.dumps(base_fingerprint, sort_keys=True)})
    return weights, json.dumps(adapter.config.peft_config(base_model), indent=2) + "\n"


def parse_query_adapter(config: QueryAdapterConfig, weights: bytes) -> QueryAdapter:
    """The adapter from ``adapter_model.safetensors`` bytes; ``ValueError`` if they do not fit ``config``."""
    from safetensors.torch import load

    return QueryAdapter.from_peft_state_dict(config, load(weights))


def adapter_digest(adapter: QueryAdapter) -> str:
    """sha256 of the adapter's weights (its PEFT state dict as safetensors, no metadata): what a cache
    of scores made with it is keyed on."""
    import hashlib

    from safetensors.torch import save

    return hashlib.sha256(save(adapter.peft_state_dict())).hexdigest()


def all_zero(adapter: QueryAdapter) -> bool:
    return all(not bool(p.any()) for p in adapter.lora_B.values())


__all__: Sequence[str] = (
    "QueryAdapter", "QueryAdapterConfig", "AttachedAdapter", "adapter_targets", "decoder_path", "query_part_switch",
    "adapter_digest", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME",
)
