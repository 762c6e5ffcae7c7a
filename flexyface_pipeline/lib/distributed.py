"""Generation and scoring spread over a Ray cluster (``FLEXYFACE_RAY_ADDRESS``).

The process that runs a step stays the driver: it decides what to make (resume and
verification), writes every file atomically and builds the tables, exactly as without Ray.
Only the model work moves to Ray actors ("workers"):

- one worker per GPU (``num_gpus=1``; scorers may take a fraction of a GPU), or on a cluster
  without GPUs one per CPU (``num_cpus=1``), at most ``max_actors`` when that is set;
- each worker builds its own model loader from plain settings (``WorkerSettings``: profile,
  model locations, device, precision, models directory) and loads the stage's one model once;
  one model family per GPU at a time: a stage's workers are killed before the next stage's start;
- batches wait in one queue on the driver and go to whichever worker has room (at most
  ``in_flight`` batches each, so a worker never waits for the driver and a slow GPU takes
  fewer); a worker returns finished PNG bytes (each carrying its row) or score rows;
- image files go to scorer workers as bytes: no shared filesystem is needed;
- a worker that dies (killed, lost node, out of host memory) loses nothing: its unfinished batches
  go back to the queue for the others, and the log names each retried batch. A batch that took
  down ``MAX_ATTEMPTS`` workers fails the step.

Ray is imported only when an address is set; without one nothing here runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flexyface_pipeline.lib.metrics.base import ImageEmbedder
from flexyface_pipeline.lib.progress import ProgressClock

logger = logging.getLogger(__name__)

SETTING = "FLEXYFACE_RAY_ADDRESS"
MAX_ATTEMPTS = 3  # workers a batch may take down before the step fails
WAIT_REPORT_SECONDS = 30.0  # how often a stage that waits for workers says so
CONNECT_TIMEOUT_SECONDS = 5.0


class RayUnavailableError(RuntimeError):
    """Ray is not installed or the cluster at ``FLEXYFACE_RAY_ADDRESS`` cannot be reached."""


class ModelLoader(Protocol):
    """What a worker needs from its loader (``ModelResource`` has this shape)."""

    def engine(self, name: str) -> Any: ...

    def scorer(self, metric: str) -> Any: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs to load models, as plain picklable values.

    ``loader(fields)`` builds the worker's own model loader; it must be importable by name on
    the workers (a module-level function), or defined in the driver's ``__main__``.
    """

    loader: Callable[[Mapping[str, Any]], ModelLoader]
    fields: Mapping[str, Any]


# -- connecting ----------------------------------------------------------------------------------
def _import_ray(address: str):
    try:
        import ray
    except ImportError as err:
        raise RayUnavailableError(
            f"{SETTING}={address!r} but Ray is not installed ({err}); install it (`make setup`, "
            f"requirements.txt) or leave {SETTING} empty to run in this process") from err
    return ray


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Without connecting: Ray is installed, and an explicit ``host:port`` accepts connections
    within ``timeout`` seconds (``RayUnavailableError`` naming the setting otherwise)."""
    _import_ray(address)
    if address != "auto":
        _probe(address, timeout)


def _probe(address: str, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
    """Fail fast when an explicit host:port does not accept connections (Ray would retry for
    30 s or more before giving up)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise RayUnavailableError(
            f"{SETTING}={address!r}: expected auto, ray://HOST:PORT (Ray client, port 10001) or HOST:PORT "
            f"(the head's GCS, port 6379); leave it empty to run in this process")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise RayUnavailableError(
            f"{SETTING}={address!r}: no Ray cluster answers there ({err}); start one (`ray start --head`, "
            f"deploy/ray-cluster.yaml) or leave {SETTING} empty to run in this process") from err


def connect(address: str) -> None:
    """Connect this process to the Ray cluster at ``address`` (``auto``, ``ray://host:port`` or
    ``host:port``); a process already connected keeps its connection. One-line
    ``RayUnavailableError`` naming ``FLEXYFACE_RAY_ADDRESS`` when that is not possible."""
    ray = _import_ray(address)
    if ray.is_initialized():
        return
    if address != "auto":
        _probe(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        # The port answered: most often the cluster's token authentication (on by default since
        # Ray 2.5x), which Ray applies to an explicit address only when told to.
        auth = "" if address == "auto" else (
            "; a cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token and its "
            "token (RAY_AUTH_TOKEN, or the head's ~/.ray/auth_token) here")
        raise RayUnavailableError(
            f"{SETTING}={address!r}: cannot connect to a Ray cluster ({first}){auth}; start one (`ray start "
            f"--head`, deploy/ray-cluster.yaml) or leave {SETTING} empty to run in this process") from err


# -- statistics ----------------------------------------------------------------------------------
@dataclass
class WorkerStats:
    """What one worker did while its model was loaded."""

    worker: int
    node: str = ""
    gpus: tuple = ()
    load_seconds: float = 0.0
    images: int = 0
    batches: int = 0
    busy_seconds: float = 0.0  # inside the worker's calls, as the worker measured them
    ready_at: float | None = None  # driver clock
    ended_at: float | None = None
    died: bool = False

    def active_seconds(self, now: float | None = None) -> float:
        if self.ready_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else (now if now is not None else time.perf_counter())
        return max(0.0, end - self.ready_at)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        active = self.active_seconds(now)
        return {
            "worker": self.worker,
            "node": self.node,
            "gpus": list(self.gpus),
            "images": self.images,
            "batches": self.batches,
            "images_per_second": round(self.images / active, 4) if active > 0 else 0.0,
            "busy_seconds": round(self.busy_seconds, 3),
            "idle_seconds": round(max(0.0, active - self.busy_seconds), 3),
            "load_seconds": round(self.load_seconds, 3),
            "died": self.died,
        }

    def line(self, now: float | None = None) -> str:
        d = self.as_dict(now)
        where = f"{d['node']}" + (f" GPU {','.join(map(str, d['gpus']))}" if d["gpus"] else "")
        return (f"worker {d['worker']} ({where}): {d['images']} images in {d['batches']} batches, "
                f"{d['images_per_second']:.3g} images/s, busy {d['busy_seconds']:.1f} s, "
                f"idle {d['idle_seconds']:.1f} s, model load {d['load_seconds']:.1f} s"
                + (", died" if d["died"] else ""))


# -- the worker (a Ray actor) -------------------------------------------------------------------
class _Blob:
    """Image bytes where ``images.run_batches`` expects a path: it only calls ``read_bytes``."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read_bytes(self) -> bytes:
        return self._data


class ModelWorker:
    """Holds one model on its device and runs batches of it. Runs inside a Ray actor process."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.models: ModelLoader | None = None
        self.engine: Any = None
        self.scorer: Any = None
        self._prompts_token: str | None = None
        self._limit: int | None = None  # engine batches that fit, once out of memory said so
        self._warmed: set[tuple] = set()

    def _where(self) -> dict[str, Any]:
        import ray

        return {"node": ray.util.get_node_ip_address(), "gpus": tuple(ray.get_gpu_ids()), "pid": os.getpid()}

    def _loader(self) -> ModelLoader:
        if self.models is None:
            self.models = self.settings.loader(self.settings.fields)
        return self.models

    def load_engine(self, name: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.engine = self._loader().engine(name)
        return self._where() | {"identity": self.engine.identity, "load_seconds": time.perf_counter() - t0}

    def load_scorer(self, metric: str) -> dict[str, Any]:
        from flexyface_pipeline.lib.metrics.images import device_batch_size

        t0 = time.perf_counter()
        scorer = self.scorer = self._loader().scorer(metric)
        snapshot = {"metric": scorer.metric, "column_prefix": scorer.column_prefix, "identity": scorer.identity,
                    "runtime": scorer.runtime, "title": getattr(scorer, "title", metric),
                    "embedder": isinstance(scorer, ImageEmbedder),
                    "batch_size": device_batch_size(scorer.runtime, scorer.activation_bytes_per_image)}
        if snapshot["embedder"]:
            snapshot["vision_digest"] = scorer.vision_digest
        return self._where() | {"identity": scorer.identity, "snapshot": snapshot,
                                "load_seconds": time.perf_counter() - t0}

    def batch_size_for(self, width: int, height: int) -> int:
        return int(self.engine.batch_size_for(width, height))

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Any other method of the loaded scorer (its cheap, whole-sweep parts)."""
        # Arrays arrive read-only (zero-copy from the object store); torch wants to own them.
        args = tuple(a.copy() if isinstance(a, np.ndarray) and not a.flags.writeable else a for a in args)
        return getattr(self.scorer, name)(*args, **kwargs)

    def attribute(self, name: str) -> tuple[bool, Any]:
        value = getattr(self.scorer, name)
        return (True, None) if callable(value) else (False, value)

    def generate(self, rows: list[dict], prompts_token: str, prompts: list[str]) -> dict[str, Any]:
        """PNG bytes (with their row in the ``flexyface`` chunk) of one planned batch of rows."""
        from flexyface_pipeline.lib.engines.base import ImageRequest
        from flexyface_pipeline.lib.generation import _shape, image_record, png_bytes
        from flexyface_pipeline.lib.models.common import fit_batch, free_memory

        t_start = time.perf_counter()
        engine = self.engine
        if prompts_token != self._prompts_token:
            prepare = getattr(engine, "prepare_prompts", None)
            if callable(prepare):
                prepare(prompts)
            self._prompts_token = prompts_token
        by_id = {r["image_id"]: r for r in rows}
        queue = deque([[_request(ImageRequest, r) for r in rows]])
        out: list[tuple[str, bytes, dict]] = []
        warm_up_seconds, compute_seconds = 0.0, 0.0
        warm_up = bool(getattr(engine, "needs_warm_up", False))
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="png") as encoder:
            while queue:
                batch = queue.popleft()
                if self._limit is not None and len(batch) > self._limit:
                    queue.extendleft(reversed([batch[i:i + self._limit] for i in range(0, len(batch), self._limit)]))
                    continue
                fits, shape = True, _shape(engine, batch) if warm_up else None
                if shape is not None and shape not in self._warmed:
                    t0 = time.perf_counter()
                    fits, _ = fit_batch(lambda: engine.warm_up(batch), len(batch))
                    warm_up_seconds += time.perf_counter() - t0
                    if fits:
                        self._warmed.add(shape)
                if fits:
                    t0 = time.perf_counter()
                    fits, images = fit_batch(lambda: engine.generate(batch), len(batch))
                if not fits:
                    self._limit = len(batch) // 2
                    queue.appendleft(batch)
                    free_memory(engine.runtime.device)
                    logger.warning("CUDA out of memory generating %d images; retrying with batches of %d",
                                   len(batch), self._limit)
                    continue
                took = time.perf_counter() - t0
                compute_seconds += took
                per_image_ms = took * 1000.0 / len(batch)
                records = [image_record(by_id[req.image_id], per_image_ms, len(batch), engine.identity)
                           for req in batch]
                encoded = encoder.map(png_bytes, images, records)
                out += [(req.image_id, data, record) for req, data, record in zip(batch, encoded, records)]
        return {"images": out, "warm_up_seconds": warm_up_seconds, "compute_seconds": compute_seconds,
                "busy_seconds": time.perf_counter() - t_start}

    def _run(self, data: list[bytes], step: Callable, verb: str) -> None:
        from flexyface_pipeline.lib.metrics.images import default_workers, run_batches

        scorer = self.scorer
        run_batches([_Blob(d) for d in data], scorer.prepare, step, batch_size=max(1, len(data)),
                    workers=min(default_workers(), max(1, len(data))), label=scorer.metric, log=logger,
                    device=scorer.runtime.device, verb=verb)

    def score(self, data: list[bytes], prompts: list[str]) -> dict[str, Any]:
        """Scores of one batch of image files (their bytes) against their prompts."""
        t0 = time.perf_counter()
        scores = np.empty(len(data), dtype=np.float64)

        def step(pixels, start: int) -> None:
            scores[start:start + len(pixels)] = self.scorer.score_prepared(pixels, prompts[start:start + len(pixels)])

        self._run(data, step, "scored")
        return {"values": scores, "busy_seconds": time.perf_counter() - t0}

    def embed(self, data: list[bytes]) -> dict[str, Any]:
        """Image embeddings (float32, one row per file) of one batch of image files."""
        t0 = time.perf_counter()
        parts: list[np.ndarray] = []

        def step(pixels, start: int) -> None:
            parts.append(self.scorer.embed_prepared(pixels).numpy())

        self._run(data, step, "embedded")
        values = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.empty((0, 0), np.float32)
        return {"values": values, "busy_seconds": time.perf_counter() - t0}

    def release(self) -> None:
        if self.models is not None:
            self.models.release()
        self.engine = self.scorer = None


# -- the driver's side ---------------------------------------------------------------------------
@dataclass
class _Worker:
    index: int
    handle: Any
    load_ref: Any
    stats: WorkerStats
    info: dict[str, Any] | None = None
    alive: bool = True
    inflight: set = field(default_factory=set)

    @property
    def ready(self) -> bool:
        return self.alive and self.info is not None


@dataclass(frozen=True)
class GeneratedBatch:
    """One batch back from a worker: (image id, PNG bytes, row record) per image."""

    images: list[tuple[str, bytes, dict]]
    worker: int
    warm_up_seconds: float
    compute_seconds: float

    @property
    def per_image_ms(self) -> float:
        return self.compute_seconds * 1000.0 / len(self.images) if self.images else 0.0


def _cause(err: BaseException) -> BaseException:
    """The exception a worker raised (its remote traceback stays on the Ray error, chained)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, Exception) else err


class _Pool:
    """The workers of one stage (one model), fed from a shared queue of batches."""

    def __init__(self, key: str, handles: list[Any], load: str, args: tuple, log: logging.Logger,
                 in_flight: int) -> None:
        self.key, self.log, self.in_flight = key, log, in_flight
        self.workers = [_Worker(i, h, getattr(h, load).remote(*args), WorkerStats(i)) for i, h in enumerate(handles)]
        self.reference: dict[str, Any] | None = None  # the first worker's load result
        self.retried: list[str] = []
        self.started = time.perf_counter()

    # -- workers -------------------------------------------------------------------------------
    def _loaded(self, worker: _Worker, ray: Any) -> None:
        try:
            info = ray.get(worker.load_ref)
        except ray.exceptions.RayActorError as err:
            self._died(worker, f"while loading {self.key}: {_first_line(err)}")
            return
        except ray.exceptions.RayTaskError as err:
            raise _cause(err) from err
        finally:
            worker.load_ref = None
        if self.reference is None:
            self.reference = info
        elif info["identity"] != self.reference["identity"]:
            raise RuntimeError(
                f"{self.key}: Ray workers loaded different weights ({info['identity']} on {info['node']}, "
                f"{self.reference['identity']} on {self.reference['node']}); make every node see the same model")
        worker.info = info
        worker.stats.node, worker.stats.gpus = info["node"], tuple(info["gpus"])
        worker.stats.load_seconds, worker.stats.ready_at = info["load_seconds"], time.perf_counter()
        self.log.info("%s: worker %d ready on %s%s (model load %.1f s)", self.key, worker.index, info["node"],
                      f" GPU {','.join(map(str, info['gpus']))}" if info["gpus"] else "", info["load_seconds"])

    def _died(self, worker: _Worker, why: str) -> None:
        if worker.alive:
            worker.alive = False
            worker.stats.died = True
            worker.stats.ended_at = time.perf_counter()
            self.log.warning("%s: worker %d died %s", self.key, worker.index, why)

    def _check_alive(self, left: int) -> None:
        if not any(w.alive for w in self.workers):
            raise RuntimeError(f"{self.key}: every Ray worker died with {left} batch(es) left; the finished ones "
                               "are kept: run the step again to resume")

    def _wait(self, ray: Any, refs: list) -> list:
        """Wait for ``refs`` or a worker's model load, whichever comes first; handles the loads."""
        loading = {w.load_ref: w for w in self.workers if w.alive and w.load_ref is not None}
        if not refs and not loading:
            return []
        done, _ = ray.wait(refs + list(loading), num_returns=1, timeout=WAIT_REPORT_SECONDS)
        if not done:
            ready = sum(w.ready for w in self.workers)
            self.log.info("%s: waiting for Ray workers (%d of %d ready; cluster resources available: %s)",
                          self.key, ready, sum(w.alive for w in self.workers), ray.available_resources())
        for ref in done:
            if ref in loading:
                self._loaded(loading[ref], ray)
        return [ref for ref in done if ref not in loading]

    def all_ready(self, ray: Any) -> int:
        """Wait until no live worker is still loading; the number ready."""
        while any(w.alive and w.load_ref is not None for w in self.workers):
            self._wait(ray, [])
        self._check_alive(0)
        return sum(w.ready for w in self.workers)

    def first_ready(self, ray: Any) -> _Worker:
        while True:
            ready = [w for w in self.workers if w.ready]
            if ready:
                return ready[0]
            self._check_alive(0)
            self._wait(ray, [])

    # -- running batches -------------------------------------------------------------------------
    def run(self, ray: Any, method: str, tasks: Sequence[Callable[[], tuple]], describe: Callable[[int], str],
            ) -> Iterator[tuple[int, Any, _Worker]]:
        """Run ``method(*tasks[i]())`` for every task on whichever worker has room; yields
        ``(i, result, worker)`` in the order results arrive. A task whose worker died goes back
        to the front of the queue."""
        queue = deque(range(len(tasks)))
        refs: dict[Any, tuple[int, _Worker]] = {}
        args: dict[int, list] = {}  # a task's arguments, kept until it is done (a retry sends them again)
        attempts: dict[int, int] = {}
        prefetch = ThreadPoolExecutor(max_workers=4, thread_name_prefix="payload")
        ahead: dict[int, Any] = {}  # task -> future of its arguments (files read ahead)

        def read_ahead() -> None:
            want = self.in_flight * max(1, sum(w.alive for w in self.workers)) + 2
            for i in list(queue)[:want]:
                if i not in ahead and i not in args:
                    ahead[i] = prefetch.submit(tasks[i])

        try:
            while queue or refs:
                self._check_alive(len(queue) + len(refs))
                read_ahead()
                for worker in self.workers:
                    while worker.ready and queue and len(worker.inflight) < self.in_flight:
                        i = queue.popleft()
                        if i not in args:
                            args[i] = list(ahead.pop(i).result() if i in ahead else tasks[i]())
                        ref = getattr(worker.handle, method).remote(*args[i])
                        refs[ref] = (i, worker)
                        worker.inflight.add(ref)
                for ref in self._wait(ray, list(refs)):
                    i, worker = refs.pop(ref)
                    worker.inflight.discard(ref)
                    try:
                        result = ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
                        # The worker died with the batch, or its node with the finished result.
                        self._died(worker, f"during {describe(i)}: {_first_line(err)}")
                        attempts[i] = attempts.get(i, 1) + 1
                        if attempts[i] > MAX_ATTEMPTS:
                            raise RuntimeError(f"{self.key}: {describe(i)} took down {MAX_ATTEMPTS} Ray workers; "
                                               "giving up") from err
                        self.retried.append(describe(i))
                        self.log.warning("%s: %s was not finished by worker %d: retrying it on the other workers",
                                         self.key, describe(i), worker.index)
                        queue.appendleft(i)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        raise _cause(err) from err
                    args.pop(i, None)
                    worker.stats.batches += 1
                    worker.stats.busy_seconds += float(result.get("busy_seconds", 0.0))
                    yield i, result, worker
        finally:
            prefetch.shutdown(wait=False, cancel_futures=True)
            # Left early (the driver failed): the batches still out are nobody's now; their
            # workers stay usable by the next run of this stage.
            for ref, (_, worker) in refs.items():
                worker.inflight.discard(ref)

    def call_one(self, ray: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` on one ready worker; on another if that one dies."""
        while True:
            worker = self.first_ready(ray)
            try:
                return ray.get(getattr(worker.handle, method).remote(*args, **kwargs))
            except ray.exceptions.RayActorError as err:
                self._died(worker, f"during {method}: {_first_line(err)}")
            except ray.exceptions.RayTaskError as err:
                raise _cause(err) from err

    def stats(self) -> list[WorkerStats]:
        return [w.stats for w in self.workers]

    def kill(self, ray: Any) -> None:
        now = time.perf_counter()
        for worker in self.workers:
            if worker.stats.ended_at is None:
                worker.stats.ended_at = now
            try:
                ray.kill(worker.handle)
            except Exception as err:  # already gone
                logger.debug("killing worker %d: %s", worker.index, err)


def _request(request_class: type, row: Mapping[str, Any]) -> Any:
    """The ``ImageRequest`` of a row identity (its fields that the request has)."""
    return request_class(**{f.name: row[f.name] for f in dataclasses.fields(request_class) if f.name in row})


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


class RemoteScorer:
    """The driver's view of a scorer loaded on Ray workers: its plain attributes (metric,
    identity, runtime, ...) as the first worker reported them; any other method runs on one
    worker. ``RayBackend.score_paths`` / ``embed_paths`` spread the image work over all of them."""

    def __init__(self, backend: RayBackend, snapshot: dict[str, Any]) -> None:
        self._backend = backend
        self._snapshot = dict(snapshot)
        self.metric = snapshot["metric"]
        self.column_prefix = snapshot["column_prefix"]
        self.identity = snapshot["identity"]
        self.runtime = snapshot["runtime"]
        self.title = snapshot["title"]
        self.batch_size = snapshot["batch_size"]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        is_method, value = self._backend._call("attribute", name)
        if not is_method:
            return value
        return lambda *args, **kwargs: self._backend._call("call", name, *args, **kwargs)


class RemoteEmbedder(RemoteScorer):
    """A ``RemoteScorer`` whose model is an ``ImageEmbedder``: the sweep's embedding cache works
    with it as with a local one."""

    @property
    def vision_digest(self) -> str:
        return self._snapshot["vision_digest"]

    def score_from_embeddings(self, embeddings: Any, prompts: Sequence[str] | None = None) -> np.ndarray:
        return self._backend._call("call", "score_from_embeddings", np.asarray(embeddings, dtype=np.float32),
                                   None if prompts is None else list(prompts))


ImageEmbedder.register(RemoteEmbedder)


class RayBackend:
    """Runs a step's model work on the Ray cluster at ``address``; the driver keeps the files.

    ``gpus_per_scorer``: the GPU share of one scorer worker (0.25: four per GPU; generation
    always takes a whole GPU). ``max_actors``: at most this many workers per stage (0: one per
    GPU, or one per CPU on a cluster without GPUs). ``cpus_per_actor``: CPUs each worker
    reserves (0 needs ``max_actors``). ``in_flight``: batches queued per worker.
    Use as a context manager, or call ``release`` (kills the workers).
    """

    def __init__(self, address: str, settings: WorkerSettings, *, device: str = "auto",
                 gpus_per_scorer: float = 1.0, max_actors: int = 0, cpus_per_actor: float = 1.0,
                 in_flight: int = 2, log: logging.Logger | None = None) -> None:
        if not 0 < gpus_per_scorer <= 1:
            raise ValueError(f"FLEXYFACE_RAY_GPUS_PER_SCORER: expected a GPU share in (0, 1], got {gpus_per_scorer}")
        if max_actors < 0:
            raise ValueError(f"FLEXYFACE_RAY_ACTORS: expected 0 (one per GPU or CPU) or more, got {max_actors}")
        if cpus_per_actor < 0 or (cpus_per_actor == 0 and not max_actors):
            raise ValueError("cpus_per_actor: expected > 0, or 0 together with max_actors")
        if in_flight < 1:
            raise ValueError(f"in_flight: expected at least 1, got {in_flight}")
        self.address, self.settings, self.device = address, settings, device
        self.gpus_per_scorer, self.max_actors = gpus_per_scorer, max_actors
        self.cpus_per_actor, self.in_flight = cpus_per_actor, in_flight
        self.log = log or logger
        self._pool: _Pool | None = None
        self._scorer: RemoteScorer | None = None
        self.history: list[dict[str, Any]] = []  # one entry per stage released: key, workers, retried

    # -- life cycle ------------------------------------------------------------------------------
    def _ray(self):
        connect(self.address)
        import ray

        return ray

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Kill the current stage's workers (their models go with them) and log what each did."""
        pool, self._pool, self._scorer = self._pool, None, None
        if pool is None:
            return
        import ray

        pool.kill(ray)
        now = time.perf_counter()
        for stats in pool.stats():
            if stats.ready_at is not None:
                pool.log.info("%s: %s", pool.key, stats.line(now))
        self.history.append({"stage": pool.key, "workers": [s.as_dict(now) for s in pool.stats()],
                             "retried": list(pool.retried)})

    close = release

    @property
    def loaded(self) -> bool:
        """Whether a stage's workers are running."""
        return self._pool is not None

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per worker of the current stage, or of the last one released."""
        if self._pool is not None:
            return [s.as_dict() for s in self._pool.stats()]
        return self.history[-1]["workers"] if self.history else []

    def retried(self) -> list[str]:
        """Batches of the current (or last) stage that a dying worker left and others redid."""
        if self._pool is not None:
            return list(self._pool.retried)
        return self.history[-1]["retried"] if self.history else []

    # -- workers ---------------------------------------------------------------------------------
    def _placement(self, ray: Any, gpus: float) -> tuple[int, dict[str, Any]]:
        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0.0))
        if self.device.startswith("cuda") and cluster_gpus <= 0:
            raise RayUnavailableError(f"FLEXYFACE_DEVICE={self.device!r} but the Ray cluster at {self.address!r} "
                                      "has no GPUs; set FLEXYFACE_DEVICE=cpu or add GPU workers")
        if self.device != "cpu" and cluster_gpus > 0:
            count = int(math.floor(cluster_gpus / gpus + 1e-9))
            options = {"num_gpus": gpus, "num_cpus": min(1.0, self.cpus_per_actor)}
        else:
            cpus = float(resources.get("CPU", 1.0))
            count = int(cpus // self.cpus_per_actor) if self.cpus_per_actor else self.max_actors
            options = {"num_cpus": self.cpus_per_actor}
        if self.max_actors:
            count = min(count, self.max_actors)
        return max(1, count), options

    def _stage(self, key: str, load: str, args: tuple, gpus: float, tasks: int) -> _Pool:
        """The workers holding model ``key``: reused within a step, else the previous stage's are
        killed first (one model family per GPU at a time) and new ones start loading."""
        ray = self._ray()
        if self._pool is not None and self._pool.key == key:
            return self._pool
        self.release()
        count, options = self._placement(ray, gpus)
        count = max(1, min(count, tasks))
        actor = ray.remote(ModelWorker).options(max_restarts=0, max_task_retries=0, **options)
        handles = [actor.remote(self.settings) for _ in range(count)]
        self.log.info("%s: starting %d Ray worker(s) (%s each)", key, count,
                      ", ".join(f"{k}={v:g}" for k, v in options.items()))
        self._pool = _Pool(key, handles, load, args, self.log, self.in_flight)
        return self._pool

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._pool is None:
            raise RuntimeError("no Ray workers are loaded")
        return self._pool.call_one(self._ray(), method, *args, **kwargs)

    def wait_ready(self) -> int:
        """Wait until every worker of the current stage has loaded its model (a run does not:
        workers join as they become ready); returns how many are ready. For benchmarks."""
        if self._pool is None:
            return 0
        return self._pool.all_ready(self._ray())

    # -- generation ------------------------------------------------------------------------------
    def generate(self, engine_name: str, rows: Sequence[dict], *, batch_size: int | None,
                 log: logging.Logger | None = None) -> Iterator[GeneratedBatch]:
        """Generate ``rows`` (row identities, ``generation._row_identity``: image_id, prompt,
        steps, guidance, seed, size, engine, scheduler) with ``engine_name`` on the workers; yields batches as they finish."""
        from flexyface_pipeline.lib.engines import get_engine
        from flexyface_pipeline.lib.engines.base import ImageRequest

        if not rows:
            return
        ray = self._ray()
        cls = get_engine(engine_name)
        requests = [_request(ImageRequest, r) for r in rows]
        pool = self._stage(f"engine:{engine_name}", "load_engine", (engine_name,), 1.0, len(rows))
        if log is not None:
            pool.log = log
        if batch_size:
            size_of: int | Callable = batch_size
        else:
            sizes = {(r.width, r.height): pool.call_one(ray, "batch_size_for", r.width, r.height)
                     for r in {(q.width, q.height): q for q in requests}.values()}
            size_of = lambda r: sizes[(r.width, r.height)]  # noqa: E731
        by_id = {r["image_id"]: dict(r) for r in rows}
        # The same batches as in one process; the longest first (steps × images), so the last
        # ones to finish are short and the workers end together.
        batches = sorted(cls.plan_batches(requests, size_of), key=lambda b: -b[0].steps * len(b))
        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
        token = hashlib.sha256("\0".join(prompts).encode()).hexdigest()

        def task(batch: list) -> Callable[[], tuple]:
            return lambda: ([by_id[q.image_id] for q in batch], token, prompts)

        def describe(i: int) -> str:
            batch = batches[i]
            return f"batch of {len(batch)} ({batch[0].image_id}{'…' if len(batch) > 1 else ''}, steps={batch[0].steps})"

        for _, result, worker in pool.run(ray, "generate", [task(b) for b in batches], describe):
            worker.stats.images += len(result["images"])
            yield GeneratedBatch(result["images"], worker.index, result["warm_up_seconds"], result["compute_seconds"])

    # -- scoring ---------------------------------------------------------------------------------
    def scorer(self, metric: str) -> RemoteScorer:
        """The scorer ``metric`` on this stage's workers (started and loaded here; its plain
        attributes come from the first worker ready)."""
        ray = self._ray()
        pool = self._stage(f"scorer:{metric}", "load_scorer", (metric,), self.gpus_per_scorer, 1 << 30)
        if self._scorer is None or self._scorer.metric != metric:
            snapshot = pool.first_ready(ray).info["snapshot"]
            self._scorer = (RemoteEmbedder if snapshot["embedder"] else RemoteScorer)(self, snapshot)
        return self._scorer

    def _map_files(self, method: str, scorer: RemoteScorer, paths: Sequence[Path], prompts: Sequence[str] | None,
                   batch_size: int | None, log: logging.Logger, verb: str) -> tuple[list[Any], list[str]]:
        ray = self._ray()
        if self._pool is None or self._scorer is not scorer:
            raise RuntimeError(f"{scorer.metric}: its Ray workers were released")
        pool = self._pool
        pool.log = log
        size = batch_size or scorer.batch_size
        starts = list(range(0, len(paths), size))
        digests: list[str | None] = [None] * len(paths)
        results: list[Any] = [None] * len(starts)

        def task(k: int) -> Callable[[], tuple]:
            def read() -> tuple:
                start = starts[k]
                data = [Path(p).read_bytes() for p in paths[start:start + size]]
                for j, d in enumerate(data):
                    digests[start + j] = hashlib.sha256(d).hexdigest()
                return (data,) if prompts is None else (data, list(prompts[start:start + size]))
            return read

        def describe(k: int) -> str:
            return f"batch of images {starts[k]}–{min(starts[k] + size, len(paths)) - 1}"

        clock = ProgressClock(len(paths))
        for k, result, worker in pool.run(ray, method, [task(k) for k in range(len(starts))], describe):
            results[k] = result["values"]
            worker.stats.images += len(result["values"])
            log.info("%s: %s (worker %d)", scorer.metric, clock.advance(len(result["values"])).line(verb), worker.index)
        return results, digests  # type: ignore[return-value]

    def score_paths(self, scorer: RemoteScorer, paths: Sequence[Path], prompts: Sequence[str], *,
                    batch_size: int | None = None, workers: int | None = None,
                    log: logging.Logger | None = None) -> np.ndarray:
        """``images.score_paths`` on the workers: the driver reads the files and sends their bytes."""
        if len(paths) != len(prompts):
            raise ValueError(f"got {len(paths)} image paths but {len(prompts)} prompts; pass one prompt per image")
        if not paths:
            return np.empty(0, dtype=np.float64)
        parts, _ = self._map_files("score", scorer, paths, prompts, batch_size, log or self.log, "scored")
        return np.concatenate(parts).astype(np.float64, copy=False)

    def embed_paths(self, embedder: RemoteScorer, paths: Sequence[Path], *, batch_size: int | None = None,
                    workers: int | None = None, log: logging.Logger | None = None) -> tuple[np.ndarray, list[str]]:
        """``images.embed_paths`` on the workers: embeddings and the SHA-256 of each file's bytes."""
        if not paths:
            return np.empty((0, 0), dtype=np.float32), []
        parts, digests = self._map_files("embed", embedder, paths, None, batch_size, log or self.log, "embedded")
        return np.concatenate(parts).astype(np.float32, copy=False), digests
