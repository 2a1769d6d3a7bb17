"""The LoRA's ``adapter_config.json`` read back: PEFT's LoRA settings, parsed and checked against the LoRA's config.

:func:`~routehead_rag.engine.lora.lora_bytes` writes the file from :meth:`LoraConfig.peft_config`, so
``peft.PeftModel.from_pretrained`` reads the same LoRA we score with. Reading it back, nothing in it is
taken on trust: it must be valid JSON, parse as PEFT's LoRA schema (``peft_type`` ``LORA``; ``r``,
``lora_alpha``, ``target_modules`` with PEFT's types and finite numbers; nothing that changes PEFT's
arithmetic away from plain LoRA, such as ``use_rslora``, ``use_dora``, ``fan_in_fan_out``, rank or alpha
patterns; no field outside those PEFT settings), and agree with the router's own record of the LoRA (``config.json``'s
``lora``): the same rank, alpha and modules. A file that disagrees would make PEFT load another LoRA than
the one the re-ranker applies, so it is an error, never a silent preference for one of the two.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .lora import LoraConfig


class PeftLoraFile(BaseModel):
    """PEFT's ``LoraConfig`` fields as routehead-rag writes them (PEFT's names and types), with every
    setting that would change the LoRA's arithmetic pinned to plain LoRA."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    peft_type: Literal["LORA"]
    task_type: Literal["CAUSAL_LM"] | None = None
    r: StrictInt = Field(..., ge=1)
    lora_alpha: float = Field(..., gt=0, allow_inf_nan=False)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    bias: Literal["none"] = "none"
    fan_in_fan_out: Literal[False] = False
    use_rslora: Literal[False] = False  # rsLoRA scales by alpha / sqrt(r), not alpha / r
    use_dora: Literal[False] = False
    rank_pattern: dict[str, Any] = Field(default_factory=dict, max_length=0)  # one rank for every module
    alpha_pattern: dict[str, Any] = Field(default_factory=dict, max_length=0)  # one alpha for every module
    modules_to_save: None = None
    layers_to_transform: None = None
    layers_pattern: None = None
    init_lora_weights: StrictBool | str = True
    target_modules: list[str] = Field(..., min_length=1, description="explicit module names (never a pattern)")
    base_model_name_or_path: str | None = None
    inference_mode: StrictBool = True


def check_peft_config(data: bytes, config: LoraConfig) -> PeftLoraFile:
    """``adapter_config.json``'s bytes parsed (:class:`PeftLoraFile`) and checked against ``config`` (the
    router's ``lora``); ``ValueError`` naming the field, the value and how the two files disagree."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"holds a JSON {type(raw).__name__}, not PEFT's LoRA settings (an object)")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"peft_type is {raw.get('peft_type')!r}: routehead-rag reads a LoRA (peft_type 'LORA') only")
    if isinstance(raw.get("target_modules"), str):
        raise ValueError(f"target_modules is the pattern {raw['target_modules']!r}: routehead-rag writes and reads "
                         "the LoRA's modules by name (a list)")
    try:
        peft = PeftLoraFile.model_validate_json(json.dumps(raw))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" + ("" if e["type"] == "missing" else f" (got {e['input']!r})")
            for e in err.errors())
        raise ValueError(f"not PEFT's plain LoRA settings ({problems})") from None
    if peft.r != config.rank:
        raise ValueError(f"r is {peft.r}, but config.json's lora.rank is {config.rank}")
    if peft.lora_alpha != config.alpha:
        raise ValueError(f"lora_alpha is {peft.lora_alpha!r}, but config.json's lora.alpha is {config.alpha!r}")
    expected = {config.module_name(layer, target) for layer in config.layers for target in config.targets}
    given = set(peft.target_modules)
    if given != expected or len(peft.target_modules) != len(given):
        missing, extra = sorted(expected - given), sorted(given - expected)
        repeated = len(peft.target_modules) != len(given)
        raise ValueError(
            f"target_modules are not the modules config.json's lora names ({len(expected)}: its layers x targets): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, extra {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}{', some repeated' if repeated else ''}"
        )
    return peft
