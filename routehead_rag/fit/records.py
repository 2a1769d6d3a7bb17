"""What a fit records beside the router, typed: its data, head search, training choices and LoRA (training side).

``config.json`` keeps these records as finite JSON (inference never reads them: :mod:`routehead_rag.router.artifact`
only checks that every number is finite); the fit writes them from, and the model card reads them through, the one
schema here (:class:`FitRecords`), never by string key.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .lora import LoraTrainingConfig
from .search import SearchConfig
from .training import TrainingConfig

Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataRecord(_Record):
    """One source of the fit data."""

    name: str
    origin: str  # relative to the data folder or the repository
    queries: int = Field(..., ge=0)
    instruction: str  # the named prompt wording, or "the scoring prompt's"


class SearchGridRow(_Record):
    """One head-search setting tried, with the router it gave on dev."""

    settings: SearchConfig
    k: int
    dev_ndcg: Finite  # dev nDCG@10 of the routed aggregation


class SearchRecord(_Record):
    chosen: SearchConfig
    grid: list[SearchGridRow]


class DepthRow(_Record):
    """One depth cost tried on dev (see :func:`routehead_rag.fit.training.choose_depth_cost`)."""

    depth_cost: Finite
    dev_ndcg: Finite
    mean_deepest_layer: Finite
    layer_share: Finite


class EpochRow(_Record):
    epoch: int
    dev_ndcg: Finite


class LoraRun(_Record):
    """One (rank, learning rate) tried: dev nDCG@10 after every epoch (epoch 0: no LoRA)."""

    rank: int
    lr: Finite
    history: list[EpochRow]
    best_epoch: int
    best_dev_ndcg: Finite


class LoraRecord(_Record):
    settings: LoraTrainingConfig
    train_queries: int
    dev_queries: int
    runs: list[LoraRun]
    base_dev_ndcg: Finite  # the router without a LoRA, fused as shipped (candidate-only ideal)
    dev_ndcg: Finite  # with the chosen LoRA (= base when none is kept)
    chosen_rank: int | None
    chosen_lr: Finite | None
    chosen_epoch: int
    seconds_per_train_query: Finite | None
    seconds_per_dev_query: dict[Literal["base", "adapted"], Finite]


class TrainingRecord(_Record):
    settings: TrainingConfig
    chosen_k: int
    chosen_sparsity: Finite
    chosen_epoch: int
    chosen_depth_cost: Finite
    depth_curve: list[DepthRow]
    storage_dtype: str
    lora: LoraRecord | None = None  # trained here
    extraction_lora_sha256: str | None = None  # given: the router was fitted on scores made with it


class FitRecords(_Record):
    """Everything a fit records besides the router's own settings."""

    search: SearchRecord
    training: TrainingRecord
    data: list[DataRecord]

    def config_fields(self) -> dict[str, Any]:
        """The ``search``, ``training`` and ``data`` fields of ``RouterArtifactConfig``, as JSON."""
        dumped = self.model_dump(mode="json")
        return {"search": dumped["search"], "training": dumped["training"], "data": dumped["data"]}

    @classmethod
    def of(cls, config) -> FitRecords:
        """The typed records of an artifact's ``config.json`` (``ValueError`` naming the field when they are not a
        fit's of this version: a router fitted by an older routehead-rag)."""
        try:
            # from JSON, as written (strict settings models take JSON arrays for their tuples)
            return cls.model_validate_json(json.dumps({"search": config.search, "training": config.training,
                                                       "data": config.data}))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:3])
            raise ValueError(f"the router's fit records are not this version's ({problems}); fit it again") from None
