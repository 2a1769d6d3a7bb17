"""Our own model loads stay quiet: transformers' progress bars are hidden for their span, then restored."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' weight-loading progress bars for our own loads, then restore the owner's setting.

    Uses transformers' logging API, scoped: nothing changes for a user who turned the bars off
    already, and a user who set transformers' verbosity to INFO or DEBUG keeps seeing them.
    The GGUF de-quantizer uses plain ``tqdm``; its bar is silenced for the same span.
    """
    from transformers.utils import logging as hf_logging

    if hf_logging.get_verbosity() <= logging.INFO or not hf_logging.is_progress_bar_enabled():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if plain_tqdm is not None:
        gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        yield
    finally:
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
        hf_logging.enable_progress_bar()
