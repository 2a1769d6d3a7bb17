"""What the benchmark scripts share: where results go, the console, the machine block every result records,
the seed, and the grouped bar plot.

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


def grouped_bars(path: Path, groups: list[str], rows: list[str], value, ylabel: str, title: str,
                 figsize: tuple[float, float] = (7, 4), tick_fontsize: float | None = None, rotation: float = 0) -> None:
    """A bar per row within each group (``value(group, row)``), saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar([g + i * width for g in range(len(groups))], [value(group, row) for group in groups], width, label=row)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=tick_fontsize, rotation=rotation)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
