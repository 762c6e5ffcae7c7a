"""Generate a sweep's images, resumable.

Each PNG carries its own row (prompt, steps, guidance, seed, size, engine, model, elapsed_ms) in a
``flexyface`` text chunk and is written atomically, so after a crash every file that exists is
complete. On a re-run an image is kept only if it decodes fully and its chunk matches its row;
everything else is generated again.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from PIL import Image, PngImagePlugin

from flexyface_pipeline.lib.atomic import atomic_path, atomic_write_bytes
from flexyface_pipeline.lib.engines.base import Engine, ImageRequest
from flexyface_pipeline.lib.models.common import ModelIdentity, fit_batch, free_memory
from flexyface_pipeline.lib.progress import Progress, ProgressClock
from flexyface_pipeline.lib.store import SweepStore

if TYPE_CHECKING:  # Ray is imported only when a cluster is used
    from flexyface_pipeline.lib.distributed import RayBackend

logger = logging.getLogger(__name__)

PNG_KEY = "flexyface"
# Fields of a row that must match the PNG's chunk for the file to count as that row's image.
# ``scheduler`` is None for the model's own scheduler: PNGs written before the scheduler axis
# existed have no such key and still match rows with the default scheduler.
IDENTITY_FIELDS = ("image_id", "prompt", "steps", "guidance", "seed", "width", "height", "engine", "scheduler")

IMAGE_COLUMNS = [
    "image_id",
    "image_path",
    "elapsed_ms",
    "batch_size",
    "engine_model",
    "engine_model_revision",
]


def _row_identity(row: dict) -> dict:
    out = {k: row.get(k) for k in IDENTITY_FIELDS}
    out["scheduler"] = _scheduler_value(out["scheduler"])
    out["steps"] = int(out["steps"])
    out["seed"] = int(out["seed"])
    out["width"] = int(out["width"])
    out["height"] = int(out["height"])
    out["guidance"] = _guidance_value(out["guidance"])
    return out


def _scheduler_value(value: object) -> str | None:
    """A scheduler name; None (the model's own) for a missing key, None, NaN or an empty name."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    return str(value)


def _guidance_value(value: object) -> float | None:
    """Guidance as stored and compared: rounded to 6 decimals; None where the engine takes none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 6)


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
    stored["guidance"] = _guidance_value(stored.get("guidance"))
    stored["scheduler"] = _scheduler_value(stored.get("scheduler"))
    return record if stored == _row_identity(row) else None


def write_png(path: Path, image: Image.Image, record: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def image_record(row: dict, per_image_ms: float, batch_size: int, identity: ModelIdentity) -> dict:
    """The record stored in an image's PNG: its row's identity, timing and the weights that made it."""
    return _row_identity(row) | {
        "elapsed_ms": round(per_image_ms, 3),
        "batch_size": batch_size,
        "engine_model": identity.model_id,
        "engine_model_revision": identity.revision,
    }


def png_bytes(image: Image.Image, record: dict) -> bytes:
    """The PNG file ``write_png`` writes, as bytes (made where the image was generated)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _shape(engine: Engine, batch: list[ImageRequest]) -> tuple:
    """What a pipeline call's tensors depend on: the batch's size and key, steps aside."""
    return len(batch), engine.batch_key(replace(batch[0], steps=1))


@dataclass
class _Written:
    """One batch whose PNGs are being written."""

    futures: list[Future]
    batch: list[ImageRequest]
    per_image_ms: float
    latest: Path
    remaining: int


class _BatchReporter:
    """Reports each batch as soon as all its files are on disk, in batch order: a progress line
    (images done / total, images per second, ETA) and ``after_batch``. It runs in the writer
    thread that wrote a batch's last file, one batch at a time; the generating thread is never
    held. A failed write or a failing ``after_batch`` stops the reports; ``check`` raises it in
    the generating thread."""

    def __init__(self, clock: ProgressClock, log: logging.Logger,
                 after_batch: Callable[[Progress], None] | None) -> None:
        self.clock, self.log, self.after_batch = clock, log, after_batch
        self._lock = threading.Lock()  # the state below; held briefly, also by the generating thread
        self._reporting = threading.Lock()  # one report at a time, in order; writer threads only
        self._pending: deque[_Written] = deque()
        self._error: BaseException | None = None

    def track(self, futures: list[Future], batch: list[ImageRequest], per_image_ms: float, latest: Path) -> None:
        entry = _Written(futures, batch, per_image_ms, latest, remaining=len(futures))
        with self._lock:
            self._pending.append(entry)
        for future in futures:
            future.add_done_callback(lambda _, entry=entry: self._written(entry))

    def _written(self, entry: _Written) -> None:
        with self._reporting:
            with self._lock:
                entry.remaining -= 1
                ready = []
                while self._error is None and self._pending and self._pending[0].remaining == 0:
                    head = self._pending.popleft()
                    failed = next((f.exception() for f in head.futures if f.exception() is not None), None)
                    if failed is not None:
                        self._error = failed
                        break
                    ready.append(head)
            for head in ready:
                progress = self.clock.advance(len(head.batch), head.latest)
                self.log.info("%s (steps=%d, batch of %d, %.0f ms/image)", progress.line("generated"),
                              head.batch[0].steps, len(head.batch), head.per_image_ms)
                if self.after_batch is not None:
                    try:
                        self.after_batch(progress)
                    except BaseException as err:  # raised in the generating thread by check()
                        with self._lock:
                            self._error = err
                        return

    def check(self) -> None:
        """Raise the failed write or ``after_batch`` error, if any."""
        with self._lock:
            error = self._error
        if error is not None:
            raise error


@dataclass
class GenerationReport:
    table: pd.DataFrame
    generated: int
    reused: int
    seconds: float
    warm_up_seconds: float = 0.0  # untimed warm-up calls (CUDA, compiled UNet), within ``seconds``


def _generate_remote(backend: RayBackend, todo: list[dict], store: SweepStore, done: dict[str, dict], *,
                     batch_size: int | None, log: logging.Logger,
                     after_batch: Callable[[Progress], None] | None) -> float:
    """Make ``todo`` on ``backend``'s workers (one engine at a time); write each returned PNG here,
    atomically, check that it carries its row, and report each batch once its files are on disk.
    Returns the workers' warm-up seconds."""
    rows_by_id = {r["image_id"]: r for r in todo}
    clock = ProgressClock(len(todo))
    warm_up_seconds = 0.0
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="png") as writer:
        for engine_name in dict.fromkeys(str(r["engine"]) for r in todo):
            rows = [_row_identity(r) for r in todo if str(r["engine"]) == engine_name]
            for result in backend.generate(engine_name, rows, batch_size=batch_size, log=log):
                paths = []
                for image_id, _, record in result.images:
                    row = rows_by_id[image_id]
                    if {k: record.get(k) for k in IDENTITY_FIELDS} != _row_identity(row):
                        raise RuntimeError(f"a Ray worker returned image {image_id} for another row: {record}")
                    paths.append(store.image_path(row["sweep"], image_id))
                for future in [writer.submit(atomic_write_bytes, path, data)
                               for path, (_, data, _) in zip(paths, result.images)]:
                    future.result()
                done.update((image_id, record) for image_id, _, record in result.images)
                warm_up_seconds += result.warm_up_seconds
                progress = clock.advance(len(result.images), paths[-1])
                log.info("%s (steps=%d, batch of %d, %.0f ms/image, Ray worker %d)", progress.line("generated"),
                         result.images[0][2]["steps"], len(result.images), result.per_image_ms, result.worker)
                if after_batch is not None:
                    after_batch(progress)
    return warm_up_seconds


def generate_sweep(
    parameters: pd.DataFrame,
    store: SweepStore,
    engine_factory: Callable[[], Engine],
    *,
    batch_size: int | None,
    expected_model: ModelIdentity | None = None,
    log: logging.Logger | None = None,
    after_batch: Callable[[Progress], None] | None = None,
    backend: RayBackend | None = None,
) -> GenerationReport:
    """Generate every missing image of ``parameters`` (one sweep) and return the images table.

    An existing image is kept if it decodes completely, its stored row matches, and, given
    ``expected_model``, it was made by those weights (their content: the revision, wherever they
    lie); every other image
    is generated. ``engine_factory`` is called only if at least one image is missing. ``batch_size`` is the
    number of images per pipeline call; None lets the engine size batches to the device
    (``Engine.batch_size_for``). A CUDA out-of-memory error halves the batch size for the rest
    of the sweep and retries.

    A batch's PNGs are encoded and written by background threads while the next batch generates;
    a batch counts as finished once its files are on disk: then, while the next batch is still
    generating, it logs ``generated 12/48 images (25 %), 0.8 images/s, ETA 45 s (...)`` and
    calls ``after_batch`` with its ``Progress`` (the latest image file among them), from the
    writer thread, batches in order and one at a time. An exception from ``after_batch`` stops
    the sweep before the next batch's files are written.
    ``elapsed_ms`` of an image is the wall time of the pipeline call that produced its batch
    divided by the batch's size: text encoding, denoising and VAE decoding, not PNG encoding.
    Engines that encode every prompt once beforehand (``Engine.prepare_prompts``: the
    diffusion-transformer engines) spend their text encoding outside those calls.
    Where the engine asks for it (``Engine.needs_warm_up``: CUDA, or a compiled UNet), the first
    batch of each shape (size, width, height, guidance mode) is preceded by an untimed call of
    at most two steps, so one-time costs (kernel loading and selection, compilation) stay out
    of ``elapsed_ms``.

    With ``backend`` (a ``distributed.RayBackend``) the missing images are made by its Ray
    workers instead of ``engine_factory``'s engine (each worker loads the engine, warms up and
    halves batches on its own); verification, the atomic writes and the table stay here.
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
            if not expected_model.same_weights(*made_by):
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

    if todo and backend is not None:
        warm_up_seconds = _generate_remote(backend, todo, store, done, batch_size=batch_size, log=log,
                                           after_batch=after_batch)
    elif todo:
        engine = engine_factory()
        # Text encoders first: each distinct prompt is encoded once, before the denoiser takes the device.
        prepare = getattr(engine, "prepare_prompts", None)  # Engine's default does nothing
        if prepare is not None:
            prepare(list(dict.fromkeys(r["prompt"] for r in todo)))
        rows_by_id = {r["image_id"]: r for r in todo}
        requests = [
            ImageRequest(image_id=r["image_id"], prompt=r["prompt"], steps=int(r["steps"]),
                         guidance=r["guidance"], seed=int(r["seed"]), width=int(r["width"]),
                         height=int(r["height"]), scheduler=_scheduler_value(r.get("scheduler")))
            for r in todo
        ]
        size_of = batch_size or (lambda r: engine.batch_size_for(r.width, r.height))
        queue = deque(engine.plan_batches(requests, size_of))
        identity = engine.identity
        limit: int | None = None  # largest batch that fits, once an out-of-memory error said so
        warm_up = bool(getattr(engine, "needs_warm_up", False))
        warmed: set[tuple] = set()
        reporter = _BatchReporter(ProgressClock(len(todo)), log, after_batch)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="png") as writer:
            while queue:
                reporter.check()
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
                reporter.check()
                futures = []
                for req, image in zip(batch, images, strict=True):
                    row = rows_by_id[req.image_id]
                    record = image_record(row, per_image_ms, len(batch), identity)
                    path = store.image_path(row["sweep"], row["image_id"])
                    futures.append(writer.submit(write_png, path, image, record))
                    done[req.image_id] = record
                # Reported by the writer threads once written, while the next batch generates.
                reporter.track(futures, batch, per_image_ms, path)
        # Leaving the pool waited for every write and every report.
        reporter.check()

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
