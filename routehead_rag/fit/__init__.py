"""Fitting a router (training side; inference code never imports this package).

:mod:`.sources` (where fit data comes from) -> :mod:`.extraction` (every head's scores, cached per
query) -> :mod:`.labelled` (padded tensors, batched nDCG, static head ranking) -> :mod:`.search`
(per-query head labels) -> :mod:`.training` (the router, chosen on dev nDCG@10) ->
:mod:`.pipeline` (``routehead-rag fit``: all of it, plus the artifact and :mod:`.report`).
"""
