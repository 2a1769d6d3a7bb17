"""The README and docs/ point only at what a reader can open: every link and every repository path they name
resolves in the checkout, every #anchor is a heading, and the architecture page names every module."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.readme import documents

ROOT = Path(__file__).resolve().parents[2]
PAGES = documents()  # {"README.md": text, "docs/...md": text}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# a path in backticks that starts at a top-level folder of the checkout: `benchmarks/results/x.md`
TOP = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ("build", "dist"))
CODE_PATH = re.compile(r"`((?:" + "|".join(map(re.escape, [*TOP, ".ci"])) + r")/[\w./-]*)`")
EXTERNAL_OK = re.compile(r"^https://(download\.pytorch\.org|github\.com|huggingface\.co|pypi\.org)/")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(text: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, re.M)}


def prose_of(text: str) -> str:
    """The text outside code blocks (a ``[x](y)`` inside Python is not a link)."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def targets() -> list[tuple[str, str]]:
    return [(page, target) for page, text in PAGES.items() for target in LINK.findall(prose_of(text))]


def test_there_are_docs_and_links_to_check():
    assert {"README.md", "docs/how-it-works.md", "docs/architecture.md", "docs/benchmarks.md",
            "docs/command-line.md"} <= set(PAGES)
    assert len(targets()) > 20


@pytest.mark.parametrize(("page", "target"), targets(), ids=[f"{p}->{t}" for p, t in targets()])
def test_every_link_opens(page, target):
    if re.match(r"^[a-z]+:", target):
        assert EXTERNAL_OK.match(target), f"{page}: {target} is not a link a reader can open offline from a clone"
        return
    path_part, _, anchor = target.partition("#")
    base = ROOT / page
    resolved = (base.parent / path_part).resolve() if path_part else base
    assert resolved.is_relative_to(ROOT), f"{page}: {target} points outside the checkout"
    assert resolved.exists(), f"{page}: {target} does not exist"
    if anchor:
        assert resolved.suffix == ".md", f"{page}: {target} has an anchor into a non-markdown file"
        assert anchor in anchors(resolved.read_text(encoding="utf-8")), f"{page}: no heading #{anchor} in {resolved.name}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_repository_path_named_in_backticks_exists(page):
    named = {p.rstrip(".,") for p in CODE_PATH.findall(PAGES[page]) if not re.search(r"[*<>{}]", p)}
    base = ROOT / page
    missing = sorted(p for p in named if not (ROOT / p).exists() and not (base.parent / p).exists())
    assert missing == [], f"{page} names paths that do not exist: {missing}"


def test_the_architecture_page_names_every_module():
    page = PAGES["docs/architecture.md"]
    modules = sorted({p.name for p in (ROOT / "routehead_rag").rglob("*.py") if p.name != "__init__.py"})
    assert [m for m in modules if m not in page] == []
    assert "routehead_rag.recipe.final_scores" in page  # where the walk ends: the one scoring function


def test_the_readme_serves_the_five_minute_path_first():
    """Quickstart, then the two frameworks, before any research detail; the numbers' placeholder is in one place."""
    titles = re.findall(r"^## (.+)$", PAGES["README.md"], re.M)
    assert titles[:4] == ["Quickstart", "Haystack", "LlamaIndex", "Results"], titles
    assert "English" in PAGES["README.md"].split("## Quickstart")[0]  # the language, in the pitch
    assert sum(text.count("TODO(numbers)") for text in PAGES.values()) <= 1
