"""A fitted router on disk: ``config.json`` (validated, versioned), ``router.safetensors``, ``README.md``.

Trust nothing on disk:

* ``config.json`` is read with strict types (``"30"``, ``1.0``, ``true`` are refused where an
  integer is meant; unknown fields too) and must agree with itself: the router's layers x heads
  and input size are the backbone fingerprint's, the static heads fit that grid;
* every number in it is finite (``NaN``, ``Infinity``, ``1e400`` refused everywhere, free-form records too);
* it records the sha256 and size of every weight file, and loading checks them, so flipped
  bytes are caught even when the file still parses; weights must be finite and not all zero;
* the LoRA's PEFT files are read back, not only checksummed (:func:`load_lora`); LoRA files recorded or
  present without a ``lora`` in ``config.json`` are an error, never a LoRA silently dropped;
* every file must be a regular file inside the folder (no symlink out of it); the model card
  may be missing (a warning), nothing else may;
* writes are atomic (a temporary folder renamed into place, under a lock), and temporary folders
  a killed writer left behind are removed by the next write.

Loading a router into a backbone other than the one it was fitted on is an error naming both
fingerprints; a damaged router shipped in the package is an error saying how to repair the
installation, never a silent fallback to another method.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Annotated, Any

from filelock import FileLock
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from ..atomic import atomic_folder, remove_stale
from ..bi_encoder import BiEncoderConfig
from ..engine.embedding import QueryEmbeddingConfig
from ..engine.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoraConfig
from ..engine.scorer import ScoringConfig
from ..fusion import CalibrationConfig, FusionConfig
from ..heads import Head, HeadGrid
from .model import Router, RouterConfig, SelectionConfig

ARTIFACT_FORMAT = 3  # 2: weight checksums, strict types; 3: the LoRA (with its scope) under "lora", renamed settings
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "router.safetensors"
CARD_NAME = "README.md"
SHIPPED_ROUTERS = Path(__file__).resolve().parents[1] / "routers"
"""Routers that ship inside the package, one folder per backbone (see :func:`shipped_router_for`)."""
REINSTALL_HINT = "pip install --force-reinstall --no-deps routehead-rag (from a checkout: git checkout -- routehead_rag/routers)"


class RouterArtifactError(ValueError):
    """An artifact folder that cannot be used; the message says why and what to do."""


class RouterArtifactWarning(UserWarning):
    """An artifact that loads but lacks something optional (its model card)."""


class BackboneFingerprint(BaseModel):
    """What a router depends on in its backbone: the shape of its attention and its tokenizer."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model_type: str | None
    num_layers: StrictInt = Field(..., ge=1)
    num_heads: StrictInt = Field(..., ge=1)
    num_kv_heads: StrictInt = Field(..., ge=1)
    hidden_size: StrictInt = Field(..., ge=1)
    head_dim: StrictInt = Field(..., ge=1)
    tokenizer_sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")


def _finite_json(value: Any, where: str = "") -> Any:
    """``value`` (plain JSON) unchanged if every number in it is finite, else ``ValueError`` naming where."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where or 'a value'} is {value!r}: every number must be finite")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _finite_json(item, f"{where}.{key}" if where else str(key))
    return value


FINITE = AfterValidator(lambda value, info: _finite_json(value, info.field_name))
"""On a free-form JSON field (search and training settings, data): every number in it must be finite."""


class FileRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    bytes: StrictInt = Field(..., ge=0)


class RouterArtifactConfig(BaseModel):
    """Everything needed to route with, and to reproduce, a fitted router."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: StrictInt = Field(ARTIFACT_FORMAT, description="artifact format version")
    backbone_name: str
    backbone_fingerprint: BackboneFingerprint
    scoring: ScoringConfig
    query_embedding: QueryEmbeddingConfig
    router: RouterConfig
    selection: SelectionConfig
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="first-stage fusion, fitted on dev")
    calibration: CalibrationConfig | None = Field(None, description="score -> probability of relevance, on dev")
    calibration_unfused: CalibrationConfig | None = Field(
        None, description="the same for the score without the first stage (fuse_first_stage=False), on dev"
    )
    lora: LoraConfig | None = Field(
        None, description="the scoring LoRA (PEFT layout, in adapter_model.safetensors) and its scope, or none"
    )
    bi_encoder: BiEncoderConfig | None = Field(
        None, description="the bi-encoder whose cosine is added to the score (both calibrations include it), or none"
    )
    files: dict[str, FileRecord] = Field(default_factory=dict, description="sha256 and size of every weight file")
    search: Annotated[dict[str, Any], FINITE] = Field(default_factory=dict, description="head search settings")
    training: Annotated[dict[str, Any], FINITE] = Field(default_factory=dict, description="training settings, chosen values")
    data: Annotated[list[dict[str, Any]], FINITE] = Field(default_factory=list, description="fit data: sources, query counts")
    dev_metrics: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    static_heads: list[str] = Field(default_factory=list, description="static top-k of the same fit, a baseline")
    command: str | None = Field(None, description="the command that produced this artifact")
    fit_dtype: str | None = Field(None, description="dtype of the backbone the fit extracted attention with")

    @model_validator(mode="after")
    def _consistent(self) -> RouterArtifactConfig:
        fingerprint, router = self.backbone_fingerprint, self.router
        if (router.num_layers, router.num_heads) != (fingerprint.num_layers, fingerprint.num_heads):
            raise ValueError(
                f"router is {router.num_layers} x {router.num_heads} (layers x heads) but its backbone fingerprint "
                f"says {fingerprint.num_layers} x {fingerprint.num_heads}"
            )
        if router.input_dim != fingerprint.hidden_size:
            raise ValueError(f"router input_dim {router.input_dim} is not the backbone's hidden size {fingerprint.hidden_size}")
        if self.query_embedding.layer >= fingerprint.num_layers:
            raise ValueError(f"query_embedding.layer {self.query_embedding.layer} is past the backbone's layers")
        grid = HeadGrid(router.num_layers, router.num_heads)
        grid.check([Head.parse(h) for h in self.static_heads], "the router's backbone")
        if (self.fusion.mode == "per_query") != router.fusion_head:
            raise ValueError(f"fusion.mode is {self.fusion.mode!r} but router.fusion_head is {router.fusion_head}")
        per_query = self.bi_encoder is not None and self.bi_encoder.mode == "per_query"
        if per_query != router.bi_encoder_head:
            mode = "no bi_encoder" if self.bi_encoder is None else f"bi_encoder.mode is {self.bi_encoder.mode!r}"
            raise ValueError(f"{mode} but router.bi_encoder_head is {router.bi_encoder_head}")
        if max(self.selection.k, self.selection.min_heads) > grid.size:
            raise ValueError(f"selection asks for more heads than the backbone's {grid.size}")
        if self.lora is not None and max(self.lora.layers) >= fingerprint.num_layers:
            raise ValueError(f"lora.layers go past the backbone's {fingerprint.num_layers} layers")
        recorded = sorted({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME} & set(self.files))
        if self.lora is None and recorded:
            raise ValueError(f"files records the LoRA's {' and '.join(recorded)} but there is no 'lora': restore "
                             "config.json's 'lora' (else the LoRA is silently dropped), or remove those records and files")
        return self

    @property
    def grid(self) -> HeadGrid:
        return HeadGrid(self.router.num_layers, self.router.num_heads)


def check_backbone(config: RouterArtifactConfig, fingerprint: dict[str, Any], where: str = "") -> None:
    """Raise if ``fingerprint`` (the backbone at hand) differs from the one the router was fitted on."""
    recorded = config.backbone_fingerprint.model_dump()
    if recorded != fingerprint:
        diff = {key: (recorded.get(key), fingerprint.get(key))
                for key in sorted(set(recorded) | set(fingerprint)) if recorded.get(key) != fingerprint.get(key)}
        raise RouterArtifactError(
            f"the router{(' at ' + where) if where else ''} was fitted on backbone {config.backbone_name!r} "
            f"with fingerprint {recorded}, but the backbone in use has fingerprint {fingerprint} (differs in: "
            f"{diff}); load it with the backbone it was fitted on, or fit a router for this backbone with "
            "`routehead-rag fit`"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_artifact(folder: str | Path, router: Router, config: RouterArtifactConfig, card: str, lora=None) -> Path:
    """Write the artifact atomically to ``folder`` (replacing an existing artifact there).

    The weights' sha256 is recorded in ``config.json``. The write holds a lock beside the
    folder, and first removes temporary folders an earlier, killed write left behind.
    ``lora`` (a :class:`~routehead_rag.engine.lora.Lora`, with ``config.lora`` its config) is written
    beside the router in PEFT's layout.
    """
    from safetensors.torch import save as safetensors_bytes

    from ..engine.lora import lora_bytes

    folder = Path(folder)
    if router.config != config.router:
        raise ValueError("the router's shape differs from config.router")
    if (lora is None) != (config.lora is None) or (lora is not None and lora.config != config.lora):
        raise ValueError("the LoRA passed and config.lora differ")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in router.state_dict().items()}
    weights = safetensors_bytes(tensors, metadata={"format": str(ARTIFACT_FORMAT)})
    payload = {WEIGHTS_NAME: weights}
    if lora is not None:
        lora_weights, lora_config = lora_bytes(lora, config.backbone_fingerprint.model_dump(), config.backbone_name)
        payload[ADAPTER_WEIGHTS_NAME], payload[ADAPTER_CONFIG_NAME] = lora_weights, lora_config.encode("utf-8")
    config = config.model_copy(update={"files": {
        name: FileRecord(sha256=_sha256(data), bytes=len(data)) for name, data in payload.items()}})
    lock = folder.parent / f".{folder.name}.lock"

    def fill(temporary: Path) -> None:
        for name, data in payload.items():
            (temporary / name).write_bytes(data)
        (temporary / CARD_NAME).write_text(card, encoding="utf-8")
        (temporary / CONFIG_NAME).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes it 0700; a router folder is meant to be shared
        for path in temporary.iterdir():
            os.chmod(path, 0o666 & ~umask)

    with FileLock(lock):
        remove_stale(folder.parent, folder.name)  # left by a killed write; we hold the lock
        if folder.exists() and not (folder / CONFIG_NAME).is_file() and any(folder.iterdir()):
            raise RouterArtifactError(
                f"{folder} exists and is not a router artifact: refusing to replace it; choose another --out"
            )
        atomic_folder(folder, fill)
    lock.unlink(missing_ok=True)
    return folder


def _inside(folder: Path, name: str, *, required: bool = True) -> Path | None:
    """``folder/name`` as a regular file inside ``folder`` (not a symlink), or an error saying what is wrong."""
    path = folder / name
    if path.is_symlink():
        raise RouterArtifactError(f"{path} is a symbolic link: an artifact's files must be regular files inside it")
    if not path.exists():
        if required:
            raise RouterArtifactError(f"{folder} has no {name}: not a router artifact (or a partial one); fit it again")
        return None
    if not path.is_file() or path.resolve().parent != folder.resolve():
        raise RouterArtifactError(f"{path} is not a regular file inside {folder}")
    return path


def read_artifact_config(folder: str | Path) -> RouterArtifactConfig:
    """The validated ``config.json`` of an artifact folder (strict types, self-consistent)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RouterArtifactError(f"router artifact {str(folder)!r} is not a folder")
    path = _inside(folder, CONFIG_NAME)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RouterArtifactError(f"{path} is not valid JSON ({err}): the artifact is corrupt; fit it again") from None
    version = raw.get("format") if isinstance(raw, dict) else None
    if type(version) is not int:
        raise RouterArtifactError(f"{path} has no integer 'format' (got {version!r}): not a router artifact; fit it again")
    upgraded = version == 2
    if upgraded:  # the same content under older names: read it as format 3
        raw, version = upgrade_format_2(raw), ARTIFACT_FORMAT
        text = json.dumps(raw)
    if version != ARTIFACT_FORMAT:
        newer = version > ARTIFACT_FORMAT
        raise RouterArtifactError(
            f"{path} has artifact format {version}; this version of routehead-rag reads format {ARTIFACT_FORMAT}: "
            + ("upgrade routehead-rag" if newer else "fit the router again with `routehead-rag fit`")
        )
    try:
        return RouterArtifactConfig.model_validate_json(text)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        names = " (format 2, read under format 3's names: 'query_adapter' is 'lora')" if upgraded else ""
        raise RouterArtifactError(f"{path} is not a valid router config ({problems}){names}: correct what is named, "
                                  "restore the folder, or fit the router again") from None


def upgrade_format_2(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-2 ``config.json`` as format 3: ``query_adapter`` -> ``lora`` (scope ``query``), ICR's
    ``scoring.calibrate`` -> ``scoring.subtract_content_free``, ``prompt.calibration_query`` ->
    ``prompt.content_free_query``. Anything else is left for validation to judge."""
    raw = json.loads(json.dumps(raw))  # a deep copy of plain JSON
    raw["format"] = ARTIFACT_FORMAT
    if "query_adapter" in raw:
        adapter = raw.pop("query_adapter")
        raw["lora"] = {**adapter, "scope": "query"} if isinstance(adapter, dict) else adapter
    scoring = raw.get("scoring")
    if isinstance(scoring, dict):
        if "calibrate" in scoring:
            scoring["subtract_content_free"] = scoring.pop("calibrate")
        prompt = scoring.get("prompt")
        if isinstance(prompt, dict) and "calibration_query" in prompt:
            prompt["content_free_query"] = prompt.pop("calibration_query")
    return raw


def load_artifact(folder: str | Path, fingerprint: dict[str, Any] | None = None) -> tuple[Router, RouterArtifactConfig]:
    """Load the router and its config; with ``fingerprint``, check it matches the fitted backbone."""
    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    folder = Path(folder)
    config = read_artifact_config(folder)
    if fingerprint is not None:
        check_backbone(config, fingerprint, str(folder))
    if _inside(folder, CARD_NAME, required=False) is None:
        warnings.warn(f"{folder} has no {CARD_NAME} (its model card); the router itself is complete",
                      RouterArtifactWarning, stacklevel=2)
    weights_path = folder / WEIGHTS_NAME
    data = _recorded_bytes(folder, config, WEIGHTS_NAME)
    try:
        state = safetensors_load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise RouterArtifactError(f"{weights_path} cannot be read ({err}): the artifact is corrupt; fit it again") from None
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not bool(tensor.isfinite().all()):
            raise RouterArtifactError(f"{weights_path}: tensor {name!r} is not finite floating point; fit it again")
    if all(not bool(tensor.any()) for tensor in state.values()):
        raise RouterArtifactError(f"{weights_path}: every weight is zero, so no head can be chosen; fit it again")
    router = Router(config.router)
    try:
        router.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RouterArtifactError(f"{weights_path} does not match {CONFIG_NAME}'s router shape: {err}") from None
    router.eval()
    return router, config


def _recorded_bytes(folder: Path, config: RouterArtifactConfig, name: str) -> bytes:
    """``folder/name``'s bytes, checked against the sha256 and size ``config.json`` records."""
    path = _inside(folder, name)
    record = config.files.get(name)
    if record is None:
        raise RouterArtifactError(f"{folder / CONFIG_NAME} records no checksum of {name}; fit it again")
    data = path.read_bytes()
    if len(data) != record.bytes or _sha256(data) != record.sha256:
        raise RouterArtifactError(
            f"{path} is not the file {CONFIG_NAME} records (sha256 {_sha256(data)[:16]}..., "
            f"{len(data)} bytes; expected {record.sha256[:16]}..., {record.bytes} bytes): the artifact is corrupt or "
            "was edited; fit it again or restore it"
        )
    return data


def load_lora(folder: str | Path, config: RouterArtifactConfig):
    """The artifact's scoring LoRA (:class:`~routehead_rag.engine.lora.Lora`), or ``None``.

    Both PEFT files must match their recorded sha256, and are then read back: ``adapter_config.json`` must
    be PEFT's LoRA settings agreeing with ``config.lora`` (:mod:`routehead_rag.engine.peft_layout`); the
    weights must fit ``config.lora``, carry the router's backbone fingerprint and, where the backbone is
    known (at resolve), fit its projections (:func:`~routehead_rag.engine.lora.check_fits`)."""
    from safetensors import SafetensorError

    from ..engine.lora import parse_lora
    from ..engine.peft_layout import check_peft_config

    folder = Path(folder)
    if config.lora is None:
        present = [name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if (folder / name).exists()]
        if present:
            raise RouterArtifactError(f"{folder} holds the LoRA's {' and '.join(present)} but {CONFIG_NAME} has no "
                                      "'lora': restore it (else the LoRA is silently dropped), or delete those files")
        return None
    settings = _recorded_bytes(folder, config, ADAPTER_CONFIG_NAME)
    try:
        check_peft_config(settings, config.lora)
    except ValueError as err:
        raise RouterArtifactError(f"{folder / ADAPTER_CONFIG_NAME}: {err}; it must agree with {CONFIG_NAME}: restore "
                                  "the router folder, or fit it again") from None
    data = _recorded_bytes(folder, config, ADAPTER_WEIGHTS_NAME)
    path = folder / ADAPTER_WEIGHTS_NAME
    try:
        adapter = parse_lora(config.lora, data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: u64 length, JSON header
        recorded = json.loads(header.get("__metadata__", {}).get("routehead_base_fingerprint", "null"))
    except (SafetensorError, OSError, ValueError) as err:
        raise RouterArtifactError(f"{path} cannot be used ({err}): the artifact is corrupt; fit it again") from None
    if recorded != config.backbone_fingerprint.model_dump():
        raise RouterArtifactError(f"{path} was fitted on another backbone than its router (fingerprint {recorded}); "
                                  "fit it again")
    adapter.requires_grad_(False)
    return adapter


def shipped_router_for(fingerprint: dict[str, Any]) -> Path | None:
    """The router shipped in the package for the backbone with ``fingerprint``, or ``None``.

    Matching is by fingerprint (model shape and tokenizer hash), never by model name, so a
    shared model object that is the embedded default gets the shipped router too. Every
    shipped folder is checked: a damaged one is an error saying how to repair the install.
    """
    if not SHIPPED_ROUTERS.is_dir():
        return None
    for folder in sorted(p for p in SHIPPED_ROUTERS.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        try:
            config = read_artifact_config(folder)
            _inside(folder, WEIGHTS_NAME)
        except RouterArtifactError as err:
            raise RouterArtifactError(
                f"the router shipped in the package at {folder} is damaged ({err}); repair the installation: "
                f"{REINSTALL_HINT}"
            ) from None
        if config.backbone_fingerprint.model_dump() == fingerprint:
            return folder
    return None

