"""Captured attention rows against an independent reference: eager ``output_attentions``."""

import threading

import pytest
import torch
from transformers import DynamicCache

from routehead_rag.engine.capture import CAPTURE_IMPLEMENTATION, CaptureRequest, capture_scope, run_capture
from tests.tiny_models import tiny_causal_lm

ARCHS = ["llama", "qwen2", "gemma3"]


def eager_attentions(model, ids):
    """Reference: full eager attention of every layer, ``[layer][batch, head, q, k]``."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(original)


def ids_for(model, length=70, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator)


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_rows_equal_eager_attention(arch):
    model = tiny_causal_lm(arch)
    ids = ids_for(model)
    reference = eager_attentions(model, ids)
    layers = model.config.num_hidden_layers
    request = CaptureRequest(heads_by_layer={layer: None for layer in range(layers)}, row_start=55)
    with capture_scope(model.base_model), torch.inference_mode():
        run_capture(model.base_model, ids, DynamicCache(), request)
    for layer in range(layers):
        expected = reference[layer][0, :, 55:, :]  # [heads, rows, keys]
        torch.testing.assert_close(request.rows[layer][0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_then_suffix_equals_one_full_pass(arch):
    """The KV-cached suffix pass (cropped and reused) gives the same rows as full passes."""
    model = tiny_causal_lm(arch)
    ids = ids_for(model, 64)
    other_suffix = ids_for(model, 9, seed=7)
    decoder = model.base_model
    last = model.config.num_hidden_layers - 1
    plan = {0: [1, 3], last: None}
    with capture_scope(decoder), torch.inference_mode():
        full = run_capture(decoder, ids, DynamicCache(), CaptureRequest(heads_by_layer=plan, row_start=50))
        full_other = run_capture(
            decoder,
            torch.cat([ids[:, :50], other_suffix], dim=1),
            DynamicCache(),
            CaptureRequest(heads_by_layer=plan, row_start=50),
        )
        cache = DynamicCache()
        run_capture(decoder, ids[:, :50], cache, CaptureRequest(stop_after_layer=last))
        first = run_capture(decoder, ids[:, 50:], cache, CaptureRequest(heads_by_layer=plan))
        cache.crop(-(cache.get_seq_length() - 50))
        second = run_capture(decoder, other_suffix, cache, CaptureRequest(heads_by_layer=plan))
    for layer in plan:
        torch.testing.assert_close(first.rows[layer], full.rows[layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(second.rows[layer], full_other.rows[layer], atol=1e-5, rtol=0)


def test_selected_heads_map_through_gqa():
    model = tiny_causal_lm("llama")
    ids = ids_for(model)
    reference = eager_attentions(model, ids)
    request = CaptureRequest(heads_by_layer={1: [3, 0]}, row_start=60, mean_rows=True)
    with capture_scope(model.base_model), torch.inference_mode():
        run_capture(model.base_model, ids, DynamicCache(), request)
    expected = reference[1][0, [3, 0], 60:, :].mean(dim=1)  # [heads, keys]
    torch.testing.assert_close(request.rows[1][0], expected, atol=1e-5, rtol=0)


def test_early_exit_skips_later_layers():
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    calls = []
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: calls.append(n)) for n, layer in enumerate(model.base_model.layers)]
    norm_calls = []
    hooks.append(model.base_model.norm.register_forward_hook(lambda *a: norm_calls.append(1)))
    head_calls = []
    hooks.append(model.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    try:
        request = CaptureRequest(heads_by_layer={0: None}, stop_after_layer=0)
        with capture_scope(model.base_model), torch.inference_mode():
            run_capture(model.base_model, ids_for(model, 20), DynamicCache(), request)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == []  # layer 0 stopped inside its attention; layers 1-2 never ran
    assert norm_calls == [] and head_calls == []
    assert request.layers_seen == {0}


def test_scope_restores_owner_setting_even_on_error():
    model = tiny_causal_lm("qwen2")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with capture_scope(model.base_model):
            assert model.config._attn_implementation == CAPTURE_IMPLEMENTATION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before


def test_outside_a_request_the_model_behaves_exactly_as_before():
    """A generator sharing the model (no capture request in its thread) gets identical outputs."""
    model = tiny_causal_lm("gemma3")
    ids = ids_for(model, 40)
    with torch.no_grad():
        expected = model(ids).logits
        with capture_scope(model.base_model):
            during = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(during, expected, atol=1e-6, rtol=0)
    assert torch.equal(after, expected)


def test_two_threads_capture_only_their_own_rows():
    model = tiny_causal_lm("llama")
    decoder = model.base_model
    inputs = {name: ids_for(model, 30 + 10 * n, seed=n) for n, name in enumerate(["a", "b"])}
    expected = {}
    for name, ids in inputs.items():
        request = CaptureRequest(heads_by_layer={1: None}, row_start=ids.shape[1] - 5)
        with capture_scope(decoder), torch.inference_mode():
            expected[name] = run_capture(decoder, ids, DynamicCache(), request).rows[1]
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(name):
        try:
            ids = inputs[name]
            barrier.wait()
            for _ in range(5):
                request = CaptureRequest(heads_by_layer={1: None}, row_start=ids.shape[1] - 5)
                with capture_scope(decoder), torch.inference_mode():
                    results[name] = run_capture(decoder, ids, DynamicCache(), request).rows[1]
                torch.testing.assert_close(results[name], expected[name])
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert model.config._attn_implementation == "sdpa"
