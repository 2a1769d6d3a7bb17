"""The README's Haystack and LlamaIndex examples run as written (offline, embedded default)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def python_block(section: str) -> str:
    """The first ```python block under the ``## section`` heading."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match, f"README section {section!r} has no python example"
    return match.group(1)


@pytest.mark.parametrize("section", ["Haystack", "LlamaIndex"])
def test_readme_example_runs_and_answers(section, capsys):
    exec(compile(python_block(section), f"README.md ({section})", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert printed.strip(), "the example printed no answer"
