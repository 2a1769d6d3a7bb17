"""Offline scoring of labelled queries: every head's passage scores, cached per query on disk
(:mod:`.extraction`), computed here or on a Ray cluster (:mod:`.distributed`). ``eval`` and ``fit``
both stand on it; inference never imports it."""
