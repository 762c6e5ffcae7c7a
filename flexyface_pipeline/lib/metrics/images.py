"""Scoring image files: decode ahead of the model in worker threads, score in batches.

On a CUDA out-of-memory error the batch is halved and retried (and stays halved); the scores
do not depend on the batch size beyond floating-point noise.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from flexyface_pipeline.lib.metrics.base import Scorer, check_prompts

logger = logging.getLogger(__name__)


def load_rgb(path: Path) -> PIL.Image.Image:
    """Decode an image file fully, as RGB."""
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def _decoded(paths: Sequence[Path], workers: int, ahead: int) -> Iterator[PIL.Image.Image]:
    """Images in order, decoded by ``workers`` threads at most ``ahead`` images in advance."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[PIL.Image.Image]] = deque()
        upcoming = iter(paths)
        for path in upcoming:
            pending.append(pool.submit(load_rgb, path))
            if len(pending) >= ahead:
                break
        while pending:
            image = pending.popleft().result()
            next_path = next(upcoming, None)
            if next_path is not None:
                pending.append(pool.submit(load_rgb, next_path))
            yield image


def score_paths(
    scorer: Scorer,
    paths: Sequence[Path],
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    workers: int = 2,
    log: logging.Logger | None = None,
) -> np.ndarray:
    """Score ``paths[i]`` against ``prompts[i]``; float64, in the order of ``paths``."""
    log = log or logger
    paths = [Path(p) for p in paths]
    if len(paths) != len(prompts):
        raise ValueError(f"got {len(paths)} image paths but {len(prompts)} prompts; pass one prompt per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    check_prompts(prompts)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"image file not found: {missing[0]}{more}")

    scores = np.empty(len(paths), dtype=np.float64)
    images = _decoded(paths, workers, ahead=2 * batch_size)
    size = batch_size
    start = 0
    buffer: list[PIL.Image.Image] = []
    try:
        while start < len(paths):
            while len(buffer) < size and start + len(buffer) < len(paths):
                buffer.append(next(images))
            batch = buffer[:size]
            try:
                scores[start : start + len(batch)] = scorer.score(batch, prompts[start : start + len(batch)])
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                size = max(1, size // 2)
                torch.cuda.empty_cache()
                log.warning("%s: CUDA out of memory; retrying with batch size %d", scorer.metric, size)
                continue
            buffer = buffer[len(batch) :]
            start += len(batch)
    finally:
        images.close()
    return scores
