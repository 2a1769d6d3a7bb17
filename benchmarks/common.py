"""What the benchmark scripts share: where results go, the console, the machine block every result records,
and the seed.

Each script runs as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and they
``import common``. The scoring itself is the library's: every ranking a script reports comes from
:class:`~routehead_rag.RouteHeadReranker` (through :mod:`routehead_rag.eval.harness` where a set is ranked),
the same code ``routehead-rag eval`` and users run.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from rich.console import Console

from routehead_rag.model.devices import machine_info

console = Console(stderr=True)
RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """The machine block of every result: CPU model and its native bfloat16 support, threads, versions."""
    return {"platform": platform.platform(), **machine_info()}


def machine_line(result: dict) -> str:
    """One markdown line naming the machine a result was measured on."""
    m = result.get("machine", {})
    bf16 = "native bfloat16" if m.get("cpu_native_bf16") else "no native bfloat16 (emulated)"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"Machine: {m.get('cpu', 'unknown CPU')} ({bf16}), {m.get('torch_threads', '?')} torch threads{gpu}."


def seeded() -> None:
    torch.manual_seed(0)
