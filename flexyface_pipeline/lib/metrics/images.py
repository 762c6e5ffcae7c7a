"""Scoring image files: read, decode and preprocess in worker threads ahead of the model.

Worker threads read each file, hash its bytes (SHA-256, so callers can tell later whether a
file changed), decode it and run the scorer's ``prepare`` on it; the calling thread stacks the
prepared tensors into batches and runs the model. Workers run torch with one intra-op thread
each, so preprocessing does not oversubscribe the cores the model uses.

Batches default to a size that fits the device (``device_batch_size``). On a CUDA
out-of-memory error the batch is halved and retried (and stays halved); the scores do not
depend on the batch size beyond floating-point noise. Each finished batch logs a progress line,
e.g. ``clip_score: scored 64/200 images (32 %), 12.5 images/s, ETA 11 s``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from flexyface_pipeline.lib.metrics.base import ImageEmbedder, Scorer, check_prompts
from flexyface_pipeline.lib.models import common
from flexyface_pipeline.lib.models.common import Runtime
from flexyface_pipeline.lib.progress import ProgressClock

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 16  # larger batches gain nothing on a CPU
MAX_CUDA_BATCH_SIZE = 256
MAX_WORKERS = 16

Prepare = Callable[[PIL.Image.Image], torch.Tensor]


def load_rgb(path: Path) -> PIL.Image.Image:
    """Decode an image file fully, as RGB."""
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_workers() -> int:
    """Preprocessing threads: one per CPU core available to this process, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def device_batch_size(runtime: Runtime, bytes_per_image: int) -> int:
    """A scoring batch size for ``runtime``: 16 on a CPU; on a CUDA device as many images as fit
    in half of its free memory at ``bytes_per_image``, between 1 and 256."""
    return common.device_batch_size(runtime, bytes_per_image, cpu=CPU_BATCH_SIZE, most=MAX_CUDA_BATCH_SIZE)


def _read_prepared(path: Path, prepare: Prepare) -> tuple[torch.Tensor, str]:
    """(prepared tensor, SHA-256 of the bytes it was decoded from) for one file."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with PIL.Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    return prepare(rgb), digest


def _one_thread() -> None:
    torch.set_num_threads(1)


def _prepared(paths: Sequence[Path], prepare: Prepare, workers: int, ahead: int) -> Iterator[tuple[torch.Tensor, str]]:
    """Prepared images in order, made by ``workers`` threads at most ``ahead`` images in advance."""
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare", initializer=_one_thread) as pool:
            pending: deque[Future[tuple[torch.Tensor, str]]] = deque()
            upcoming = iter(paths)
            try:
                for path in upcoming:
                    pending.append(pool.submit(_read_prepared, path, prepare))
                    if len(pending) >= ahead:
                        break
                while pending:
                    item = pending.popleft().result()
                    next_path = next(upcoming, None)
                    if next_path is not None:
                        pending.append(pool.submit(_read_prepared, next_path, prepare))
                    yield item
            finally:
                for future in pending:
                    future.cancel()
    finally:
        # torch.set_num_threads in the workers also changed the default for new threads.
        torch.set_num_threads(threads)


def _check_paths(paths: Sequence[Path]) -> list[Path]:
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"image file not found: {missing[0]}{more}")
    return paths


def _check_sizes(batch_size: int | None, workers: int | None) -> None:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def run_batches(
    paths: Sequence[Path],
    prepare: Prepare,
    step: Callable[[torch.Tensor, int], None],
    *,
    batch_size: int,
    workers: int,
    label: str,
    log: logging.Logger,
    device: torch.device | None = None,
    verb: str = "scored",
) -> list[str]:
    """Prepare ``paths`` in worker threads and call ``step(pixels, start)`` for consecutive
    batches (``pixels`` holds images ``start .. start + len(pixels)``). Returns the SHA-256 of
    each file's bytes, in order. A CUDA out-of-memory error in ``step`` halves the batch size
    (and hands ``device``'s cached memory back before the retry). After each batch, logs
    ``<label>: <verb> done/total images (%), images/s, ETA``."""
    digests: list[str] = []
    if not paths:
        return digests
    clock = ProgressClock(len(paths))
    items = _prepared(paths, prepare, workers, ahead=max(2 * batch_size, 2 * workers))
    size = batch_size
    start = 0
    buffer: list[torch.Tensor] = []
    try:
        while start < len(paths):
            while len(buffer) < size and start + len(buffer) < len(paths):
                pixels, digest = next(items)
                buffer.append(pixels)
                digests.append(digest)
            batch = torch.stack(buffer[:size])
            fits, _ = common.fit_batch(lambda: step(batch, start), len(batch))
            if not fits:
                # Freed after the handler: the traceback held the failed call's tensors until now.
                del batch
                size = max(1, size // 2)
                common.free_memory(device)
                log.warning("%s: CUDA out of memory; retrying with batch size %d", label, size)
                continue
            done = len(batch)
            buffer = buffer[done:]
            start += done
            log.info("%s: %s", label, clock.advance(done).line(verb))
    finally:
        items.close()
    return digests


def score_paths(
    scorer: Scorer,
    paths: Sequence[Path],
    prompts: Sequence[str],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    log: logging.Logger | None = None,
) -> np.ndarray:
    """Score ``paths[i]`` against ``prompts[i]``; float64, in the order of ``paths``.

    ``batch_size``/``workers`` default to ``device_batch_size`` and ``default_workers``.
    """
    log = log or logger
    _check_sizes(batch_size, workers)
    if len(paths) != len(prompts):
        raise ValueError(f"got {len(paths)} image paths but {len(prompts)} prompts; pass one prompt per image")
    check_prompts(prompts)
    paths = _check_paths(paths)
    batch_size = batch_size or device_batch_size(scorer.runtime, scorer.activation_bytes_per_image)
    prompts = list(prompts)
    scores = np.empty(len(paths), dtype=np.float64)

    def step(pixels: torch.Tensor, start: int) -> None:
        scores[start : start + len(pixels)] = scorer.score_prepared(pixels, prompts[start : start + len(pixels)])

    run_batches(paths, scorer.prepare, step, batch_size=batch_size, workers=workers or default_workers(),
                label=scorer.metric, log=log, device=scorer.runtime.device)
    return scores


def embed_paths(
    embedder: ImageEmbedder,
    paths: Sequence[Path],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    log: logging.Logger | None = None,
) -> tuple[np.ndarray, list[str]]:
    """L2-normalised image embeddings of ``paths`` (float32, one row per file) and the SHA-256
    of each file's bytes, as read for the embedding."""
    log = log or logger
    _check_sizes(batch_size, workers)
    paths = _check_paths(paths)
    if batch_size is None:
        batch_size = device_batch_size(embedder.runtime, embedder.activation_bytes_per_image)  # type: ignore[attr-defined]
    parts: list[np.ndarray] = []

    def step(pixels: torch.Tensor, start: int) -> None:
        parts.append(embedder.embed_prepared(pixels).numpy())

    digests = run_batches(paths, embedder.prepare, step, batch_size=batch_size,
                          workers=workers or default_workers(), label=getattr(embedder, "metric", "embedding"),
                          log=log, device=embedder.runtime.device, verb="embedded")  # type: ignore[attr-defined]
    if not parts:
        return np.empty((0, 0), dtype=np.float32), digests
    return np.concatenate(parts).astype(np.float32, copy=False), digests
