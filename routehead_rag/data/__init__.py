"""Labelled data: BEIR-layout sets (:mod:`.beir`, each file's reader in :mod:`.beir_files`), the
evaluation protocol (:mod:`.protocol`), candidate lists (:mod:`.candidates`) and first stages
(:mod:`.first_stage`: BM25, dense). ``eval`` and ``fit`` both stand on it.

BM25 needs the ``fit`` extra (bm25s), the dense first stage sentence-transformers (a core dependency).
"""
