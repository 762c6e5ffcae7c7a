"""Score one sweep's images with one metric and build its score table.

CLIP score and the two LAION aesthetic predictors run on the same CLIP ViT-L/14 image tower.
They are separate assets (each can be materialised alone), so the image embedding is shared
through the sweep's directory: a scorer that is an ``ImageEmbedder`` looks for

    <data_dir>/sweeps/<sweep>/embeddings/<vision_digest>.npy   float32, one L2-normalised row per image
    <data_dir>/sweeps/<sweep>/embeddings/<vision_digest>.json  image ids, SHA-256 of each image file's
                                                               bytes, SHA-256 of the .npy file

and computes only the rows it cannot reuse (a new image, or a file whose bytes changed), then
runs its cheap part (the prompt side or the head). ``vision_digest`` covers the image tower's
weights as loaded, its configuration, its preprocessing, the compute dtype and (on CUDA) whether
TF32 is allowed, so a different model or precision never reads another's embeddings. Both files are written atomically, the ``.npy`` first; a
``.json`` that does not match the ``.npy`` beside it (an interrupted or concurrent write) is
ignored and the embeddings are recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.atomic import atomic_write_bytes
from flexyface_pipeline.lib.export import SCORE_TABLES, score_columns
from flexyface_pipeline.lib.metrics.base import ImageEmbedder, Scorer
from flexyface_pipeline.lib.metrics.images import default_workers, embed_paths, file_digest, score_paths
from flexyface_pipeline.lib.store import SweepStore

if TYPE_CHECKING:  # Ray is imported only when a cluster is used
    from flexyface_pipeline.lib.distributed import RayBackend

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
EMBEDDINGS_DIR = "embeddings"
# Each score row records the SHA-256 of the image bytes it scored and the version of this scoring
# code; with the same weights (revision), device and precision such a row is kept by the next run
# instead of being computed again. Raise SCORING_VERSION whenever a metric's computation changes.
IMAGE_DIGEST = "image_sha256"
SCORING_VERSION_COLUMN = "scoring_version"
SCORING_VERSION = 1


@dataclass(frozen=True)
class CachedEmbeddings:
    image_ids: list[str]
    file_digests: list[str]
    embeddings: np.ndarray  # float32 (images, dims)


@dataclass(frozen=True)
class EmbeddingCache:
    """The embeddings one image tower (``digest``) computed for one sweep's image files."""

    directory: Path
    digest: str

    def __post_init__(self) -> None:
        if not self.digest or not all(c in "0123456789abcdef" for c in self.digest):
            raise ValueError(f"embedding cache: expected a hex digest, got {self.digest!r}")

    @property
    def array_path(self) -> Path:
        return self.directory / f"{self.digest}.npy"

    @property
    def meta_path(self) -> Path:
        return self.directory / f"{self.digest}.json"

    def read(self) -> CachedEmbeddings | None:
        """The stored embeddings, or None when absent, unreadable or inconsistent."""
        if not self.meta_path.is_file() or not self.array_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            data = self.array_path.read_bytes()
            if meta.get("format") != CACHE_FORMAT or meta.get("vision_digest") != self.digest:
                raise ValueError("format or digest differs")
            if hashlib.sha256(data).hexdigest() != meta.get("array_sha256"):
                raise ValueError("the .npy file does not match its description")
            array = np.load(io.BytesIO(data), allow_pickle=False)
            ids, digests = list(meta["image_ids"]), list(meta["file_sha256"])
            if array.dtype != np.float32 or array.ndim != 2 or not len(ids) == len(digests) == array.shape[0]:
                raise ValueError(f"unexpected array {array.dtype} {array.shape} for {len(ids)} images")
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("ignoring embedding cache %s: %s", self.array_path, err)
            return None
        return CachedEmbeddings(ids, digests, array)

    def write(self, image_ids: Sequence[str], file_digests: Sequence[str], embeddings: np.ndarray) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or not len(image_ids) == len(file_digests) == embeddings.shape[0]:
            raise ValueError(f"embedding cache: {embeddings.shape} embeddings for {len(image_ids)} images "
                             f"and {len(file_digests)} file digests")
        buffer = io.BytesIO()
        np.save(buffer, embeddings, allow_pickle=False)
        data = buffer.getvalue()
        meta = {
            "format": CACHE_FORMAT,
            "vision_digest": self.digest,
            "image_ids": list(image_ids),
            "file_sha256": list(file_digests),
            "array_sha256": hashlib.sha256(data).hexdigest(),
            "shape": list(embeddings.shape),
        }
        atomic_write_bytes(self.array_path, data)
        atomic_write_bytes(self.meta_path, json.dumps(meta, indent=1).encode("utf-8"))


def embedding_cache(store: SweepStore, sweep: str, embedder: ImageEmbedder) -> EmbeddingCache:
    return EmbeddingCache(store.sweep_dir(sweep) / EMBEDDINGS_DIR, embedder.vision_digest)


def file_digests(paths: Sequence[Path], workers: int | None = None) -> list[str]:
    """SHA-256 of each file's bytes, hashed in threads."""
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="hash") as pool:
        return list(pool.map(file_digest, paths))


def sweep_embeddings(
    embedder: ImageEmbedder,
    cache: EmbeddingCache,
    image_ids: Sequence[str],
    paths: Sequence[Path],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    log: logging.Logger | None = None,
    embed: Callable[..., tuple[np.ndarray, list[str]]] = embed_paths,
) -> np.ndarray:
    """Embeddings of ``paths`` (one row per image, in order): rows whose image id and file bytes
    match the cache are reused, the others computed; the cache is rewritten when anything was."""
    log = log or logger
    image_ids, paths = list(image_ids), [Path(p) for p in paths]
    n = len(paths)
    cached = cache.read()
    rows: list[np.ndarray | None] = [None] * n
    digests: list[str | None] = [None] * n
    if cached is not None:
        known = {(i, d): k for k, (i, d) in enumerate(zip(cached.image_ids, cached.file_digests))}
        digests = list(file_digests(paths, workers))
        for k, key in enumerate(zip(image_ids, digests)):
            hit = known.get(key)
            if hit is not None:
                rows[k] = cached.embeddings[hit]
    todo = [k for k in range(n) if rows[k] is None]
    if todo:
        computed, computed_digests = embed(embedder, [paths[k] for k in todo], batch_size=batch_size,
                                           workers=workers, log=log)
        for j, k in enumerate(todo):
            rows[k], digests[k] = computed[j], computed_digests[j]
    embeddings = np.stack(rows).astype(np.float32, copy=False) if n else np.empty((0, 0), np.float32)
    if todo:
        cache.write(image_ids, digests, embeddings)  # type: ignore[arg-type]
    log.info("image embeddings %s: %d reused, %d computed", cache.digest[:12], n - len(todo), len(todo))
    return embeddings


def score_sweep(
    metric: str,
    sweep: str,
    store: SweepStore,
    scorer_factory: Callable[[], Scorer],
    *,
    batch_size: int | None = None,
    workers: int | None = None,
    share_embeddings: bool = True,
    log: logging.Logger | None = None,
    backend: RayBackend | None = None,
    rescore_all: bool = False,
) -> pd.DataFrame:
    """Score every image of ``sweep`` with ``metric``; columns: image_id, metric, provenance
    (``export.score_columns``: model, revision, device, compute dtype, TF32, and for CLIP score
    whether the prompt was truncated to 77 tokens).

    Missing images fail before the model is loaded. Each batch logs a progress line. ``batch_size`` None or 0 sizes batches to
    the device. With ``share_embeddings``, CLIP ViT-L/14 scorers reuse and store the sweep's
    image embeddings (see the module docstring). With ``backend`` (a ``distributed.RayBackend``)
    the model runs on its Ray workers: this process reads the files and sends their bytes, and
    keeps the embedding cache and the table.

    Rows of the sweep's existing table are kept when they are still right (``reusable_scores``:
    same image bytes, weights, device, precision and scoring code); only the other images are
    scored. ``rescore_all`` scores every image again.
    """
    log = log or logger
    if metric not in SCORE_TABLES:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(SCORE_TABLES)}")
    params = store.read_table("parameters", sweep)
    images = store.read_table("images", sweep)
    rows = params[["image_id", "prompt"]].merge(images[["image_id", "image_path"]], on="image_id", validate="one_to_one")
    paths = [store.absolute(p) for p in rows["image_path"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"sweep {sweep!r}: {len(missing)} image(s) missing, e.g. {missing[0]}; materialize generated_images first"
        )
    scorer = scorer_factory() if backend is None else backend.scorer(metric)
    embed, score = (embed_paths, score_paths) if backend is None else (backend.embed_paths, backend.score_paths)
    if scorer.metric != metric:
        raise ValueError(f"scorer_factory returned a {scorer.metric} scorer for {metric}")
    prefix = SCORE_TABLES[metric][1]
    provenance = scorer.identity.as_columns(prefix) | scorer.runtime.columns(prefix)
    image_ids = [str(i) for i in rows["image_id"]]
    digests = file_digests(paths, workers)
    kept = {} if rescore_all else reusable_scores(store, sweep, metric, provenance, dict(zip(image_ids, digests)))
    todo = [k for k, image_id in enumerate(image_ids) if image_id not in kept]
    if kept:
        log.info("%s: %d of %d images of %s keep their scores (same image bytes, weights and precision); "
                 "scoring %d", metric, len(kept), len(image_ids), sweep, len(todo))
    prompts = [str(p) for p in rows["prompt"]]
    values = np.array([kept.get(i, np.nan) for i in image_ids], dtype=np.float64)
    t0 = time.perf_counter()
    if todo:
        todo_paths, todo_prompts = [paths[k] for k in todo], [prompts[k] for k in todo]
        if share_embeddings and isinstance(scorer, ImageEmbedder):
            # Every image's embedding (cached ones are read, not computed), so the cache keeps them all.
            embeddings = sweep_embeddings(scorer, embedding_cache(store, sweep, scorer), image_ids, paths,
                                          batch_size=batch_size or None, workers=workers, log=log, embed=embed)
            scores = scorer.score_from_embeddings(embeddings[todo], todo_prompts)
        else:
            scores = score(scorer, todo_paths, todo_prompts, batch_size=batch_size or None, workers=workers, log=log)
        values[todo] = np.asarray(scores, dtype=np.float64)
    log.info("%s: scored %d images of %s in %.2f s", metric, len(todo), sweep, time.perf_counter() - t0)
    table = pd.DataFrame({"image_id": rows["image_id"], metric: values})
    for column, value in provenance.items():
        table[column] = value
    for column, flags in scorer.row_columns(prompts).items():
        table[column] = np.asarray(flags, dtype=bool)
        if column.endswith("_prompt_truncated") and table[column].any():
            log.info("%s: %d of %d images had prompts longer than 77 CLIP tokens (truncated to BOS + 75 + EOS)",
                     metric, int(table[column].sum()), len(table))
    table[IMAGE_DIGEST] = digests
    table[SCORING_VERSION_COLUMN] = SCORING_VERSION
    return table[["image_id", *score_columns(metric), IMAGE_DIGEST, SCORING_VERSION_COLUMN]]


def reusable_scores(store: SweepStore, sweep: str, metric: str, provenance: dict,
                    digests: dict[str, str]) -> dict[str, float]:
    """Scores of the sweep's existing table that are still right: for images whose bytes are the
    ones scored (``image_sha256``), computed by the same weights (their revision: the content,
    wherever the files lie), on the same device, precision and TF32 setting, by this version of
    the scoring code. A missing, unreadable or older table reuses nothing."""
    table_name, prefix = SCORE_TABLES[metric]
    if not store.has_table(table_name, sweep):
        return {}
    try:
        previous = store.read_table(table_name, sweep)
    except OSError:  # damaged: scored anew
        return {}
    same = [c for c in provenance if c != f"{prefix}_model"]  # the location may change, the content not
    needed = {"image_id", metric, IMAGE_DIGEST, SCORING_VERSION_COLUMN, *same}
    if not needed <= set(previous.columns):
        return {}
    ok = previous[SCORING_VERSION_COLUMN].eq(SCORING_VERSION)
    for column in same:
        ok &= previous[column].astype(str).eq(str(provenance[column]))
    ok &= previous["image_id"].astype(str).map(digests).eq(previous[IMAGE_DIGEST])
    ok &= np.isfinite(pd.to_numeric(previous[metric], errors="coerce"))
    kept = previous[ok]
    return dict(zip(kept["image_id"].astype(str), kept[metric].astype(float)))
