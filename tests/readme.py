"""The README's examples as data, for the tests and the CI script that run them.

* Installs: the Quickstart's ```bash block, and each section's own install block (a ```bash block with a
  ``pip install`` line), which runs in the Quickstart's environment after it. Each is run verbatim, in a
  fresh virtual environment of its own, by ``.ci/run`` (through ``.ci/readme_commands.py``).
* Python examples: every ```python block, run by ``.ci/run`` in the environment of its install (its
  section's, else the Quickstart's), so an example cannot lean on what only the test environment holds.
* Command lines: every ``routehead-rag ...`` invocation of the README's and ``docs/``'s ```bash blocks
  (parsed in tests/unit/test_readme_commands.py, run in tests/integration/test_readme_examples.py).

Standard library only: ``.ci/readme_commands.py`` imports it before any virtual environment exists.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
QUICKSTART = "Quickstart"
TESTS = 2  # the Quickstart's second block: the test environment's install and test command (CI runs it apart)
SHELL_PUNCTUATION = {">", ">>", "<", "|", "2>", "&>"}


@dataclass(frozen=True)
class Example:
    where: str  # "Haystack #1"
    install: str  # the name of the install it runs after (a section title)
    code: str


def sections(text: str = README) -> dict[str, str]:
    """``{"heading": body}`` of every level-2 section (subsections included in their parent)."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def block(section: str, number: int = 1) -> str:
    """The ``number``-th ```bash block of a README section, exactly as written."""
    return bash_blocks(sections()[section])[number - 1]


def installs() -> dict[str, list[str]]:
    """``{install name: [bash scripts, run in order in one fresh environment]}``: the Quickstart alone, then each
    section with an install block of its own, after the Quickstart."""
    found = {QUICKSTART: [block(QUICKSTART)]}
    for title, body in sections().items():
        if title == QUICKSTART:
            continue
        own = [b for b in bash_blocks(body) if re.search(r"^pip install ", b, re.M)]
        if own:
            found[title] = [block(QUICKSTART), own[0]]
    return found


def examples() -> list[Example]:
    """Every ```python block in README order, with the install whose environment it runs in."""
    found = []
    names = installs()
    for title, body in sections().items():
        for number, code in enumerate(re.findall(r"```python\n(.*?)```", body, re.S), start=1):
            found.append(Example(f"{title} #{number}", title if title in names else QUICKSTART, code))
    return found


def python_blocks() -> list[tuple[str, str]]:
    """``(where, code)`` of every ```python block, in README order."""
    return [(example.where, example.code) for example in examples()]


def documents() -> dict[str, str]:
    """The README and every page of ``docs/``: ``{path relative to the root: text}``."""
    pages = {"README.md": README}
    for path in sorted((ROOT / "docs").rglob("*.md")):
        pages[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    return pages


def cli_lines() -> list[list[str]]:
    """Every ``routehead-rag ...`` invocation of every ```bash block of the README and ``docs/``, as argv after the
    program name, in order (README first).

    A line may chain commands with ``&&``; comments are dropped and a redirection ends the argv, as the shell would.
    """
    lines = []
    for text in documents().values():
        for bash in bash_blocks(text):
            for line in bash.replace("\\\n", " ").splitlines():
                for command in line.split("&&"):
                    words = shlex.split(command, comments=True)
                    if words and words[0] == "routehead-rag":
                        cut = next((i for i, w in enumerate(words) if w in SHELL_PUNCTUATION), len(words))
                        lines.append(words[1:cut])
    return lines
