"""Where a model runs and in which precision: parsing ``dtype``/``device`` once, and ``dtype="auto"``.

``dtype="auto"`` (the default for models we load) means bfloat16 where bfloat16 is fast and
float32 elsewhere, decided by feature detection, never by a machine or model name:

* CUDA: bfloat16 when the device supports it (``torch.cuda.is_bf16_supported``), else float32;
* CPU: bfloat16 only with native bfloat16 arithmetic (x86 AVX512-BF16 or AMX, Arm BF16);
  without it bfloat16 matmuls are emulated and one query can take many minutes, so float32;
* anything else (e.g. MPS): float32.

Forcing bfloat16 (or float16) on a CPU without native support still works, with a warning
that says it will be slow and why.  :func:`machine_info` is what benchmarks and ``eval``
record next to every timing.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES: tuple[str, ...] = ("auto", *DTYPES)
"""The dtype names accepted everywhere (``"torch.bfloat16"`` and any case are accepted too)."""


class SlowPrecisionWarning(RuntimeWarning):
    """A half-precision dtype was forced on a CPU that only emulates it (slow)."""


def parse_dtype(value: Any) -> torch.dtype | str:
    """``"auto"`` or a floating ``torch.dtype`` from what a user passes; the one dtype parser.

    Accepts ``None`` and ``"auto"`` (-> ``"auto"``), a floating ``torch.dtype``, or a name from
    :data:`DTYPE_NAMES`, optionally prefixed ``torch.``, in any case.

    Raises:
        ValueError / TypeError: naming the value and the accepted ones.
    """
    if value is None:
        return "auto"
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"dtype={value} is not supported; use one of {list(DTYPE_NAMES)} or a floating torch.dtype")
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in DTYPES:
            return DTYPES[key]
        raise ValueError(f"dtype={value!r} is not supported; use one of {list(DTYPE_NAMES)}")
    raise TypeError(f"dtype must be a string like 'bfloat16', a torch.dtype or None, got {type(value).__name__}: {value!r}")


def dtype_name(dtype: torch.dtype | str) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``; ``"auto"`` stays ``"auto"``."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def parse_device(value: Any) -> torch.device | None:
    """``None`` (choose at load time) or a ``torch.device``; the one device parser."""
    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', a torch.device or None, got {type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"device={value!r} is not a valid torch device ({err}); use e.g. 'cpu', 'cuda' or 'cuda:1'") from None


def default_device() -> torch.device:
    """``cuda`` when available (the current CUDA device, no index forced), else Apple's ``mps``, else ``cpu``
    (the order Haystack's and LlamaIndex's own rankers pick in)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, Arm
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _torch_says(*probes: str) -> bool:
    """Whether any of torch's own CPU feature tests (private, but what torch itself uses) says yes."""
    for probe in probes:
        check = getattr(torch.cpu, probe, None)
        if callable(check):
            try:
                if check():
                    return True
            except RuntimeError:
                pass
    return False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 / AMX on x86, BF16 on Arm)."""
    return _torch_says("_is_avx512_bf16_supported", "_is_amx_tile_supported") or bool(
        {"avx512_bf16", "amx_bf16", "bf16"} & _cpu_flags()
    )


def cpu_has_native_fp16() -> bool:
    """Whether this CPU computes float16 natively (AVX512-FP16 / AMX-FP16 on x86, FP16 on Arm)."""
    return _torch_says("_is_amx_fp16_supported") or bool({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"} & _cpu_flags())


def choose_dtype(requested: torch.dtype | str, device: torch.device) -> torch.dtype:
    """The dtype to load with on ``device``: resolves ``"auto"``, warns about emulated half precision."""
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32  # mps included: float32 is its safe default (bfloat16 support varies by macOS)
    assert isinstance(requested, torch.dtype)  # parse_dtype returns "auto" or a dtype
    if device.type == "cpu":
        native = {torch.bfloat16: cpu_has_native_bf16, torch.float16: cpu_has_native_fp16}.get(requested)
        if native is not None and not native():
            warnings.warn(
                f"dtype={dtype_name(requested)} on this CPU ({cpu_model()}) is emulated, not native: it has no "
                f"{'AVX512-BF16/AMX' if requested is torch.bfloat16 else 'AVX512-FP16/AMX-FP16'} instructions, so "
                "every matmul is converted in software and one query can take many minutes. Use dtype='auto' "
                "(float32 here) unless you need this precision.",
                SlowPrecisionWarning,
                stacklevel=3,
            )
    return requested


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a timing depends on: CPU model, native bfloat16 support, threads, torch, and the GPU if any."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    return info
