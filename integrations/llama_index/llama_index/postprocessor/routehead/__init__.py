"""LlamaIndex node postprocessor backed by routehead-rag: re-rank nodes with an LLM's attention.

    from llama_index.postprocessor.routehead import RouteHeadPostprocessor

    rerank = RouteHeadPostprocessor(top_n=3)            # embedded SmolLM2-135M, loads on first query
    rerank = RouteHeadPostprocessor(llm=hf_llm, top_n=3)  # share the generator's model
"""

from llama_index.postprocessor.routehead.base import RouteHeadPostprocessor

__all__ = ["RouteHeadPostprocessor"]
