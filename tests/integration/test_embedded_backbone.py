"""The real embedded backbone: GGUF -> cached safetensors folder -> SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from routehead_rag.model.backbone import Backbone, load_backbone
from routehead_rag.model.gguf_cache import (
    EMBEDDED_DEFAULT,
    MANIFEST_NAME,
    convert_embedded,
    embedded_gguf_path,
    gguf_sha256,
)

pytestmark = pytest.mark.integration


def test_embedded_shape(embedded_backbone: Backbone) -> None:
    backbone = embedded_backbone
    assert backbone.name == EMBEDDED_DEFAULT
    assert backbone.fingerprint()["model_type"] == "llama"
    assert (backbone.num_layers, backbone.num_heads, backbone.num_kv_heads) == (30, 9, 3)
    assert (backbone.hidden_size, backbone.head_dim) == (576, 64)
    assert len(backbone.decoder.layers) == 30
    assert backbone.dtype == torch.float32
    assert not backbone.causal_lm.training
    assert backbone.causal_lm.config._attn_implementation == "sdpa"
    assert backbone.tokenizer.chat_template and "<|im_start|>" in backbone.tokenizer.chat_template


def test_greedy_forward_is_finite(embedded_backbone: Backbone) -> None:
    tokenizer = embedded_backbone.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=embedded_backbone.device)  # [1, seq]
    generated = []
    with torch.inference_mode():
        for _ in range(4):  # a few greedy steps, no cache: the prompt is short
            logits = embedded_backbone.causal_lm(ids).logits  # [1, seq, vocab]
            assert torch.isfinite(logits).all()
            next_id = logits[0, -1].argmax()
            generated.append(int(next_id))
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert isinstance(tokenizer.decode(generated), str)


def test_second_load_reuses_the_cache(embedded_backbone: Backbone, caplog: pytest.LogCaptureFixture) -> None:
    folder = convert_embedded()  # the folder the fixture loaded from (no conversion: already valid)
    manifest_path = folder / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    assert manifest["gguf_sha256"] == gguf_sha256(embedded_gguf_path(), folder.parent)
    mtime = manifest_path.stat().st_mtime_ns

    with caplog.at_level(logging.DEBUG, logger="routehead_rag.model.gguf_cache"):
        again = load_backbone()
    messages = [record.getMessage() for record in caplog.records]
    assert not any("convert" in m.lower() for m in messages), messages  # "converting ...", "Converted ..."
    assert any("Using cached conversion" in m for m in messages), messages
    assert manifest_path.stat().st_mtime_ns == mtime
    assert again.model is not embedded_backbone.model
    assert again.fingerprint() == embedded_backbone.fingerprint()
