"""Generate a sweep's images, resumable.

Each PNG carries its own row (prompt, steps, guidance, seed, size, engine, model, elapsed_ms) in a
``flexyface`` text chunk and is written atomically, so after a crash every file that exists is
complete. On a re-run an image is kept only if it decodes fully and its chunk matches its row;
everything else is generated again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from PIL import Image, PngImagePlugin

from flexyface_pipeline.lib.atomic import atomic_path
from flexyface_pipeline.lib.engines.base import Engine, ImageRequest
from flexyface_pipeline.lib.models.common import ModelIdentity, fit_batch, free_memory
from flexyface_pipeline.lib.store import SweepStore

logger = logging.getLogger(__name__)

PNG_KEY = "flexyface"
# Fields of a row that must match the PNG's chunk for the file to count as that row's image.
IDENTITY_FIELDS = ("image_id", "prompt", "steps", "guidance", "seed", "width", "height", "engine")

IMAGE_COLUMNS = [
    "image_id",
    "image_path",
    "elapsed_ms",
    "batch_size",
    "engine_model",
    "engine_model_revision",
]


def _row_identity(row: dict) -> dict:
    out = {k: row[k] for k in IDENTITY_FIELDS}
    out["steps"] = int(out["steps"])
    out["seed"] = int(out["seed"])
    out["width"] = int(out["width"])
    out["height"] = int(out["height"])
    out["guidance"] = round(float(out["guidance"]), 6)
    return out


def read_png_record(path: Path) -> dict | None:
    """The row stored in a PNG, or None if the file is missing, truncated or not ours."""
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a truncated file raises here
            text = im.text.get(PNG_KEY) if hasattr(im, "text") else None
    except (OSError, SyntaxError, ValueError):
        return None
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def verify_image(path: Path, row: dict) -> dict | None:
    """Return the stored record if ``path`` is a complete image of exactly this row."""
    record = read_png_record(path)
    if record is None:
        return None
    stored = {k: record.get(k) for k in IDENTITY_FIELDS}
    if stored.get("guidance") is not None:
        stored["guidance"] = round(float(stored["guidance"]), 6)
    return record if stored == _row_identity(row) else None


def write_png(path: Path, image: Image.Image, record: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def _shape(engine: Engine, batch: list[ImageRequest]) -> tuple:
    """What a pipeline call's tensors depend on: the batch's size and key, steps aside."""
    return len(batch), engine.batch_key(replace(batch[0], steps=1))


@dataclass
class GenerationReport:
    table: pd.DataFrame
    generated: int
    reused: int
    seconds: float
    warm_up_seconds: float = 0.0  # untimed warm-up calls (CUDA, compiled UNet), within ``seconds``


def generate_sweep(
    parameters: pd.DataFrame,
    store: SweepStore,
    engine_factory: Callable[[], Engine],
    *,
    batch_size: int | None,
    expected_model: ModelIdentity | None = None,
    log: logging.Logger | None = None,
    after_batch: Callable[[int], None] | None = None,
) -> GenerationReport:
    """Generate every missing image of ``parameters`` (one sweep) and return the images table.

    An existing image is kept if it decodes completely, its stored row matches, and, given
    ``expected_model``, it was made by those weights (model id and revision); every other image
    is generated. ``engine_factory`` is called only if at least one image is missing. ``batch_size`` is the
    number of images per pipeline call; None lets the engine size batches to the device
    (``Engine.batch_size_for``). A CUDA out-of-memory error halves the batch size for the rest
    of the sweep and retries.

    A batch's PNGs are encoded and written by background threads while the next batch generates;
    a batch counts as finished (progress log, ``after_batch``) once its files are on disk.
    ``elapsed_ms`` of an image is the wall time of the pipeline call that produced its batch
    divided by the batch's size: text encoding, denoising and VAE decoding, not PNG encoding.
    Where the engine asks for it (``Engine.needs_warm_up``: CUDA, or a compiled UNet), the first
    batch of each shape (size, width, height, guidance mode) is preceded by an untimed call of
    at most two steps, so one-time costs (kernel loading and selection, compilation) stay out
    of ``elapsed_ms``.
    """
    log = log or logger
    start = time.perf_counter()
    rows = parameters.to_dict("records")
    done: dict[str, dict] = {}
    todo: list[dict] = []
    warm_up_seconds = 0.0
    other_model: dict[tuple[str, str], int] = {}  # (model, revision) of images made by other weights
    for row in rows:
        path = store.image_path(row["sweep"], row["image_id"])
        record = verify_image(path, row) if path.exists() else None
        if record is not None and expected_model is not None:
            made_by = (str(record.get("engine_model", "")), str(record.get("engine_model_revision", "")))
            if made_by != (expected_model.model_id, expected_model.revision):
                other_model[made_by] = other_model.get(made_by, 0) + 1
                record = None
        elif record is None and path.exists():
            log.warning("image %s does not match its row or is incomplete: generating it again", path.name)
        if record is not None:
            done[row["image_id"]] = record
        else:
            todo.append(row)
    if other_model:
        log.warning("%d images were made by other weights (%s), not by %s (%s): generating them again",
                    sum(other_model.values()), "; ".join(f"{m} {r}" for m, r in sorted(other_model)),
                    expected_model.model_id, expected_model.revision)
    if done:
        log.info("%d of %d images already complete and verified; %d to generate", len(done), len(rows), len(todo))

    if todo:
        engine = engine_factory()
        rows_by_id = {r["image_id"]: r for r in todo}
        requests = [
            ImageRequest(image_id=r["image_id"], prompt=r["prompt"], steps=int(r["steps"]),
                         guidance=float(r["guidance"]), seed=int(r["seed"]), width=int(r["width"]),
                         height=int(r["height"]))
            for r in todo
        ]
        size_of = batch_size or (lambda r: engine.batch_size_for(r.width, r.height))
        queue = deque(engine.plan_batches(requests, size_of))
        identity = engine.identity
        limit: int | None = None  # largest batch that fits, once an out-of-memory error said so
        warm_up = bool(getattr(engine, "needs_warm_up", False))
        warmed: set[tuple] = set()
        finished = 0
        writing: tuple[list[Future], list[ImageRequest], float] | None = None

        def settle(written: tuple[list[Future], list[ImageRequest], float]) -> None:
            nonlocal finished
            futures, batch, per_image_ms = written
            for future in futures:
                future.result()
            finished += len(batch)
            log.info("generated %d/%d images (steps=%d, batch of %d, %.0f ms/image)",
                     finished, len(todo), batch[0].steps, len(batch), per_image_ms)
            if after_batch is not None:
                after_batch(finished)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="png") as writer:
            while queue:
                batch = queue.popleft()
                if limit is not None and len(batch) > limit:
                    queue.extendleft(reversed([batch[i : i + limit] for i in range(0, len(batch), limit)]))
                    continue
                fits, shape = True, _shape(engine, batch) if warm_up else None
                if shape is not None and shape not in warmed:
                    t0 = time.perf_counter()
                    fits, _ = fit_batch(lambda: engine.warm_up(batch), len(batch))
                    took = time.perf_counter() - t0
                    warm_up_seconds += took
                    if fits:
                        warmed.add(shape)
                        log.info("warm-up call for batches of %d at %dx%d took %.1f s (not in elapsed_ms)",
                                 len(batch), batch[0].width, batch[0].height, took)
                if fits:
                    t0 = time.perf_counter()
                    fits, images = fit_batch(lambda: engine.generate(batch), len(batch))
                if not fits:
                    limit = len(batch) // 2
                    queue.appendleft(batch)
                    free_memory(engine.runtime.device)
                    log.warning("CUDA out of memory generating %d images; retrying with batches of %d",
                                len(batch), limit)
                    continue
                per_image_ms = (time.perf_counter() - t0) * 1000.0 / len(batch)
                futures = []
                for req, image in zip(batch, images, strict=True):
                    row = rows_by_id[req.image_id]
                    record = _row_identity(row) | {
                        "elapsed_ms": round(per_image_ms, 3),
                        "batch_size": len(batch),
                        "engine_model": identity.model_id,
                        "engine_model_revision": identity.revision,
                    }
                    path = store.image_path(row["sweep"], row["image_id"])
                    futures.append(writer.submit(write_png, path, image, record))
                    done[req.image_id] = record
                # The previous batch's files were written while this one generated.
                if writing is not None:
                    settle(writing)
                writing = (futures, batch, per_image_ms)
            if writing is not None:
                settle(writing)

    table = pd.DataFrame(
        [
            {
                "image_id": r["image_id"],
                "image_path": store.relative(store.image_path(r["sweep"], r["image_id"])),
                "elapsed_ms": float(done[r["image_id"]]["elapsed_ms"]),
                "batch_size": int(done[r["image_id"]].get("batch_size", 1)),
                "engine_model": done[r["image_id"]].get("engine_model", ""),
                "engine_model_revision": done[r["image_id"]].get("engine_model_revision", ""),
            }
            for r in rows
        ],
        columns=IMAGE_COLUMNS,
    )
    return GenerationReport(table=table, generated=len(todo), reused=len(rows) - len(todo),
                            seconds=time.perf_counter() - start,
                            warm_up_seconds=warm_up_seconds)
