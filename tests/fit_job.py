"""A fit on a tiny model, run as its own process by tests/unit/test_fit_faults.py (which kills it).

    python -m tests.fit_job LOG OUT CACHE STAGE_FILE [SLOW_STAGE]

Writes the stage it is in (``extract``, ``embed``, ``search + train``, ``write``) to STAGE_FILE as it
goes, so the test can kill it inside a chosen stage; with SLOW_STAGE given, that stage is slowed
down (sleeps in its progress reports or file writes) so that a kill lands inside it. The fit itself
is the library's, unchanged.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # the same arithmetic in every run, whatever the machine's load


def main(log: str, out: str, cache: str, stage_file: str, slow: str | None = None) -> None:
    from routehead_rag.engine.embedding import QueryEmbeddingConfig
    from routehead_rag.fit.pipeline import run_fit
    from routehead_rag.fit.search import SearchConfig
    from routehead_rag.fit.sources import read_query_log
    from routehead_rag.fit.training import TrainingConfig
    from routehead_rag.router import artifact
    from tests.tiny_models import tiny_backbone

    stage_path = Path(stage_file)

    def report(stage: str, done: int, total: int) -> None:
        stage_path.write_text(stage)
        if stage == slow:
            time.sleep(0.05)

    if slow == "write":
        real_chmod = artifact.os.chmod

        def slow_chmod(path, mode):  # inside save_artifact, between the temporary folder and its rename
            stage_path.write_text("write")
            time.sleep(0.3)
            real_chmod(path, mode)

        artifact.os.chmod = slow_chmod
    run_fit(
        tiny_backbone("llama"), [read_query_log(log)], out, query_embedding=QueryEmbeddingConfig(layer=0),
        search=SearchConfig(pool_size=8, max_heads=3), training=TrainingConfig(epochs=40, ks=(1, 2)),
        cache_dir=cache, progress=report, command="routehead-rag fit log.jsonl --out router",
    )
    stage_path.write_text("done")


if __name__ == "__main__":
    main(*sys.argv[1:6])
    os._exit(0)
