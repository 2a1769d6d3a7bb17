"""Where routehead-rag keeps its files and finds labelled data, and how paths are written into outputs.

* cache: ``$ROUTEHEAD_CACHE``, else the platform's user cache dir (GGUF conversions,
  per-query extractions);
* data: ``$ROUTEHEAD_DATA``, else, in a source checkout, the checkout's ``../shared/data``
  (never anything relative to the current directory);
* outputs (artifacts, benchmark JSON) record paths relative to the data dir or the
  repository, never this machine's absolute paths (:func:`portable_path`).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "ROUTEHEAD_CACHE"
DATA_ENV_VAR = "ROUTEHEAD_DATA"
PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parent  # the repository root when the package runs from a source checkout


def default_cache_dir() -> Path:
    """``$ROUTEHEAD_CACHE`` if set, else the platform's user cache dir for ``routehead-rag``."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("routehead-rag"))


def checkout_root() -> Path | None:
    """The repository root when routehead-rag runs from a source checkout (editable install), else ``None``."""
    return _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "routehead_rag").is_dir() else None


def default_data_dir() -> Path | None:
    """``$ROUTEHEAD_DATA`` if set, else the checkout's ``../shared/data``; ``None`` when neither applies.

    Read at each call, so setting the variable after import takes effect.
    """
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    root = checkout_root()
    return (root.parent / "shared" / "data").resolve() if root is not None else None


def data_dir_description() -> str:
    """Where set names are looked up, for error messages."""
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        return f"${DATA_ENV_VAR} ({Path(env).expanduser()})"
    folder = default_data_dir()
    if folder is None:
        return f"${DATA_ENV_VAR}, which is not set"
    return f"${DATA_ENV_VAR} (not set, so the checkout's ../shared/data: {folder})"


def portable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as an output should record it: relative to the data dir or the repository, else its name.

    ``$ROUTEHEAD_DATA/trec-dl-2019`` -> ``"trec-dl-2019"``; a file of the checkout -> its
    path inside the repository; anything else -> its last component, never an absolute path.
    """
    resolved = Path(path).expanduser().resolve()
    for base in (default_data_dir(), checkout_root()):
        if base is not None:
            try:
                return resolved.relative_to(base.resolve()).as_posix()
            except ValueError:
                continue
    return resolved.name
