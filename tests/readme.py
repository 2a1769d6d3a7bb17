"""The README's examples as data, for the tests that run them: Python blocks and ``routehead-rag`` command lines."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def sections() -> dict[str, str]:
    """``{"## heading": body}`` of every level-2 section (subsections included in their parent)."""
    parts = re.split(r"^## (.+)$", README, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def python_blocks() -> list[tuple[str, str]]:
    """``(where, code)`` of every ```python block, in README order."""
    blocks = []
    for title, body in sections().items():
        for number, code in enumerate(re.findall(r"```python\n(.*?)```", body, re.S), start=1):
            blocks.append((f"{title} #{number}", code))
    return blocks


def cli_lines() -> list[list[str]]:
    """Every ``routehead-rag ...`` invocation of every ```bash block, as argv after the program name.

    A line may chain commands with ``&&`` (the Quickstart); comments are dropped as the shell would.
    """
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if words and words[0] == "routehead-rag":
                    lines.append(words[1:])
    return lines
