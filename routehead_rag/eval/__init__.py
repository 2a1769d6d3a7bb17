"""Evaluation on labelled sets: metrics through ir_measures (:mod:`.metrics`) and a scoring
configuration run over a set exactly as :class:`~routehead_rag.RouteHeadReranker` ranks (:mod:`.harness`).

Needs the ``fit`` extra (bm25s, ir-measures): ``pip install 'routehead-rag[fit]'``.
"""
