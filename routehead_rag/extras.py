"""Optional dependencies: ranking needs none of them; evaluation and fitting need the ``fit`` extra.

A missing one is a :class:`MissingExtraError` whose one-line message names the install command.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

EXTRAS: dict[str, dict[str, str]] = {
    # extra -> {import name: what needs it}
    "fit": {"bm25s": "BM25 first-stage retrieval", "ir_measures": "evaluation metrics", "matplotlib": "fit plots"},
    "peft": {"peft": "PEFT adapters"},
    "ray": {"ray": "distributed extraction (--ray)"},
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message says which extra to install."""


def install_hint(extra: str) -> str:
    return f"pip install 'routehead-rag[{extra}]' (from a checkout: pip install -e '.[{extra}]')"


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` from the optional ``extra``, or raise :class:`MissingExtraError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != module.split(".")[0]:
            raise  # something else is missing inside it: not ours to explain
        purpose = EXTRAS.get(extra, {}).get(module.split(".")[0], module)
        raise MissingExtraError(f"{purpose} needs {module!r} from the {extra!r} extra: {install_hint(extra)}") from None


def ensure(extra: str, command: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is installed (cheap: no import)."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{command} needs the {extra!r} extra ({', '.join(missing)} missing): {install_hint(extra)}"
        )
