"""``RouteHeadRanker``: a Haystack ranker that scores Documents with a causal LM's own attention.

The LLM can be the one your pipeline already generates with: pass the ``TransformersChatGenerator``
(or a loaded transformers model and its tokenizer) as ``model`` and the ranker scores with that
very model object, with no second copy of the weights.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import threading
from typing import Any

import torch
from haystack import Document, component, default_from_dict, default_to_dict
from haystack.core.errors import SerializationError
from haystack.core.serialization import component_to_dict
from haystack.utils import ComponentDevice, Secret, deserialize_secrets_inplace
from haystack.utils.deserialization import deserialize_component_inplace  # exported in haystack.utils from 3.0

from routehead_rag import RouteHeadReranker
from routehead_rag.integration import (
    META_KEY,
    check_explain,
    check_query,
    check_score_threshold,
    check_top_k,
    in_content,
    retrieval_scores,
)

from .documents import deduplicate, text_to_rank


@component
class RouteHeadRanker:
    """Re-rank Documents for a query with a causal LM's attention (ICR, fixed heads, or heads routed per query).

    Usage:

    ```python
    from haystack import Document
    from haystack_integrations.components.rankers.routehead import RouteHeadRanker

    ranker = RouteHeadRanker()  # the embedded SmolLM2-135M, offline
    docs = [Document(content="Paris is the capital of France."), Document(content="Mars is red.")]
    ranker.run(query="What is the capital of France?", documents=docs)["documents"]
    ```

    One LLM for both jobs: ``RouteHeadRanker(model=generator)`` with a ``TransformersChatGenerator``
    scores with the generator's own model object once the generator is warmed up (the ranker warms it
    up if needed).

    Documents are de-duplicated by id first (the highest score wins, as in Haystack's rankers); the
    documents returned are copies with the attention score set, best first; the ones passed in are not
    modified. A document with no text to rank (``content=None`` or blank, and no embedded meta) is kept
    and ranked last with score ``routehead_rag.documents.EMPTY_PASSAGE_SCORE`` (finite: valid JSON).
    """

    def __init__(
        self,
        model: Any = "smollm2-135m",
        top_k: int | None = 10,
        score_threshold: float | None = None,
        meta_fields_to_embed: list[str] | None = None,
        embedding_separator: str = "\n",
        device: ComponentDevice | None = None,
        tokenizer: Any = None,
        token: Secret | None = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),
        explain: bool = False,
        **options: Any,
    ) -> None:
        """
        :param model: ``"smollm2-135m"`` (the embedded default, offline), a Hugging Face id or local folder;
            or, to share one LLM with generation, a ``TransformersChatGenerator`` (its pipeline's model and
            tokenizer are used) or a loaded transformers model (then pass ``tokenizer``; such a ranker cannot
            be serialised).
        :param top_k: how many documents to return at most (``None``: all).
        :param score_threshold: return only documents whose score is ``>=`` this (``None``: no filter). With the
            shipped router (and any router fitted with a calibration) scores are probabilities of relevance, built
            from the routed heads' attention and the router's bi-encoder cosine (all-MiniLM-L6-v2; the option
            ``bi_encoder=False`` leaves it out, with ``scale_score=False``).
        :param meta_fields_to_embed: meta fields whose values are put before the content in the text ranked.
        :param embedding_separator: joins the meta values and the content.
        :param device: where to load a model by name (``None``: cuda, then mps, then cpu). With a shared model:
            ``None`` or the device it is on.
        :param tokenizer: the tokenizer of a model object passed as ``model``; with a model name, an optional
            tokenizer id or folder.
        :param token: a Hugging Face token for gated or private models, as a Haystack ``Secret`` (serialised as
            the environment variables it reads, never its value).
        :param explain: also put why each document ranked where it did in its ``meta["routehead_explanation"]``
            (plain JSON data: the heads and the router's weight for each, the score's parts, the most attended
            words as character offsets into ``content``; see ``routehead_rag.explain``). Off by default.
        :param options: the re-ranker's options, the same names as ``routehead_rag.RouteHeadReranker`` and the
            LlamaIndex postprocessor take (``routehead_rag.options.RerankerOptions``): ``heads``, ``instruction``,
            ``max_passage_tokens`` (passage budget), ``chunk_long_documents``, ``fuse_first_stage``,
            ``scale_score``, ``lora``, ``dtype``, ``model_kwargs``, ``tokenizer_kwargs``, ... Serialised as given.
        :raises ValueError: an argument has a wrong value (the message names it and how to fix it).
        :raises TypeError: ``model`` or ``tokenizer`` is of a type the ranker cannot use, or an option is unknown.
        """
        self._model_kind = _model_kind(model)
        self.model = os.fspath(model) if self._model_kind == "name" else model
        self.tokenizer = _check_tokenizer(tokenizer, self._model_kind)
        self.top_k = check_top_k(top_k)
        self.score_threshold = check_score_threshold(score_threshold)
        self.meta_fields_to_embed = _check_meta_fields(meta_fields_to_embed)
        if not isinstance(embedding_separator, str):
            raise ValueError(f"embedding_separator must be a string, got {embedding_separator!r}")
        self.embedding_separator = embedding_separator
        self.device = _check_device(device)
        if token is not None and not isinstance(token, Secret):
            raise TypeError(f"token must be a haystack Secret (e.g. Secret.from_env_var('HF_TOKEN')) or None, got "
                            f"{type(token).__name__}: a plain string would end up in to_dict()")
        self.token = token
        self.explain = check_explain(explain)
        if "device" in options:
            raise TypeError("device is this component's own argument: pass a ComponentDevice as device=...")
        # The engine checks the options, once, now (nothing loads until warm_up).
        self._engine = RouteHeadReranker(
            model=self._generator_model if self._model_kind == "generator" else self.model,
            tokenizer=self.tokenizer,
            token=None if token is None else token.resolve_value,  # read when the model loads, never stored
            device=self.device.to_torch_str() if self.device is not None else None,
            **options,
        )
        self.options = self._engine.options  # serialised as its dump: every option, by the one model's names
        self._reranker: RouteHeadReranker | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the model (or take the generator's), once; thread-safe. ``run`` calls it when needed."""
        if self._reranker is not None:
            return
        with self._lock:
            if self._reranker is None:
                self._engine.warm_up()
                self._reranker = self._engine

    async def warm_up_async(self) -> None:
        """``warm_up`` in a worker thread, so loading does not block the event loop."""
        await asyncio.to_thread(self.warm_up)

    @property
    def reranker(self) -> RouteHeadReranker | None:
        """The underlying ``routehead_rag.RouteHeadReranker`` once warmed up, else ``None``."""
        return self._reranker

    def _generator_model(self) -> tuple[Any, Any]:
        """The model and tokenizer of the generator passed as ``model`` (warming it up if needed)."""
        generator = self.model
        if getattr(generator, "pipeline", None) is None:
            generator.warm_up()
        hf_pipeline = generator.pipeline
        model = getattr(hf_pipeline, "model", None)
        tokenizer = getattr(hf_pipeline, "tokenizer", None)
        if model is None or tokenizer is None:
            raise TypeError(
                f"{type(generator).__name__}.warm_up() left no transformers pipeline with a model and a tokenizer "
                f"(pipeline: {type(hf_pipeline).__name__}). Pass a text-generation TransformersChatGenerator, or the "
                "model and tokenizer objects themselves (model=..., tokenizer=...)."
            )
        return model, tokenizer

    # -- running ---------------------------------------------------------------------------------
    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
        scale_score: bool | None = None,
    ) -> dict[str, list[Document]]:
        """
        Rank ``documents`` for ``query``, best first.

        :param query: the search text or question.
        :param documents: candidates (e.g. from a retriever); de-duplicated by id before ranking.
        :param top_k: overrides the init value when not ``None`` (``0`` is an error, not "use the default").
        :param score_threshold: overrides the init value when not ``None`` (``0.0`` filters).
        :param scale_score: overrides the init option for this call when not ``None`` (``True``: probabilities of
            relevance where the router has a calibration; ``False``: the unscaled scores).
        :returns: ``{"documents": [...]}``: copies of the documents with ``score`` set (and, with ``explain=True``,
            ``meta["routehead_explanation"]``), best first, at most ``top_k``, those below ``score_threshold`` left out.
        :raises ValueError: empty query or a bad ``top_k`` / ``score_threshold``.
        :raises TypeError: ``query`` is not a string or ``documents`` holds something that is not a Document.
        """
        top_k = self.top_k if top_k is None else check_top_k(top_k)
        score_threshold = self.score_threshold if score_threshold is None else check_score_threshold(score_threshold)
        if scale_score is not None and not isinstance(scale_score, bool):
            raise ValueError(f"scale_score must be True, False or None, got {scale_score!r}")
        check_query(query)
        _check_documents(documents)
        if not documents:
            return {"documents": []}
        self.warm_up()
        assert self._reranker is not None  # set by warm_up
        candidates = deduplicate(documents)
        texts = [text_to_rank(doc, self.meta_fields_to_embed, self.embedding_separator) for doc in candidates]
        score = self._reranker.explain if self.explain else self._reranker.rank
        outcome = score(
            query, texts, top_k=top_k, score_threshold=score_threshold,
            first_stage_scores=retrieval_scores(doc.score for doc in candidates), scale_score=scale_score,
        )
        if not self.explain:
            return {"documents": [dataclasses.replace(candidates[r.index], score=r.score) for r in outcome]}
        documents = []
        for r in outcome.ranking:
            document = candidates[r.index]
            why = in_content(outcome.for_document(r.index), texts[r.index], document.content or "", document.id)
            documents.append(dataclasses.replace(document, score=r.score, meta={**document.meta, META_KEY: why}))
        return {"documents": documents}

    @component.output_types(documents=list[Document])
    async def run_async(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
        scale_score: bool | None = None,
    ) -> dict[str, list[Document]]:
        """``run`` in a worker thread (loading and scoring block), with the same arguments and result."""
        return await asyncio.to_thread(self.run, query, documents, top_k, score_threshold, scale_score)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Serialise every init argument; a generator passed as ``model`` is serialised with its own ``to_dict``.

        :raises SerializationError: ``model`` or ``tokenizer`` is a loaded object (not a name or a generator).
        """
        if self._model_kind == "object":
            raise SerializationError(
                f"RouteHeadRanker was given a loaded {type(self.model).__name__} object as model, which cannot be "
                "serialised. To save this ranker (or a pipeline holding it), pass a model name or folder, or the "
                "TransformersChatGenerator that holds the model (model=generator)."
            )
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise SerializationError(
                f"RouteHeadRanker was given a loaded {type(self.tokenizer).__name__} object as tokenizer, which "
                "cannot be serialised: pass the tokenizer's id or folder, or leave tokenizer=None."
            )
        model = component_to_dict(obj=self.model, name="model") if self._model_kind == "generator" else self.model
        options = self.options.model_dump(mode="json", exclude={"device"})  # this component's own ComponentDevice
        return default_to_dict(
            self,
            model=model,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            meta_fields_to_embed=self.meta_fields_to_embed,
            embedding_separator=self.embedding_separator,
            device=self.device.to_dict() if self.device is not None else None,
            tokenizer=self.tokenizer,
            token=self.token.to_dict() if self.token is not None else None,
            explain=self.explain,
            **options,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouteHeadRanker:
        """Rebuild a ranker from ``to_dict`` output (``data`` is not modified)."""
        # Deep copy: a generator's from_dict rewrites its own init parameters in place.
        init_parameters = copy.deepcopy(data.get("init_parameters", {}))
        if isinstance(init_parameters.get("model"), dict):
            deserialize_component_inplace(init_parameters, key="model")
        if isinstance(init_parameters.get("device"), dict):
            init_parameters["device"] = ComponentDevice.from_dict(init_parameters["device"])
        deserialize_secrets_inplace(init_parameters, keys=["token"])
        return default_from_dict(cls, {**data, "init_parameters": init_parameters})


# -- argument checks (each error names the value and the fix) --------------------------------------


def _model_kind(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return "name"
    if isinstance(model, torch.nn.Module):
        return "object"
    if callable(getattr(model, "warm_up", None)) and hasattr(model, "pipeline"):
        return "generator"  # TransformersChatGenerator: `pipeline` is None until warm_up()
    raise TypeError(
        f"model must be a model name or folder (str), a TransformersChatGenerator, or a loaded transformers "
        f"model (with tokenizer=...), got {type(model).__name__}"
    )


def _check_tokenizer(tokenizer: Any, model_kind: str) -> Any:
    if model_kind == "generator" and tokenizer is not None:
        raise ValueError(
            "tokenizer was given together with a generator as model: the generator's own tokenizer is used; "
            "leave tokenizer=None"
        )
    if isinstance(tokenizer, os.PathLike):
        return os.fspath(tokenizer)
    return tokenizer


def _check_meta_fields(fields: Any) -> list[str]:
    if fields is None:
        return []
    if isinstance(fields, str) or not isinstance(fields, (list, tuple)) or not all(isinstance(f, str) for f in fields):
        raise ValueError(f"meta_fields_to_embed must be a list of meta field names, got {fields!r} (e.g. ['title'])")
    return list(fields)


def _check_device(device: Any) -> ComponentDevice | None:
    if device is None:
        return None
    if not isinstance(device, ComponentDevice):
        raise ValueError(
            f"device must be a ComponentDevice or None, got {device!r}: use ComponentDevice.from_str({str(device)!r})"
        )
    if device.has_multiple_devices:
        raise ValueError(f"device {device!r} is a device map; the ranker runs on one device: pass a single device")
    return device


def _check_documents(documents: Any) -> None:
    if not isinstance(documents, (list, tuple)):
        raise TypeError(f"documents must be a list of Document, got {type(documents).__name__}")
    for index, document in enumerate(documents):
        if not isinstance(document, Document):
            raise TypeError(f"documents[{index}] is a {type(document).__name__}, not a haystack Document")

