"""The router: a query embedding in, a score per head out (:mod:`.model`), and the fitted
router on disk, validated and versioned (:mod:`.artifact`)."""
