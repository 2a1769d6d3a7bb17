"""The one head choice: which heads score a query, built once from the user's ``heads`` argument.

Every path from a query to its scores goes through here: :class:`~routehead_rag.RouteHeadReranker`,
both framework integrations (through it), ``routehead-rag eval`` and the benchmarks::

    strategy = parse_strategy(heads)     # "auto" | "all" | ["L12.H5", ...] | heads file | router folder
    strategy.check_grid(grid)            # against the model's layers x heads, before weights load
    strategy = strategy.resolve(backbone)  # router weights load (fingerprint checked); "auto" decides here
    strategy.heads_for(backbone, query)  # the heads to sum for this query (None: every head)
    strategy.route(backbone, query)      # the query's ScoringRecipe: the same heads, with what a fitted
                                         # router adds (first-stage weight, calibration, LoRA)

The argument is validated once, here, at construction: a bad head, a missing heads file or a
corrupt router folder is an error before any model work.  ``"auto"`` picks the router shipped
for the backbone, matched by fingerprint (model shape and tokenizer hash, never by name), and
every head (ICR) when none ships; since the fingerprint needs the tokenizer, ``"auto"`` is the
one choice decided when the backbone loads (:meth:`HeadStrategy.resolve`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .heads import Head, HeadGrid, as_heads, format_heads, load_heads_file
from .recipe import ScoringRecipe

if TYPE_CHECKING:
    from .engine.lora import Lora
    from .engine.scorer import ScoringConfig
    from .model.backbone import Backbone
    from .router.artifact import RouterArtifactConfig
    from .router.model import Router

logger = logging.getLogger(__name__)

HEAD_CHOICES = ("auto", "all")


class HeadStrategy:
    """Base of the head choices; subclasses are small frozen values."""

    name: str = ""

    @property
    def scoring(self) -> ScoringConfig | None:
        """The scoring settings this choice was fitted with (a router's), or ``None`` (the caller's or the default)."""
        return None

    def check_grid(self, grid: HeadGrid, where: str = "this backbone") -> None:
        """Raise ``ValueError`` if the choice does not fit a ``grid`` of heads (no weights needed)."""

    def resolve(self, backbone: Backbone) -> HeadStrategy:
        """The choice ready to route on ``backbone``: router weights loaded, shapes checked."""
        self.check_grid(HeadGrid(backbone.num_layers, backbone.num_heads))
        return self

    def heads_for(self, backbone: Backbone, query: str) -> list[Head] | None:
        """The heads to sum for ``query`` (``None``: every head); only on a resolved strategy."""
        raise NotImplementedError

    def route(self, backbone: Backbone, query: str) -> ScoringRecipe:
        """The query's :class:`~routehead_rag.recipe.ScoringRecipe`: :meth:`heads_for`, with the first-stage
        weight, calibration and LoRA where the choice has them."""
        heads = self.heads_for(backbone, query)
        return ScoringRecipe(None if heads is None else tuple(heads))

    def route_explained(self, backbone: Backbone, query: str) -> tuple[ScoringRecipe, dict[Head, float] | None]:
        """:meth:`route`, and the router's probability for each chosen head (``None`` without a router)."""
        return self.route(backbone, query), None

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class AllHeads(HeadStrategy):
    """ICR: every head of every layer."""

    name: str = field(default="all", init=False)

    def heads_for(self, backbone: Backbone, query: str) -> None:
        return None


@dataclass(frozen=True)
class StaticHeads(HeadStrategy):
    """A fixed head list (QRHead-style static heads, or a router artifact's static baseline)."""

    heads: tuple[Head, ...]
    name: str = field(default="static", init=False)

    def __post_init__(self) -> None:
        if not self.heads:
            raise ValueError("heads is an empty list: pass 'all' or at least one head like 'L12.H5'")

    def check_grid(self, grid: HeadGrid, where: str = "this backbone") -> None:
        grid.check(self.heads, where)

    def heads_for(self, backbone: Backbone, query: str) -> list[Head]:
        return list(self.heads)

    def describe(self) -> str:
        return f"static ({format_heads(self.heads)})"


@dataclass(frozen=True)
class RoutedHeads(HeadStrategy):
    """Heads routed per query by a fitted router (a folder written by ``routehead-rag fit``)."""

    folder: Path
    config: RouterArtifactConfig = field(repr=False)
    router: Router | None = field(default=None, repr=False, compare=False)  # loaded by resolve()
    lora: Lora | None = field(default=None, repr=False, compare=False)  # loaded by resolve(), if any
    lora_merged: bool = field(default=False, compare=False)  # the LoRA sits in the (owned) model's weights
    name: str = field(default="routed", init=False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> RoutedHeads:
        """Read and validate the artifact's ``config.json`` now; the weights load in :meth:`resolve`."""
        from .router.artifact import read_artifact_config

        return cls(Path(folder), read_artifact_config(folder))

    @property
    def scoring(self) -> ScoringConfig:
        return self.config.scoring

    @property
    def grid(self) -> HeadGrid:
        return HeadGrid(self.config.router.num_layers, self.config.router.num_heads)

    def check_grid(self, grid: HeadGrid, where: str = "this backbone") -> None:
        if grid != self.grid:
            from .router.artifact import RouterArtifactError

            raise RouterArtifactError(
                f"the router at {self.folder} was fitted on a {self.grid.num_layers} x {self.grid.num_heads} "
                f"(layers x heads) backbone, but {where} has {grid.num_layers} x {grid.num_heads}: use it with "
                "the backbone it was fitted on, or fit a router for this one with `routehead-rag fit`"
            )

    def resolve(self, backbone: Backbone) -> RoutedHeads:
        if self.router is not None:
            return self
        from .engine.lora import check_fits
        from .router.artifact import RouterArtifactError, load_artifact, load_lora

        self.check_grid(HeadGrid(backbone.num_layers, backbone.num_heads))
        router, config = load_artifact(self.folder, backbone.fingerprint())
        lora = load_lora(self.folder, config)
        if lora is not None:
            try:
                check_fits(backbone.decoder, lora)  # its layers, projections and factor shapes
            except ValueError as err:
                raise RouterArtifactError(f"the LoRA at {self.folder} does not fit this backbone: {err}") from None
            lora = lora.to(backbone.device)
        return RoutedHeads(self.folder, config, router, lora)

    def ready(self, backbone: Backbone, use_lora: bool = True) -> RoutedHeads:
        """The resolved router as ``backbone`` scores with it: its LoRA left off (``use_lora=False``), merged into
        the weights once when it reads the whole prompt and the model is ours (no cost per query), else
        applied by scoped hooks per call (a shared model's weights are never touched)."""
        if self.lora is None or not use_lora:
            return self.without_lora()
        if self.lora.config.scope == "prompt" and backbone.owned:
            from .engine.lora import merge_into

            merge_into(backbone.decoder, self.lora)
            return RoutedHeads(self.folder, self.config, self.router, None, lora_merged=True)
        return self

    def without_lora(self) -> RoutedHeads:
        """The same router with its LoRA left off (an ablation, or ``lora=False``)."""
        return RoutedHeads(self.folder, self.config, self.router, None)

    def heads_for(self, backbone: Backbone, query: str) -> list[Head]:
        return self.route(backbone, query).head_list

    def route(self, backbone: Backbone, query: str) -> ScoringRecipe:
        """One short embedding pass: the routed heads, and the query's first-stage weight."""
        if self.router is None:
            raise RuntimeError("RoutedHeads.route needs a resolved strategy: call resolve(backbone) first")
        from .engine.embedding import embed_query

        return self.route_embedding(embed_query(backbone, query, self.config.query_embedding))

    def route_explained(self, backbone: Backbone, query: str) -> tuple[ScoringRecipe, dict[Head, float]]:
        """:meth:`route` (the same one embedding pass), and ``sigmoid`` of the router's logit for each chosen head."""
        if self.router is None:
            raise RuntimeError("RoutedHeads.route_explained needs a resolved strategy: call resolve(backbone) first")
        import torch

        from .engine.embedding import embed_query

        embedding = embed_query(backbone, query, self.config.query_embedding)  # [hidden]
        recipe = self.route_embedding(embedding)
        with torch.no_grad():
            probabilities = torch.sigmoid(self.router(embedding.reshape(1, -1))[0])  # [layer * head]
        per_layer = self.router.config.num_heads
        return recipe, {h: float(probabilities[h.layer * per_layer + h.head]) for h in recipe.heads or ()}

    def route_embedding(self, embedding) -> ScoringRecipe:
        """The route of a query from its embedding ``[hidden]`` (see :meth:`route`)."""
        if self.router is None:
            raise RuntimeError("RoutedHeads.route_embedding needs a resolved strategy: call resolve(backbone) first")
        import torch

        fusion = self.config.fusion
        weight = None if fusion.mode == "off" else fusion.weight
        if fusion.mode == "per_query":
            with torch.no_grad():
                weight = float(self.router.fusion_weights(embedding.reshape(1, -1))[0])
        bi_encoder, cosine_weight = self.config.bi_encoder, None
        if bi_encoder is not None and bi_encoder.mode == "per_query":
            with torch.no_grad():
                cosine_weight = bi_encoder.weight * float(self.router.bi_encoder_scales(embedding.reshape(1, -1))[0])
        heads = tuple(self.router.select(embedding, self.config.selection))
        return ScoringRecipe(heads, weight, self.config.calibration, self.lora, fusion.level_weight,
                             self.config.calibration_unfused, bi_encoder, cosine_weight)

    def describe(self) -> str:
        lora = self.config.lora if self.lora is not None or self.lora_merged or self.router is None else None
        scope = f", {lora.scope} LoRA" if lora is not None else ""
        return f"routed ({self.folder.name}, k={self.config.selection.k}{scope})"


@dataclass(frozen=True)
class AutoHeads(HeadStrategy):
    """The router shipped for the backbone (matched by fingerprint), else every head.

    With ``require_router`` a backbone without a shipped router is an error instead.
    """

    require_router: bool = False
    name: str = field(default="auto", init=False)

    def resolve(self, backbone: Backbone) -> HeadStrategy:
        from .router.artifact import REINSTALL_HINT, RouterArtifactError, shipped_router_for

        folder = shipped_router_for(backbone.fingerprint())
        if folder is not None:
            try:
                return RoutedHeads.from_folder(folder).resolve(backbone)
            except RouterArtifactError as err:
                raise RouterArtifactError(
                    f"the router shipped in the package at {folder} is damaged ({err}); repair the installation: "
                    f"{REINSTALL_HINT}"
                ) from None
        if self.require_router:
            raise ValueError(
                f"no router ships for {backbone.name}: pass a router folder (`--router DIR` on the command line; "
                "fit one with `routehead-rag fit`)"
            )
        logger.info("no router ships for %s: scoring with all heads (ICR)", backbone.name)
        return AllHeads()

    def heads_for(self, backbone: Backbone, query: str) -> list[Head] | None:
        raise RuntimeError("'auto' decides when the backbone loads: call resolve(backbone) first")


def serialisable_heads(heads: Any) -> str | list[str]:
    """The JSON-able form of a ``heads`` argument, for the integrations' serialisation: names and paths as
    strings, a head list as ``"L12.H5"`` strings (normalised, repeats dropped).  Validates like
    :func:`parse_strategy`."""
    strategy = parse_strategy(heads)
    if isinstance(heads, (str, os.PathLike)):
        return os.fspath(heads)
    if isinstance(strategy, StaticHeads):
        return [str(h) for h in strategy.heads]
    raise TypeError(f"heads={heads!r} cannot be serialised: pass 'auto', 'all', a path or a list of heads")


def parse_strategy(heads: Any) -> HeadStrategy:
    """The head choice for a user's ``heads`` argument; the one place it is validated.

    ``heads``: ``"auto"``, ``"all"``, a :class:`HeadStrategy`, a list of heads (``"L12.H5"``,
    ``(12, 5)`` or ``Head``), the path of a heads file (a JSON list, ``{"heads": [...]}``, or
    one ``L12.H5`` per line), or a router folder from ``routehead-rag fit``.

    Raises:
        ValueError: naming the bad value and what to pass instead.
        TypeError: ``heads`` is of a type that cannot name heads.
    """
    if isinstance(heads, HeadStrategy):
        return heads
    if heads is None:
        raise ValueError("heads=None: pass 'auto' (default), 'all', a list like ['L12.H5'], a heads file or a router folder")
    if isinstance(heads, str) and heads in HEAD_CHOICES:
        return AutoHeads() if heads == "auto" else AllHeads()
    if isinstance(heads, (str, os.PathLike)):
        path = Path(heads)
        if path.is_dir():
            return RoutedHeads.from_folder(path)
        if path.is_file():
            return StaticHeads(tuple(load_heads_file(path)))
        raise ValueError(
            f"heads={os.fspath(heads)!r} is neither 'auto' nor 'all' nor an existing heads file or router folder; "
            "pass one of those, or a list like ['L12.H5', 'L3.H1']"
        )
    if isinstance(heads, Sequence) or hasattr(heads, "__iter__"):
        return StaticHeads(tuple(as_heads(heads)))
    raise TypeError(
        f"heads must be 'auto', 'all', a list of heads, a heads file or a router folder, got {type(heads).__name__}"
    )


def check_against_model(strategy: HeadStrategy, model: Any, *, convert: bool = True) -> None:
    """The head choice against ``model``'s layers x heads, from its config without loading weights
    (with ``convert``, an embedded GGUF not yet converted is converted first; without, it is left
    for later); a shape not known this way is checked when the model loads."""
    from .model.architecture import peek_shape

    shape = peek_shape(model, convert=convert)
    if shape is not None:
        where = f"this backbone ({model!r})" if isinstance(model, str) else "this backbone"
        strategy.check_grid(HeadGrid(shape.num_layers, shape.num_heads), where)
