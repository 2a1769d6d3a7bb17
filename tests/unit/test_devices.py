"""dtype and device: one parser, dtype="auto" by feature detection, a warning for emulated half precision,
and our loads without transformers' progress bars."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from routehead_rag.model import devices
from routehead_rag.model.devices import SlowPrecisionWarning, choose_dtype, machine_info, parse_device, parse_dtype
from routehead_rag.model.quiet import quiet_loading

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "auto"), ("auto", "auto"), ("float32", torch.float32), ("torch.bfloat16", torch.bfloat16),
     ("BFloat16", torch.bfloat16), (" float16 ", torch.float16), (torch.bfloat16, torch.bfloat16)],
)
def test_one_dtype_parser(value, expected):
    assert parse_dtype(value) == expected


@pytest.mark.parametrize(("value", "error"), [("int8", ValueError), (torch.int8, ValueError), (3, TypeError)])
def test_bad_dtypes_name_the_value(value, error):
    with pytest.raises(error, match="dtype"):
        parse_dtype(value)


def test_device_parser():
    assert parse_device(None) is None
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="device='gpu' is not a valid torch device"):
        parse_device("gpu")
    with pytest.raises(TypeError):
        parse_device(0.5)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bfloat16_only_on_a_cpu_that_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert choose_dtype("auto", CPU) == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_follows_the_cards_bfloat16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert choose_dtype("auto", torch.device("cuda")) == expected


def test_forcing_bfloat16_on_a_cpu_without_it_warns_that_it_will_be_slow(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(SlowPrecisionWarning, match="emulated.*AVX512-BF16"):
        assert choose_dtype(torch.bfloat16, CPU) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_dtype(torch.bfloat16, CPU) == torch.bfloat16  # native: no warning
        assert choose_dtype(torch.float32, CPU) == torch.float32


def test_the_feature_test_agrees_with_the_cpu_flags():
    flags = devices._cpu_flags()
    if flags:  # Linux: /proc/cpuinfo
        assert devices.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def test_machine_info_names_the_cpu_and_its_bfloat16_support():
    info = machine_info()
    assert info["cpu"] and isinstance(info["cpu_native_bf16"], bool) and info["torch_threads"] >= 1


def test_quiet_loading_is_scoped_and_respects_the_users_settings():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
        with quiet_loading():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled()  # restored
        hf_logging.disable_progress_bar()  # the user turned bars off: they stay off
        with quiet_loading():
            assert not hf_logging.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(logging.INFO)  # the user asked for verbose loading: bars stay
        with quiet_loading():
            assert hf_logging.is_progress_bar_enabled()
        with pytest.raises(RuntimeError), quiet_loading():  # restored on errors too
            hf_logging.set_verbosity_warning()
            raise RuntimeError
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def test_loading_a_model_folder_prints_no_progress_bar(tmp_path, capfd):
    from routehead_rag.model.backbone import load_backbone
    from tests.tiny_models import tiny_causal_lm, tiny_tokenizer

    tiny_causal_lm("llama").save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    capfd.readouterr()
    load_backbone(str(tmp_path), dtype="float32")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
