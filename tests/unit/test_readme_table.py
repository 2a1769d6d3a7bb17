"""The README's benchmark table is generated from the committed results, never retyped."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_matches_the_committed_results():
    module = _module()
    if not (module.RESULTS / "test_sets.json").is_file():
        pytest.fail("benchmarks/results/test_sets.json is missing: run python benchmarks/test_sets.py")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert module.render(readme, module.table()) == readme, "run python benchmarks/readme_table.py"


def test_render_needs_the_markers():
    with pytest.raises(ValueError, match="benchmark-table:start"):
        _module().render("no markers here", "table")
