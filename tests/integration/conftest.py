"""Shared fixtures for integration tests (real embedded SmolLM2-135M backbone)."""

from __future__ import annotations

import pytest

from routehead_rag.model.backbone import Backbone, load_backbone


@pytest.fixture(scope="session")
def embedded_backbone() -> Backbone:
    """The embedded default, loaded once per session from the user cache.

    The first run on a machine converts the GGUF (~20 s); later sessions load the cached
    safetensors folder (~1 s). Treat it as read-only: it is shared by every integration test.
    """
    return load_backbone("smollm2-135m", dtype="float32")  # the reference figures are float32
