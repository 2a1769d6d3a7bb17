"""``RouteHeadPostprocessor``: a LlamaIndex node postprocessor that re-ranks with an LLM's attention.

Settings are pydantic fields (serialised by ``to_dict``): this postprocessor's own, and the re-ranker's
options, inherited from :class:`routehead_rag.options.OptionFields` so that every option has one
name in the core, Haystack and LlamaIndex. The engine, a
:class:`routehead_rag.RouteHeadReranker`, lives in a private attribute and loads its model on the
first query (or :meth:`RouteHeadPostprocessor.warm_up`), never in ``__init__``.

One LLM for both jobs: pass the generator (``llm=HuggingFaceLLM(...)``) or its transformers
``model=`` and ``tokenizer=`` objects, and the re-ranker reads attention from that very model
(no copy, cast or move). A model object cannot be serialised: ``to_dict`` records its name and
``shared_model=True``, and ``from_dict(data, llm=llm)`` re-attaches it.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional

import torch
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, field_validator
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from routehead_rag.integration import (
    EMBEDDED_DEFAULT,
    META_KEY,
    SHARED_MODEL_NAME,
    RouteHeadReranker,
    check_explain,
    check_query,
    check_score_threshold,
    check_top_k,
    in_content,
    retrieval_scores,
)
from routehead_rag.options import OptionFields

dispatcher = get_dispatcher(__name__)


class RouteHeadPostprocessor(BaseNodePostprocessor, OptionFields):
    """Re-rank retrieved nodes with the query-to-passage attention of a causal LM.

    Args:
        model: ``"smollm2-135m"`` (embedded default, offline), a Hugging Face id or local folder,
            or a loaded transformers model object to share (then pass ``tokenizer`` too).
        top_n: how many nodes to return, best first.
        score_threshold: drop nodes scoring below it (``None``: keep all ``top_n``). With the shipped router
            (and any router fitted with a calibration) scores are probabilities of relevance, built from the routed
            heads' attention and the router's bi-encoder cosine (all-MiniLM-L6-v2; ``bi_encoder=False`` leaves it
            out, with ``scale_score=False``).
        keep_retrieval_score: keep the retriever's score in ``node.metadata["retrieval_score"]``
            (on a copy of the node; the caller's node is untouched).
        metadata_mode: which metadata goes into the passage text the LLM reads.
        explain: also put why each node ranked where it did in ``node.metadata["routehead_explanation"]`` (on a
            copy; plain JSON data: the heads and the router's weight for each, the score's parts, the most
            attended words as character offsets into the node's text; see ``routehead_rag.explain``). The key
            is excluded from the text an LLM or an embedding model reads. Off by default.
        tokenizer: the tokenizer of a ``model`` object (not serialised).
        token: a Hugging Face token for a gated or private model (never serialised).
        llm: a ``llama_index.llms.huggingface.HuggingFaceLLM`` (or any LLM object holding
            ``_model`` and ``_tokenizer``) whose model is shared (not serialised); the ``model``
            field then records that model's ``name_or_path``.
        shared_model: set for you; ``True`` in ``to_dict`` output means the model was a shared
            object that must be passed again to ``from_dict``.
        **options: the re-ranker's options, the same names as ``routehead_rag.RouteHeadReranker`` and the
            Haystack ranker take (``routehead_rag.options.RerankerOptions``): ``heads``, ``instruction``,
            ``max_passage_tokens`` (passage budget), ``chunk_long_documents``, ``fuse_first_stage``,
            ``scale_score``, ``lora``, ``dtype``, ``device``, ``model_kwargs``, ``tokenizer_kwargs``, ...
            They are this postprocessor's pydantic fields, serialised by ``to_dict``.
    """

    model_config = ConfigDict(validate_assignment=True)

    model: str = Field(
        default=EMBEDDED_DEFAULT,
        frozen=True,
        description="Backbone name, Hugging Face id or folder; for a shared model object, its name_or_path.",
    )
    top_n: int = Field(default=5, description="Number of nodes to return, best first.")
    score_threshold: Optional[float] = Field(
        default=None, description="Drop nodes whose re-ranking score is below this value."
    )
    keep_retrieval_score: bool = Field(
        default=False, description="Keep the retriever's score in node.metadata['retrieval_score']."
    )
    metadata_mode: MetadataMode = Field(
        default=MetadataMode.EMBED, description="Metadata mode of node.get_content() for the passage text."
    )
    explain: bool = Field(
        default=False, description="Put why each node ranked where it did in node.metadata['routehead_explanation']."
    )
    shared_model: bool = Field(
        default=False,
        frozen=True,
        description="The backbone is a caller's model object (not serialised; pass it again to from_dict).",
    )

    _reranker: RouteHeadReranker = PrivateAttr()

    def __init__(
        self,
        model: Any = EMBEDDED_DEFAULT,
        top_n: int = 5,
        score_threshold: Optional[float] = None,
        keep_retrieval_score: bool = False,
        metadata_mode: MetadataMode = MetadataMode.EMBED,
        shared_model: bool = False,
        explain: bool = False,
        *,
        tokenizer: Any = None,
        token: Optional[str] = None,
        llm: Any = None,
        callback_manager: Optional[CallbackManager] = None,
        **options: Any,
    ) -> None:
        model_object, tokenizer = _shared_objects(model, tokenizer, llm)
        if model_object is not None:
            model = getattr(model_object, "name_or_path", "") or SHARED_MODEL_NAME
        elif shared_model:
            raise ValueError(
                f"shared_model=True but no model object was given: this postprocessor was saved while sharing "
                f"a generator's model ({model!r}), which is not serialised. Re-attach it with "
                f"RouteHeadPostprocessor.from_dict(data, llm=your_llm) (or model=<model>, tokenizer=<tokenizer>), "
                f"or pass shared_model=False to load a separate copy of {model!r} by name."
            )
        elif isinstance(model, os.PathLike):
            model = os.fspath(model)
        options.pop("class_name", None)  # written by to_dict
        # The engine checks its own options, once, now (nothing loads until the first query).
        engine = RouteHeadReranker(
            model=model_object if model_object is not None else model, tokenizer=tokenizer, token=token, **options
        )
        fields: dict[str, Any] = dict(
            model=model,
            top_n=top_n,
            score_threshold=score_threshold,
            keep_retrieval_score=keep_retrieval_score,
            metadata_mode=metadata_mode,
            shared_model=model_object is not None,
            explain=explain,
            **engine.options.model_dump(),
        )
        if callback_manager is not None:
            fields["callback_manager"] = callback_manager
        super().__init__(**fields)
        self._reranker = engine

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OptionFields.model_fields:
            raise ValueError(f"{name} is a re-ranker option, fixed when the postprocessor is built (its engine was "
                             f"checked and set up with it): build a new RouteHeadPostprocessor({name}=...)")
        super().__setattr__(name, value)

    @classmethod
    def class_name(cls) -> str:
        return "RouteHeadPostprocessor"

    # -- validation ------------------------------------------------------------------------
    @field_validator("top_n", mode="before")
    @classmethod
    def _top_n(cls, value: Any) -> int:
        if value is None:
            raise ValueError("top_n must be a positive integer (> 0), got None")
        return check_top_k(value, "top_n")

    @field_validator("explain", mode="before")
    @classmethod
    def _explain(cls, value: Any) -> bool:
        return check_explain(value)

    @field_validator("score_threshold", mode="before")
    @classmethod
    def _score_threshold(cls, value: Any) -> Optional[float]:
        return check_score_threshold(value)

    # -- engine ----------------------------------------------------------------------------
    @property
    def reranker(self) -> RouteHeadReranker:
        """The :class:`RouteHeadReranker` doing the work (its model loads on first use)."""
        return self._reranker

    def warm_up(self) -> None:
        """Load (or wrap) the backbone now instead of on the first query; thread-safe."""
        self._reranker.warm_up()

    # -- postprocessing --------------------------------------------------------------------
    def _postprocess_nodes(
        self,
        nodes: List[NodeWithScore],
        query_bundle: Optional[QueryBundle] = None,
    ) -> List[NodeWithScore]:
        if query_bundle is None:
            raise ValueError(
                "RouteHeadPostprocessor needs the query to re-rank for: call "
                "postprocess_nodes(nodes, query_str=query) or postprocess_nodes(nodes, query_bundle=QueryBundle(query)); "
                "query engines pass it for you."
            )
        check_query(query_bundle.query_str)
        dispatcher.event(
            ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n, model_name=self.model)
        )
        with self.callback_manager.event(
            CBEventType.RERANKING,
            payload={
                EventPayload.NODES: nodes,
                EventPayload.MODEL_NAME: self.model,
                EventPayload.QUERY_STR: query_bundle.query_str,
                EventPayload.TOP_K: self.top_n,
            },
        ) as event:
            new_nodes = self._rerank(nodes, query_bundle.query_str) if nodes else []
            event.on_end(payload={EventPayload.NODES: new_nodes})
        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes

    def _rerank(self, nodes: List[NodeWithScore], query: str) -> List[NodeWithScore]:
        """New ``NodeWithScore``s, best first, ``[:top_n]``; the caller's objects are not modified."""
        texts = [item.node.get_content(metadata_mode=self.metadata_mode) for item in nodes]
        # best first; ties keep retrieval order
        score = self._reranker.explain if self.explain else self._reranker.rank
        outcome = score(
            query, texts, top_k=self.top_n, score_threshold=self.score_threshold,
            first_stage_scores=retrieval_scores(item.score for item in nodes),
        )
        new_nodes = []
        for document in outcome.ranking if self.explain else outcome:
            original = nodes[document.index]
            node = original.node
            update: dict[str, Any] = {}
            if self.keep_retrieval_score:
                update["metadata"] = {**node.metadata, "retrieval_score": original.score}
            if self.explain:
                content = node.get_content(metadata_mode=MetadataMode.NONE)
                why = in_content(outcome.for_document(document.index), texts[document.index], content, node.node_id)
                update["metadata"] = {**update.get("metadata", node.metadata), META_KEY: why}
                for keys in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):  # not read by an LLM
                    update[keys] = [*(k for k in getattr(node, keys) if k != META_KEY), META_KEY]
            if update:
                node = node.model_copy(update=update)
            new_nodes.append(NodeWithScore(node=node, score=document.score))
        return new_nodes


def _shared_objects(model: Any, tokenizer: Any, llm: Any) -> tuple[Any, Any]:
    """``(model_object, tokenizer)`` to share, or ``(None, None)`` for a model loaded by name."""
    if llm is not None:
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise ValueError("pass either llm= or a model object with tokenizer=, not both")
        if tokenizer is not None:
            raise ValueError("tokenizer= is taken from llm=; do not pass both")
        model_object = getattr(llm, "_model", None)
        llm_tokenizer = getattr(llm, "_tokenizer", None)
        if not isinstance(model_object, torch.nn.Module) or llm_tokenizer is None:
            raise TypeError(
                f"llm={type(llm).__name__} holds no loaded transformers model and tokenizer: pass a "
                "llama_index.llms.huggingface.HuggingFaceLLM, or pass your generator's objects directly as "
                "RouteHeadPostprocessor(model=model, tokenizer=tokenizer)."
            )
        return model_object, llm_tokenizer
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError(
                f"tokenizer= is only used with a model object; model={os.fspath(model)!r} is loaded by name "
                "with its own tokenizer"
            )
        return None, None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a name, Hugging Face id or folder, or a loaded transformers model, "
            f"got {type(model).__name__}"
        )
    if tokenizer is None:
        raise ValueError(
            f"model is a {type(model).__name__} object but tokenizer= is missing: pass the tokenizer it was "
            "trained with, or pass llm=HuggingFaceLLM(model=..., tokenizer=...)"
        )
    return model, tokenizer
