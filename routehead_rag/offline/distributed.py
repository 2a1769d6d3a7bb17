"""Per-query extraction spread over a Ray cluster (``routehead-rag fit --ray`` and ``eval --ray``).

Each Ray actor loads the backbone once and scores the queries it is sent; the extractions come
back to the driver, which writes them to its cache as they arrive (the same files, keyed the same
way, as a single-machine run). So the cluster needs no shared storage, a run resumes from the
cache with or without Ray, and a killed driver loses nothing it had received. Ray restarts dead
actors and retries their tasks (``max_restarts`` / ``max_task_retries``); the head search and the
training stay on the driver (they take seconds). Scheduling is Ray's.

To use a real cluster: start it (``ray start --head`` on one machine, ``ray start --address ...``
on the others, each with routehead-rag and the model installed, or the model folder on a path every
node sees), then ``routehead-rag fit ... --ray auto`` on a node of the cluster (or ``--ray
ray://HEAD:10001`` from outside it). Without an address a local cluster is started.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..extras import require
from .extraction import PendingQuery


class _Worker:
    """A Ray actor holding one backbone and scorer (the class is wrapped with ``ray.remote`` lazily)."""

    def __init__(self, model: str, dtype: str, device: str | None, threads: int):
        from ..model.backbone import load_backbone

        torch.set_num_threads(threads)
        self.backbone = load_backbone(model, dtype=dtype, device=device)
        self.scorers: dict[str, Any] = {}

    def fingerprint(self) -> dict[str, Any]:
        return {**self.backbone.fingerprint(), "dtype": str(self.backbone.dtype)}

    def extract(self, scoring_json: str, qid: str, query: str, passages: list[str]):
        from ..engine.scorer import AttentionScorer, ScoringConfig

        if scoring_json not in self.scorers:
            self.scorers[scoring_json] = AttentionScorer(self.backbone, ScoringConfig.model_validate_json(scoring_json))
        scores = self.scorers[scoring_json].head_scores(query, passages, heads=None)
        content_free = scores.content_free if scores.content_free is not None else torch.zeros_like(scores.real)
        return qid, scores.real, content_free


def check_ray_arguments(workers: int | None) -> None:
    """``--ray`` needs the 'ray' extra, and at least one worker."""
    from ..extras import ensure

    ensure("ray", "--ray")
    if workers is not None and workers < 1:
        raise ValueError(f"--ray-workers must be at least 1, got {workers}")


class RayExtractor:
    """Computes pending extractions on Ray actors; pass it to :func:`routehead_rag.offline.extraction.extract`.

    Args:
        model: what each worker loads: a model name or folder every node can reach (not an object).
        dtype: the dtype the driver's backbone has (workers must compute what the driver would).
        address: ``None`` (start a local cluster), ``"auto"`` (the running one) or a Ray address.
        workers: actors to start (default: the cluster's CPUs // ``threads``).
        threads: torch threads per actor (the CPUs each reserves).
        expected_fingerprint: the driver's backbone fingerprint and dtype; a worker that loads
            anything else is an error (a node with another model under the same name).
    """

    def __init__(self, model: str, dtype: str, *, address: str | None = None, workers: int | None = None,
                 threads: int = 1, device: str | None = None, expected_fingerprint: dict | None = None):
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError("with Ray, model must be a name or folder every worker can load, not a model object")
        self.ray = require("ray", "ray")
        self.model, self.dtype, self.device = os.fspath(model), dtype, device
        self.threads = threads
        self.address, self.workers = address, workers
        self.expected = expected_fingerprint
        self._actors: list | None = None

    @classmethod
    def for_backbone(cls, model, backbone, *, address: str = "local", workers: int | None = None) -> RayExtractor:
        """Workers that load ``model`` as the driver's ``backbone`` (dtype and fingerprint checked);
        ``address`` ``"local"`` starts a cluster here, ``"auto"`` joins the running one."""
        return cls(model, str(backbone.dtype).removeprefix("torch."), address=None if address == "local" else address,
                   workers=workers, expected_fingerprint={**backbone.fingerprint(), "dtype": str(backbone.dtype)})

    def _start(self) -> list:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
        count = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // self.threads)
        actor = ray.remote(num_cpus=self.threads, max_restarts=-1, max_task_retries=-1)(_Worker)
        actors = [actor.remote(self.model, self.dtype, self.device, self.threads) for _ in range(count)]
        if self.expected is not None:
            for found in ray.get([a.fingerprint.remote() for a in actors]):
                if found != self.expected:
                    for started in actors:
                        ray.kill(started)
                    raise RuntimeError(
                        f"a Ray worker loaded {self.model!r} as {found}, the driver has {self.expected}: every node "
                        "must load the same model (install the same package, or point --model at a shared folder)"
                    )
        return actors

    def run(self, scorer, pending: Iterable[PendingQuery]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield ``(qid, real, content_free)`` as workers finish (any order); at most 2 tasks queued per actor,
        so ``pending`` is read as a stream (only the queued queries' texts are held).

        ``scorer`` is the driver's: its settings go to the workers (the cache key is the driver's)."""
        queue = iter(pending)
        item = next(queue, None)
        if item is None:
            return
        scoring_json = scorer.config.model_dump_json()
        ray = self.ray
        if self._actors is None:
            self._actors = self._start()
        running: dict[Any, Any] = {}
        free = [a for a in self._actors for _ in range(2)]
        while item is not None or running:
            while item is not None and free:
                actor = free.pop()
                running[actor.extract.remote(scoring_json, item.qid, item.query, item.passages)] = actor
                item = next(queue, None)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                free.append(running.pop(ref))
                yield ray.get(ref)

    def shutdown(self) -> None:
        if self._actors is not None:
            for actor in self._actors:
                self.ray.kill(actor)
            self._actors = None
