"""A fitted router on disk: ``config.json`` (validated, versioned), ``router.safetensors``, ``README.md``.

Writes are atomic (a temporary folder renamed into place), and a corrupt, partial or
foreign artifact is a clear :class:`RouterArtifactError`, never a silent fallback.
Loading a router into a backbone other than the one it was fitted on is an error naming
both fingerprints.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.embedding import QueryEmbeddingConfig
from ..engine.scorer import ScoringConfig
from .model import Router, RouterConfig, SelectionConfig

ARTIFACT_FORMAT = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "router.safetensors"
CARD_NAME = "README.md"
SHIPPED_ROUTERS = Path(__file__).resolve().parents[1] / "routers"
"""Routers that ship inside the package, one folder per backbone (see :func:`shipped_router_for`)."""


class RouterArtifactError(ValueError):
    """An artifact folder that cannot be used; the message says why and what to do."""


class RouterArtifactConfig(BaseModel):
    """Everything needed to route with, and to reproduce, a fitted router."""

    model_config = ConfigDict(extra="forbid")

    format: int = Field(ARTIFACT_FORMAT, description="artifact format version")
    backbone_name: str
    backbone_fingerprint: dict[str, Any]
    scoring: ScoringConfig
    query_embedding: QueryEmbeddingConfig
    router: RouterConfig
    selection: SelectionConfig
    search: dict[str, Any] = Field(default_factory=dict, description="head search settings")
    training: dict[str, Any] = Field(default_factory=dict, description="training settings and the chosen values")
    data: list[dict[str, Any]] = Field(default_factory=list, description="fit data: sources and query counts")
    dev_metrics: dict[str, float] = Field(default_factory=dict)
    static_heads: list[str] = Field(default_factory=list, description="static top-k of the same fit, a baseline")
    command: str | None = Field(None, description="the command that produced this artifact")
    fit_dtype: str | None = Field(None, description="dtype of the backbone the fit extracted attention with")


def check_backbone(config: RouterArtifactConfig, fingerprint: dict[str, Any], where: str = "") -> None:
    """Raise if ``fingerprint`` (the backbone at hand) differs from the one the router was fitted on."""
    if config.backbone_fingerprint != fingerprint:
        diff = {
            key: (config.backbone_fingerprint.get(key), fingerprint.get(key))
            for key in sorted(set(config.backbone_fingerprint) | set(fingerprint))
            if config.backbone_fingerprint.get(key) != fingerprint.get(key)
        }
        raise RouterArtifactError(
            f"the router{(' at ' + where) if where else ''} was fitted on backbone {config.backbone_name!r} "
            f"with fingerprint {config.backbone_fingerprint}, but the backbone in use has fingerprint "
            f"{fingerprint} (differs in: {diff}); load it with the backbone it was fitted on, or fit a router "
            "for this backbone with `routehead-rag fit`"
        )


def save_artifact(folder: str | Path, router: Router, config: RouterArtifactConfig, card: str) -> Path:
    """Write the artifact atomically to ``folder`` (replacing an existing artifact there)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if router.config != config.router:
        raise ValueError("the router's shape differs from config.router")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in router.state_dict().items()}
        save_file(tensors, str(temporary / WEIGHTS_NAME), metadata={"format": str(ARTIFACT_FORMAT)})
        (temporary / CARD_NAME).write_text(card, encoding="utf-8")
        (temporary / CONFIG_NAME).write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes it 0700; a router folder is meant to be shared
        for path in temporary.iterdir():
            os.chmod(path, 0o666 & ~umask)
        if folder.exists():
            if not (folder / CONFIG_NAME).is_file() and any(folder.iterdir()):
                raise RouterArtifactError(
                    f"{folder} exists and is not a router artifact: refusing to replace it; choose another --out"
                )
            backup = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, backup)
            os.replace(temporary, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def read_artifact_config(folder: str | Path) -> RouterArtifactConfig:
    """The validated ``config.json`` of an artifact folder."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise RouterArtifactError(f"router artifact {str(folder)!r} is not a folder")
    if not path.is_file():
        raise RouterArtifactError(f"{folder} has no {CONFIG_NAME}: not a router artifact (or a partial one)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RouterArtifactError(f"{path} is not valid JSON ({err}): the artifact is corrupt; fit it again") from None
    if isinstance(raw, dict) and raw.get("format") not in (None, ARTIFACT_FORMAT):
        raise RouterArtifactError(
            f"{path} has artifact format {raw.get('format')!r}; this version of routehead-rag reads format "
            f"{ARTIFACT_FORMAT}: upgrade routehead-rag or fit the router again"
        )
    try:
        return RouterArtifactConfig.model_validate(raw)
    except ValidationError as err:
        raise RouterArtifactError(f"{path} is not a valid router config: {err}") from None


def load_artifact(folder: str | Path, fingerprint: dict[str, Any] | None = None) -> tuple[Router, RouterArtifactConfig]:
    """Load the router and its config; with ``fingerprint``, check it matches the fitted backbone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_artifact_config(folder)
    if fingerprint is not None:
        check_backbone(config, fingerprint, str(folder))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise RouterArtifactError(f"{folder} has no {WEIGHTS_NAME}: the artifact is partial; fit it again")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise RouterArtifactError(f"{weights} cannot be read ({err}): the artifact is corrupt; fit it again") from None
    router = Router(config.router)
    try:
        router.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RouterArtifactError(f"{weights} does not match {CONFIG_NAME}'s router shape: {err}") from None
    router.eval()
    return router, config


def shipped_router_for(fingerprint: dict[str, Any]) -> Path | None:
    """The router shipped in the package for the backbone with ``fingerprint``, or ``None``.

    Matching is by fingerprint (model shape and tokenizer hash), never by model name, so a
    shared model object that is the embedded default gets the shipped router too.
    """
    if not SHIPPED_ROUTERS.is_dir():
        return None
    for folder in sorted(p for p in SHIPPED_ROUTERS.iterdir() if (p / CONFIG_NAME).is_file()):
        if read_artifact_config(folder).backbone_fingerprint == fingerprint:
            return folder
    return None
