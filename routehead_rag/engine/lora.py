"""The scoring LoRA: low-rank deltas on the decoder's projections, switched on only where its scope says.

A :class:`Lora` holds LoRA factors ``A [rank, in]`` and ``B [out, rank]`` for linear
projections of the decoder layers ``0..deepest``; with it on, a projection's output becomes
``W x + (alpha / rank) * B A x`` (PEFT's LoRA, exactly). Its :attr:`LoraConfig.scope` says where the
scorer switches it on:

* ``"query"``: the query part (the real query and the content-free "N/A") of a prompt only. The
  prefix (header and passages) runs with it off, so the KV cache the query parts attend to is the
  base model's (a generator's cached passages stay valid);
* ``"prompt"``: the whole prompt, passages included, so the passages' keys and values become
  relevance-aware. For a model we load ourselves it is merged into the weights once at load
  (:func:`merge_into`: no cost per query); for a shared model it is applied by the hooks below for the
  span of our call only.

How it is applied, so that a model we are handed (a shared generator) is left as it was:

* the deltas are added by forward hooks registered on the target projections for the span of our
  own call (:meth:`Lora.attached`) and removed in ``finally``; no module is replaced, no
  parameter added, so the model's module tree and parameters are the same objects before, during
  and after;
* a hook adds its delta only while *its own* attachment is switched on in the calling thread (a
  ``ContextVar``, set by :meth:`AttachedLora.on`): a generator running the same model in another
  thread, or another ranker with another attachment, passes through it unchanged.

On disk the LoRA is in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``
with ``base_model.model.<module>.lora_A.weight`` keys), so ``peft.PeftModel.from_pretrained`` reads
the same files; a test checks that PEFT's own LoRA gives the same query-part activations.

Training (``routehead-rag fit --lora``) lives in :mod:`routehead_rag.fit.lora`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from torch import nn

from .capture import attention_modules

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class LoraConfig(BaseModel):
    """Which projections carry LoRA factors, their rank and scale, and where they act (recorded with a router)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    rank: StrictInt = Field(..., ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(..., gt=0, allow_inf_nan=False, description="LoRA alpha; the delta is scaled by alpha / rank")
    scope: Literal["query", "prompt"] = Field(
        "query", description="query: the query part only (the passages' pass is the base model's); prompt: everything"
    )
    layers: tuple[StrictInt, ...] = Field(..., min_length=1, description="decoder layers that carry deltas")
    targets: tuple[str, ...] = Field(
        ..., min_length=1, description="linear projections inside each of those layers, as paths from the layer "
        "(e.g. 'self_attn.q_proj', 'mlp.down_proj')"
    )
    decoder_path: str = Field(
        "model", description="where the decoder layers sit in the causal LM ('model' for most: model.layers.N)"
    )

    @model_validator(mode="after")
    def _distinct(self) -> LoraConfig:
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


def lora_targets(decoder: nn.Module, deepest: int, mlp: bool = True) -> tuple[tuple[int, ...], tuple[str, ...]]:
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


class Lora(nn.Module):
    """LoRA factors for the query part (see the module notes). ``B`` starts at zero: the base model exactly."""

    def __init__(self, config: LoraConfig, in_features: dict[str, int], out_features: dict[str, int]):
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
    def for_decoder(cls, decoder: nn.Module, config: LoraConfig) -> Lora:
        """A fresh LoRA (``B = 0``) shaped for ``decoder``'s projections; errors name a missing target."""
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
    def from_peft_state_dict(cls, config: LoraConfig, state: dict[str, torch.Tensor]) -> Lora:
        """The LoRA from PEFT-layout tensors; ``ValueError`` naming what is missing, extra or misshapen."""
        expected = {}
        for layer in config.layers:
            for target in config.targets:
                for factor in "AB":
                    expected[f"base_model.model.{config.module_name(layer, target)}.lora_{factor}.weight"] = (layer, target)
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"LoRA weights do not match adapter_config.json: missing {missing[:3]}, extra {extra[:3]}")
        in_features, out_features = {}, {}
        for name, tensor in state.items():
            target = expected[name][1]
            if tensor.dim() != 2 or not tensor.is_floating_point() or not bool(tensor.isfinite().all()):
                raise ValueError(f"LoRA tensor {name!r} is not a finite 2-D floating-point matrix")
            if _KEY.match(name)["factor"] == "A":
                if tensor.shape[0] != config.rank or in_features.setdefault(target, tensor.shape[1]) != tensor.shape[1]:
                    raise ValueError(f"LoRA tensor {name!r} has shape {tuple(tensor.shape)}, not [rank {config.rank}, in]")
            elif tensor.shape[1] != config.rank or out_features.setdefault(target, tensor.shape[0]) != tensor.shape[0]:
                raise ValueError(f"LoRA tensor {name!r} has shape {tuple(tensor.shape)}, not [out, rank {config.rank}]")
        lora = cls(config, in_features, out_features)
        with torch.no_grad():
            for name, (layer, target) in expected.items():
                factor = lora.lora_A if _KEY.match(name)["factor"] == "A" else lora.lora_B
                factor[cls.key(layer, target)].copy_(state[name].float())
        return lora

    # -- applying it -----------------------------------------------------------------------------
    def attached(self, decoder: nn.Module) -> AttachedLora:
        """Context manager: hooks on ``decoder``'s target projections for the block, removed on exit."""
        return AttachedLora(self, decoder)

    def delta(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``(alpha / rank) * B A x`` for ``x`` ``[..., in]`` -> ``[..., out]``, in the factors' dtype."""
        a, b = self.lora_A[key], self.lora_B[key]
        return (x.to(a.dtype) @ a.t()) @ b.t() * self.config.scale


def check_fits(decoder: nn.Module, lora: Lora | LoraConfig) -> None:
    """``ValueError`` if a configured layer or projection does not exist (or is not linear) in ``decoder``, or,
    given a :class:`Lora`, if a factor's shape is not its projection's (``A [rank, in]``, ``B [out, rank]``)."""
    config = lora.config if isinstance(lora, Lora) else lora
    count = len(decoder.layers)
    bad_layers = [layer for layer in config.layers if layer >= count]
    if bad_layers:
        raise ValueError(f"the LoRA targets layers {bad_layers}, but the decoder has layers 0..{count - 1}")
    for layer in config.layers:
        for target in config.targets:
            try:
                module = decoder.layers[layer].get_submodule(target)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear):
                linear = [n for n, m in decoder.layers[0].named_modules() if isinstance(m, nn.Linear)]
                raise ValueError(f"the LoRA targets {target!r}, which is not a linear projection of this model's "
                                 f"decoder layer {layer} (they have {linear}); fit the LoRA for this backbone")
            if isinstance(lora, Lora):
                key, name = Lora.key(layer, target), f"base_model.model.{config.module_name(layer, target)}"
                for factor, got, want in (("A", lora.lora_A[key].shape, (config.rank, module.in_features)),
                                          ("B", lora.lora_B[key].shape, (module.out_features, config.rank))):
                    if tuple(got) != want:
                        raise ValueError(
                            f"{ADAPTER_WEIGHTS_NAME}: {name}.lora_{factor}.weight has shape {list(got)}, but "
                            f"{config.module_name(layer, target)} takes {module.in_features} and gives "
                            f"{module.out_features}, so it must be {list(want)}: restore the router folder, or fit "
                            "the LoRA for this backbone (routehead-rag fit --lora)")


_SWITCHED_ON: ContextVar[AttachedLora | None] = ContextVar("routehead_lora", default=None)


class AttachedLora:
    """A LoRA's hooks on one decoder, for one ``with`` block; deltas only inside :meth:`on`, only in that thread."""

    def __init__(self, lora: Lora, decoder: nn.Module):
        self.lora, self.decoder = lora, decoder
        self._handles: list = []

    def __enter__(self) -> AttachedLora:
        check_fits(self.decoder, self.lora)
        try:
            for layer in self.lora.config.layers:
                for target in self.lora.config.targets:
                    module = self.decoder.layers[layer].get_submodule(target)
                    self._handles.append(module.register_forward_hook(self._hook(Lora.key(layer, target))))
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
            return output + self.lora.delta(key, args[0]).to(output.dtype)

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
def lora_switch(lora: Lora | None, decoder: nn.Module) -> Iterator:
    """``with lora_switch(lora, decoder) as on: ... with on(): <query-part pass>``.

    ``on()`` switches the LoRA on for the block; without a LoRA it does nothing.
    """
    if lora is None:
        yield contextlib.nullcontext
        return
    with lora.attached(decoder) as attachment:
        yield attachment.on


def lora_bytes(lora: Lora, base_fingerprint: dict, base_model: str | None) -> tuple[bytes, str]:
    """The LoRA's ``adapter_model.safetensors`` bytes (PEFT keys, base fingerprint in the metadata)
    and its ``adapter_config.json`` text."""
    import json

    from safetensors.torch import save

    weights = save(lora.peft_state_dict(), metadata={
        "format": "pt", "routehead_base_fingerprint": json.dumps(base_fingerprint, sort_keys=True)})
    return weights, json.dumps(lora.config.peft_config(base_model), indent=2) + "\n"


def parse_lora(config: LoraConfig, weights: bytes) -> Lora:
    """The LoRA from ``adapter_model.safetensors`` bytes; ``ValueError`` if they do not fit ``config``."""
    from safetensors.torch import load

    return Lora.from_peft_state_dict(config, load(weights))


def lora_digest(lora: Lora) -> str:
    """sha256 of the LoRA's weights (its PEFT state dict as safetensors, no metadata): what a cache
    of scores made with it is keyed on."""
    import hashlib

    from safetensors.torch import save

    return hashlib.sha256(save(lora.peft_state_dict())).hexdigest()


def merge_into(decoder: nn.Module, lora: Lora) -> None:
    """Add ``lora``'s deltas to ``decoder``'s projection weights in place (``W += (alpha / rank) B A``).

    Only for a model we loaded ourselves (never a caller's): then a prompt-scope LoRA costs nothing
    per query. The merged model scores as the hooks would, to float rounding."""
    check_fits(decoder, lora)
    with torch.no_grad():
        for layer in lora.config.layers:
            for target in lora.config.targets:
                module = decoder.layers[layer].get_submodule(target)
                key = Lora.key(layer, target)
                delta = (lora.lora_B[key].float() @ lora.lora_A[key].float()) * lora.config.scale  # [out, in]
                module.weight.add_(delta.to(device=module.weight.device, dtype=module.weight.dtype))


__all__: Sequence[str] = (
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AttachedLora",
    "Lora",
    "LoraConfig",
    "decoder_path",
    "lora_digest",
    "lora_switch",
    "lora_targets",
    "merge_into",
)
