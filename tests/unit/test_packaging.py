"""The three distributions build, hold only their own files, and install beside other packages of their namespaces."""

from __future__ import annotations

import csv
import importlib
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {
    "routehead-rag": ROOT,
    "routehead-haystack": ROOT / "integrations" / "haystack",
    "llama-index-postprocessor-routehead": ROOT / "integrations" / "llama_index",
}


def pip(*args: str, cwd: Path | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, cwd=cwd,
                   capture_output=True, text=True)


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel`` one project into an empty folder (no network: build isolation off, no dependencies)."""
    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source))
    (wheel,) = out.glob("*.whl")
    return wheel


SKIP = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".venv", ".git")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """Each distribution built from a clean copy of its sources (a stale ``build/`` must not leak in)."""
    built = {}
    for name, source in DISTRIBUTIONS.items():
        copy = tmp_path_factory.mktemp(name) / "src"
        if source == ROOT:
            copy.mkdir()
            for part in ("pyproject.toml", "README.md", "LICENSE"):
                shutil.copy(source / part, copy / part)
            shutil.copytree(source / "routehead_rag", copy / "routehead_rag", ignore=SKIP)
        else:
            shutil.copytree(source, copy, ignore=SKIP)
        built[name] = build_wheel(copy, copy.parent / "wheel")
    return built


def files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return [n for n in archive.namelist() if ".dist-info/" not in n]


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_every_wheel_carries_the_licence_file_and_its_spdx_expression(wheels, name):
    """Apache-2.0, as each pyproject declares: the LICENSE file in the wheel (PEP 639's ``licenses/`` folder) and
    ``License-Expression`` in its metadata; one text for all three distributions."""
    with zipfile.ZipFile(wheels[name]) as archive:
        names = archive.namelist()
        (licence,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        text = archive.read(licence).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert text == (ROOT / "LICENSE").read_text(encoding="utf-8") == (DISTRIBUTIONS[name] / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()


def test_the_core_wheel_holds_the_engine_and_the_shipped_router_and_no_adapter(wheels):
    names = files(wheels["routehead-rag"])
    assert all(n.startswith("routehead_rag/") for n in names), [n for n in names if not n.startswith("routehead_rag/")]
    for part in ("config.json", "router.safetensors", "README.md"):
        assert f"routehead_rag/routers/smollm2-135m/{part}" in names
    from routehead_rag.router.artifact import SHIPPED_ROUTERS

    for part in ("adapter_config.json", "adapter_model.safetensors"):  # a query adapter ships when the fit kept one
        if (SHIPPED_ROUTERS / "smollm2-135m" / part).exists():
            assert f"routehead_rag/routers/smollm2-135m/{part}" in names
    required = " ".join(requirements(wheels["routehead-rag"]))
    assert "accelerate" in required  # transformers needs it to load the embedded GGUF
    for fit_only in ("bm25s", "ir-measures", "matplotlib", "haystack", "llama-index"):
        assert fit_only not in required, f"{fit_only} is a core dependency"


@pytest.mark.parametrize(
    ("name", "package", "namespaces", "framework"),
    [
        ("routehead-haystack", "haystack_integrations/components/rankers/routehead/",
         ["haystack_integrations/", "haystack_integrations/components/", "haystack_integrations/components/rankers/"],
         "haystack-ai<4,>=3.0"),
        ("llama-index-postprocessor-routehead", "llama_index/postprocessor/routehead/",
         ["llama_index/", "llama_index/postprocessor/"], "llama-index-core<0.15,>=0.13"),
    ],
)
def test_an_adapter_wheel_holds_only_its_package_and_pins_its_framework(wheels, name, package, namespaces, framework):
    names = files(wheels[name])
    assert names and all(n.startswith(package) for n in names), names
    assert not any(n == f"{ns}__init__.py" for ns in namespaces for n in names)  # namespaces stay shared
    assert set(requirements(wheels[name])) == {"routehead-rag<0.2,>=0.1", framework}


def foreign_wheel(tmp_path: Path, distribution: str, module: str) -> Path:
    """A minimal other distribution with a module in the same namespace (as any ``*-haystack`` one)."""
    project = tmp_path / distribution
    package = project.joinpath(*module.split("."))
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"NAME = {distribution!r}\n")
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{distribution}"
        version = "1.0"
        [tool.setuptools.packages.find]
        include = ["{module.split('.')[0]}*"]
        namespaces = true
    """))
    return build_wheel(project, tmp_path / f"{distribution}-wheel")


def test_adapters_install_beside_other_packages_of_their_namespaces_without_clobbering(wheels, tmp_path):
    others = {
        "acme-haystack": "haystack_integrations.components.rankers.acme",
        "llama-index-postprocessor-acme": "llama_index.postprocessor.acme",
    }
    target = tmp_path / "site"
    foreign = [foreign_wheel(tmp_path, d, m) for d, m in others.items()]
    ours = [wheels["routehead-haystack"], wheels["llama-index-postprocessor-routehead"]]
    pip("install", "--no-deps", "-q", "--target", str(target), *map(str, foreign + ours))
    owners: dict[str, str] = {}
    for record in target.glob("*.dist-info/RECORD"):
        for row in csv.reader(record.read_text().splitlines()):
            if row and ".dist-info/" not in row[0] and "__pycache__" not in row[0]:
                assert row[0] not in owners, f"{row[0]} is installed by {owners[row[0]]} and {record.parent.name}"
                owners[row[0]] = record.parent.name
    modules = [*others.values(), "haystack_integrations.components.rankers.routehead",
               "llama_index.postprocessor.routehead"]
    # Every module of the four resolves to its own file inside the target, ours next to the foreign ones
    # (-S: only the target and the standard library are on the path; find_spec runs no package code).
    code = "import importlib.util, sys; print([importlib.util.find_spec(m).origin for m in sys.argv[1:]])"
    done = subprocess.run([sys.executable, "-S", "-c", code, *modules], env={"PYTHONPATH": str(target)},
                          capture_output=True, text=True, check=True)
    origins = eval(done.stdout)
    assert all(origin and origin.startswith(str(target)) for origin in origins), origins


def test_the_installed_adapters_sit_beside_real_framework_packages():
    """In the test environment: transformers-haystack and llama-index-postprocessor-sbert-rerank beside ours."""
    pairs = [
        ("haystack_integrations.components.generators.transformers", "haystack_integrations.components.rankers.routehead"),
        ("llama_index.postprocessor.sbert_rerank", "llama_index.postprocessor.routehead"),
    ]
    for theirs, ours in pairs:
        assert importlib.import_module(theirs) and importlib.import_module(ours)
