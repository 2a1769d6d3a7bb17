"""Query embeddings equal the pooled hidden states of output_hidden_states, and stop early."""

import pytest
import torch

from routehead_rag.engine.embedding import QueryEmbeddingConfig, embed_query
from tests.tiny_models import tiny_backbone


@pytest.mark.parametrize("layer", [-1, 0, 1])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_matches_output_hidden_states(layer, pooling):
    backbone = tiny_backbone("llama")
    ids = backbone.tokenizer("what moves the sea", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        states = backbone.decoder(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, layer 0, ...
    # hidden_states[i + 1] is the output of layer i, except the last entry, which is after the final norm
    reference = states[layer + 1][0] if layer + 1 < len(states) - 1 else None
    got = embed_query(backbone, "what moves the sea", QueryEmbeddingConfig(layer=layer, pooling=pooling))
    if reference is not None:
        expected = reference.mean(0) if pooling == "mean" else reference[-1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.shape == (backbone.hidden_size,)


def test_later_layers_do_not_run():
    backbone = tiny_backbone("llama")
    calls = []
    hook = backbone.decoder.layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        embed_query(backbone, "sea", QueryEmbeddingConfig(layer=0))
    finally:
        hook.remove()
    assert calls == []
    assert not backbone.decoder.layers[0]._forward_hooks  # our hook is gone


def test_bad_input():
    backbone = tiny_backbone("llama")
    with pytest.raises(ValueError, match="non-empty"):
        embed_query(backbone, "  ")
    with pytest.raises(ValueError, match="does not exist"):
        embed_query(backbone, "sea", QueryEmbeddingConfig(layer=7))
