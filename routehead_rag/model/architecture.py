"""What a model is, read without loading weights: the architecture check and the layer/head shape.

Architectures are accepted by feature detection, never by name: the model must be a
decoder-only causal LM whose attention goes through transformers' ``AttentionInterface``
(``_supports_attention_backend``), with a decoder stack exposing ``.layers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .gguf_cache import EMBEDDED_DEFAULT, BackboneNotAvailableError, cached_conversion, convert_gguf, embedded_gguf_path

_SUPPORTED_EXAMPLES = "e.g. llama, qwen2, gemma3, mistral"


class UnsupportedArchitectureError(ValueError):
    """The model is not a decoder-only LM whose attention goes through ``AttentionInterface``."""


def is_peft_model(obj: object) -> bool:
    # peft is optional: if nobody imported it, `obj` cannot be a PeftModel.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(obj, peft.PeftModel)


def unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if is_peft_model(model) else model


def first_parameter(module: nn.Module) -> torch.Tensor:
    try:
        return next(module.parameters())
    except StopIteration:
        raise ValueError(f"{type(module).__name__} has no parameters.") from None


def find_decoder(causal_lm: nn.Module) -> nn.Module | None:
    """The decoder stack (a module with a ``.layers`` ModuleList), or None."""
    candidates: list[Any] = []
    get_decoder = getattr(causal_lm, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(Exception):  # best-effort lookup in transformers; may raise
            candidates.append(get_decoder())
    candidates.append(getattr(causal_lm, "base_model", None))
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    return None


def unsupported_message(config: Any, class_name: str, reasons: list[str]) -> str:
    model_type = getattr(config, "model_type", None) or class_name
    return (
        f"Unsupported architecture {model_type!r} ({class_name}): {'; '.join(reasons)}. "
        f"routehead-rag needs a decoder-only causal LM whose attention goes through transformers' "
        f"AttentionInterface ({_SUPPORTED_EXAMPLES})."
    )


def check_supported(causal_lm: Any) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless ``causal_lm`` can be scored.

    Accepted iff (feature detection only): the class sets ``_supports_attention_backend``;
    the config is not encoder-decoder and has ``num_attention_heads``; the model has an LM
    head; its decoder exposes ``.layers`` and every layer holds a causal attention module
    with a ``layer_idx``. A ``peft.PeftModel`` is checked through its base model.

    Raises:
        TypeError: ``causal_lm`` is not a transformers ``PreTrainedModel`` (or PeftModel).
        UnsupportedArchitectureError: it is a model, but not one we can read attention from.
    """
    model = unwrap_peft(causal_lm)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"Expected a transformers PreTrainedModel or peft.PeftModel, got {type(causal_lm).__name__}."
        )
    reasons: list[str] = []
    if not getattr(type(model), "_supports_attention_backend", False):
        reasons.append("its attention does not go through AttentionInterface (_supports_attention_backend is False)")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("it is an encoder-decoder model")
    text_config = config.get_text_config(decoder=True)
    if not isinstance(getattr(text_config, "num_attention_heads", None), int):
        reasons.append("its config has no num_attention_heads")
    if model.get_output_embeddings() is None:
        reasons.append("it has no LM head (pass the *ForCausalLM model, not the bare decoder)")
    decoder = find_decoder(model)
    if decoder is None:
        reasons.append("it has no decoder stack with `.layers`")
    else:
        for index, layer in enumerate(decoder.layers):
            attention = [m for m in layer.modules() if hasattr(m, "layer_idx") and getattr(m, "is_causal", False)]
            if not attention:
                reasons.append(f"decoder layer {index} has no causal attention module with a layer_idx")
                break
    if reasons:
        raise UnsupportedArchitectureError(unsupported_message(config, type(model).__name__, reasons))


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What argument checks need from a model, read from its config without loading weights."""

    num_layers: int
    num_heads: int
    model_type: str | None = None


def _shape_of_config(config: Any) -> ModelShape:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return ModelShape(int(text.num_hidden_layers), int(text.num_attention_heads), getattr(text, "model_type", None))


def peek_shape(
    model: Any, *, convert: bool = False, cache_dir: str | os.PathLike[str] | None = None
) -> ModelShape | None:
    """Layers and heads of ``model`` from its config, without loading weights; ``None`` if unknown cheaply.

    A model object, a local folder, a cached hub id, or a GGUF whose conversion is cached are
    read directly.  A GGUF not yet converted is converted first with ``convert=True`` (its
    conversion is needed to load it anyway), else ``None``; so is a hub id that is not cached.
    """
    if isinstance(model, nn.Module):
        return _shape_of_config(unwrap_peft(model).config)
    if not isinstance(model, (str, os.PathLike)):
        return None
    from transformers import AutoConfig

    source = os.fspath(model)
    path = pathlib.Path(source).expanduser()
    folder: pathlib.Path | None = None
    if (source == EMBEDDED_DEFAULT and not os.path.exists(source)) or (path.is_file() and path.suffix.lower() == ".gguf"):
        try:
            gguf = embedded_gguf_path() if source == EMBEDDED_DEFAULT else path
        except BackboneNotAvailableError:
            return None  # said again, with the install command, when the model is loaded
        name = EMBEDDED_DEFAULT if source == EMBEDDED_DEFAULT else None
        folder = convert_gguf(gguf, cache_dir, name=name) if convert else cached_conversion(gguf, cache_dir, name=name)
    elif path.is_dir():
        folder = path
    if folder is not None:
        if not (folder / "config.json").is_file():
            return None
        try:
            return _shape_of_config(AutoConfig.from_pretrained(folder, local_files_only=True))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{str(folder)!r} holds no model config transformers can read ({first}): pass a folder written by "
                f"save_pretrained, a Hugging Face id, or the embedded default {EMBEDDED_DEFAULT!r}"
            ) from None
    if path.exists():
        return None  # a file that is not a GGUF: load_backbone says what to pass instead
    if looks_like_local_path(source):
        raise FileNotFoundError(
            f"model {source!r} is a path that does not exist: pass a folder written by save_pretrained, a Hugging "
            f"Face id, or the embedded default {EMBEDDED_DEFAULT!r}"
        )
    try:
        return _shape_of_config(AutoConfig.from_pretrained(source, local_files_only=True))
    except (OSError, ValueError):
        return None  # not cached: known once loaded


def looks_like_local_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that names a place on disk is a path."""
    if os.path.exists(source):
        return True
    if source.startswith((".", "/", "~")) or "\\" in source or (len(source) > 1 and source[1] == ":"):
        return True
    return source.count("/") > 1
