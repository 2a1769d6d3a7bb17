"""The house's rules, checked: no import cycle, small modules, inference never imports the training side,
the core never imports a framework, and committed outputs carry no machine paths."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "routehead_rag"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every routehead_rag module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for candidate in (target, *(f"{target}.{alias.name}" for alias in node.names)):
                if candidate in known and candidate != name and known[candidate].name != "__init__.py":
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known and alias.name != name}
    return found


def test_no_import_cycle():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_module_is_over_about_400_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 410} == {}


def test_ranking_imports_neither_the_training_side_nor_a_framework():
    code = (
        "import sys\nfrom routehead_rag import RouteHeadReranker\nfrom tests.tiny_models import tiny_causal_lm, tiny_tokenizer\n"
        "RouteHeadReranker(model=tiny_causal_lm(), tokenizer=tiny_tokenizer(), heads='all').rank('sea', ['the moon'])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('routehead_rag.fit', 'routehead_rag.eval', 'haystack', "
        "'llama_index', 'bm25s', 'ir_measures', 'matplotlib'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|Users|opt|mnt|var/folders)/")


def test_committed_outputs_carry_no_machine_paths():
    """Benchmark results, the shipped router and the notebooks' outputs record relative paths only."""
    files = [*ROOT.glob("benchmarks/results/*.json"), *ROOT.glob("benchmarks/results/*.md"),
             *ROOT.glob("routehead_rag/routers/*/*.json"), *ROOT.glob("routehead_rag/routers/*/*.md"),
             *ROOT.glob("notebooks/*.ipynb")]
    offenders = {f.relative_to(ROOT).as_posix(): MACHINE_PATH.findall(f.read_text(encoding="utf-8"))[:3]
                 for f in files if MACHINE_PATH.search(f.read_text(encoding="utf-8"))}
    assert offenders == {}


def test_a_fit_records_its_sources_relative_to_the_data_dir(tmp_path, monkeypatch):
    from routehead_rag.fit.sources import read_query_log
    from routehead_rag.paths import portable_path

    monkeypatch.setenv("ROUTEHEAD_DATA", str(tmp_path))
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "clicks.jsonl"
    log.write_text('{"query": "q", "candidates": [{"id": "a", "text": "x"}]}\n')
    assert read_query_log(log).origin == "logs/clicks.jsonl"
    assert portable_path(ROOT / "routehead_rag" / "routers") == "routehead_rag/routers"
    assert portable_path("/somewhere/else/entirely/set") == "set"
