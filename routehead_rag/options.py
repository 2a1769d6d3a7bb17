"""The re-ranker's options: one pydantic model shared by the Python API, the CLI and both integrations.

``RouteHeadReranker(**options)``, Haystack's ``RouteHeadRanker(**options)`` and LlamaIndex's
``RouteHeadPostprocessor(**options)`` take the same names with the same meaning, and an integration
serialises them as this model's dump; a new option is added here once. What is *not* an option: the
model or tokenizer objects you share (not serialisable), a hub token (a secret, never serialised) and
each framework's own settings (``top_k``/``top_n``, meta fields, ...).

The one rule for scoring settings (:func:`scoring_config`): a router brings the settings it was
fitted with (prompt wording and layout, passage budget, content-free subtraction, outlier masking);
an option left ``None`` takes the router's value (or the default without a router), an option given
overrides it. ``fuse_first_stage``, ``scale_score``, ``lora`` and ``bi_encoder`` switch off what a router adds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .engine.prompt import PromptConfig

if TYPE_CHECKING:
    from .engine.scorer import ScoringConfig

DEFAULT_MAX_PROMPT_TOKENS = 4096


class OptionFields(BaseModel):
    """The option fields themselves (a mixin: LlamaIndex's postprocessor inherits them as its own fields)."""

    heads: str | list[str] = Field(
        "auto", description="'auto' (the router shipped for the backbone, else every head), 'all' (ICR), a list of "
        "heads like ['L12.H5'], a heads file, or a router folder from `routehead-rag fit`",
    )
    instruction: Literal["relevance", "question"] | None = Field(
        None, description="the wording after the passages: 'relevance' (search queries) or 'question' (questions "
        "the passages answer); None: the router's, else 'relevance'",
    )
    max_passage_tokens: int | None = Field(
        None, ge=8, description="passage budget: each passage is cut to its first N tokens of the model's tokenizer "
        "(a cut is logged at WARNING); None: the router's budget, else the default",
    )
    chunk_long_documents: bool = Field(
        False, description="split a document longer than the passage budget into windows of the budget, score every "
        "chunk in the same list, and score the document as its best chunk (nothing is cut)",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=64, description=f"token budget of one prompt; longer candidate lists are scored in windows (None: "
        f"the router's, else {DEFAULT_MAX_PROMPT_TOKENS})",
    )
    subtract_content_free: bool | None = Field(
        None, description="subtract the attention under a content-free query ('N/A', ICR); None: the router's, else on",
    )
    mask_outliers: bool | None = Field(
        None, description="ICR's token-outlier masking of the summed score; None: the router's, else off",
    )
    fuse_first_stage: bool = Field(
        True, description="with a router fitted with fusion: combine attention with the first stage (the retrieval "
        "scores given, else the input order)",
    )
    scale_score: bool = Field(
        True, description="with a router fitted with a calibration: scores are probabilities of relevance",
    )
    lora: bool = Field(True, description="with a router fitted with a LoRA: score with it (False: the base model)")
    bi_encoder: bool = Field(
        True, description="with a router fitted with a bi-encoder (the shipped one: all-MiniLM-L6-v2): add its cosine "
        "to the score (False: attention alone, unscaled: pass scale_score=False)",
    )
    dtype: str = Field(
        "auto", description="for a model loaded by name and for the router's bi-encoder: 'auto' (bfloat16 on CUDA and "
        "on CPUs with native bfloat16, float32 otherwise, also on Apple's mps), 'float32', 'bfloat16' or 'float16'",
    )
    device: str | None = Field(None, description="for a model loaded by name: None picks cuda, then mps, then cpu")
    use_peft_adapters: bool = Field(
        True, description="with a peft.PeftModel you share: score with its adapters on (False: disabled)",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to from_pretrained for a model loaded by name (e.g. "
        "{'device_map': 'auto'}, {'revision': ...}); JSON values only",
    )
    tokenizer_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="passed to AutoTokenizer.from_pretrained for a model loaded by name",
    )
    prompt: PromptConfig | None = Field(
        None, description="the whole prompt layout (advanced); None: the router's, else ICR's",
    )

    @field_validator("heads", mode="before")
    @classmethod
    def _heads(cls, value: Any) -> Any:
        from .strategy import HeadStrategy, serialisable_heads

        if isinstance(value, HeadStrategy):
            raise TypeError("heads is a HeadStrategy object: pass it to RouteHeadReranker(heads=...) directly; options "
                            "hold the serialisable forms ('auto', 'all', a path or a list like ['L12.H5'])")
        return serialisable_heads(value)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> str:
        from .model.devices import dtype_name, parse_dtype

        return dtype_name(parse_dtype(value))

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str | None:
        from .model.devices import parse_device

        device = parse_device(value)
        return None if device is None else str(device)

    @field_validator("model_kwargs", "tokenizer_kwargs", mode="before")
    @classmethod
    def _json_kwargs(cls, value: Any, info) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError(f"{info.field_name} must be a dict with string keys, got {value!r}")
        if "token" in value:
            raise ValueError(f"{info.field_name} holds 'token': pass token=... to the re-ranker itself (a secret, never "
                             "serialised), not inside {info.field_name}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{info.field_name} must hold JSON values only (it is serialised): {err}") from None
        return dict(value)


class RerankerOptions(OptionFields):
    """Every option of a re-ranker, validated (see the module notes); frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, strict=True)

    @classmethod
    def of(cls, options: RerankerOptions | None = None, **overrides: Any) -> RerankerOptions:
        """``options`` (or the defaults) with ``overrides`` applied and validated; an unknown name is a
        ``TypeError`` listing the known ones."""
        unknown = sorted(set(overrides) - set(cls.model_fields))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}: the options are {sorted(cls.model_fields)}")
        base = options.model_dump() if options is not None else {}
        try:
            return cls(**{**base, **overrides})
        except ValidationError as err:
            kinds = {error["type"] for error in err.errors()}
            wrong_type = kinds <= {"bool_type", "int_type", "string_type", "dict_type", "list_type", "model_type",
                                   "literal_error", "is_instance_of"} and bool(kinds & {"bool_type", "int_type", "dict_type"})
            raise (TypeError if wrong_type else ValueError)(describe_errors(err, cls)) from None


def describe_errors(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per bad field: its name, the value given, what is wrong and what the field takes."""
    lines = []
    for error in err.errors():
        name = ".".join(str(part) for part in error["loc"]) or "options"
        field = model.model_fields.get(str(error["loc"][0])) if error["loc"] else None
        hint = f" ({field.description})" if field is not None and field.description else ""
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}={error.get('input')!r}: {message}{hint}")
    return "; ".join(lines)


def option_names() -> Sequence[str]:
    return tuple(RerankerOptions.model_fields)


def scoring_config(router_scoring: ScoringConfig | None, options: RerankerOptions) -> ScoringConfig:
    """The scoring settings of a re-ranker: the router's (or the defaults), overridden by the options given."""
    from .engine.scorer import ScoringConfig

    base = router_scoring or ScoringConfig()
    prompt = options.prompt or base.prompt
    if options.instruction is not None:
        prompt = prompt.with_instruction(options.instruction)
    if options.max_passage_tokens is not None:
        prompt = prompt.model_copy(update={"max_passage_words": None, "max_passage_tokens": options.max_passage_tokens})
    chosen = {"max_prompt_tokens": options.max_prompt_tokens, "subtract_content_free": options.subtract_content_free,
              "mask_outliers": options.mask_outliers}
    return base.model_copy(update={"prompt": prompt, **{k: v for k, v in chosen.items() if v is not None}})
