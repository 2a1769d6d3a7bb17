"""The backbone LLM: loading or sharing it (:mod:`.backbone`), the GGUF conversion cache
(:mod:`.gguf_cache`), and dtype/device choice (:mod:`.devices`)."""

SHARED_MODEL_NAME = "<shared model>"
"""The name recorded for a caller's model object (it has no name to load it by)."""
