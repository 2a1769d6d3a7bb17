"""Evaluation on labelled BEIR-layout sets: reading them (:mod:`.beir`), the protocol (:mod:`.protocol`),
candidate lists (:mod:`.candidates`), first-stage baselines (:mod:`.first_stage`), metrics through
ir_measures (:mod:`.metrics`), and scoring head strategies on a set (:mod:`.harness`).

Needs the ``fit`` extra (bm25s, ir-measures): ``pip install 'routehead-rag[fit]'``.
"""
