"""Every ``routehead-rag`` line of the README parses: each flag it uses exists and takes the value given.

Nothing is run here (no model loads); tests/integration/test_readme_examples.py runs them.
"""

import pytest
import typer

from routehead_rag.cli import app
from tests.readme import cli_lines

LINES = cli_lines()


def test_the_readme_has_command_lines():
    commands = {line[0] for line in LINES}
    assert {"rerank", "eval", "select-heads", "fit"} <= commands


@pytest.mark.parametrize("argv", LINES, ids=[" ".join(line)[:70] for line in LINES])
def test_every_readme_command_line_parses(argv):
    group = typer.main.get_command(app)
    context = group.make_context("routehead-rag", list(argv))
    command = group.get_command(context, argv[0])
    assert command is not None, f"no command {argv[0]!r}"
    command.make_context(argv[0], list(argv[1:]), parent=context)  # raises on an unknown flag or a bad value
