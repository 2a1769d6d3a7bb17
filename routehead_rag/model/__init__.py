"""The backbone LLM: loading or sharing it (:mod:`.backbone`), the GGUF conversion cache
(:mod:`.gguf_cache`), and dtype/device choice (:mod:`.devices`)."""
