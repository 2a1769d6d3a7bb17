"""The scoring engine: the prompt and its spans (:mod:`.prompt`), attention and hidden-state
capture on the unmodified model (:mod:`.capture`), per-head passage scores (:mod:`.scorer`)
and query embeddings (:mod:`.embedding`)."""
