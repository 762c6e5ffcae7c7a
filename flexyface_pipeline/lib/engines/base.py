"""What every text-to-image engine offers: load weights, plan batches, generate, close.

An engine is one model family behind one loading path. Real weights (a hub id or a local
directory) and the random-weight test models of the same classes load through the same
``load``; ``build_tiny`` / ``build_random_full`` write those test models.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import PIL.Image

from flexyface_pipeline.lib.models.common import (
    DigestCache,
    MissingWeightsError,
    ModelIdentity,
    Runtime,
    check_location,
    device_batch_size,
    hub_errors,
    identify,
    is_local,
    missing_weights,
)

MAX_SEED = 2**63
MAX_CUDA_BATCH = 16  # images per call at most when the size is automatic


def _whole_number(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def _batch_size(value: object) -> int:
    size = _whole_number("max_batch", value)
    if size < 1:
        raise ValueError(f"max_batch must be at least 1, got {size}")
    return size


@dataclass(frozen=True)
class ImageRequest:
    """One image to make. Everything that determines the image is here, so a row reproduces it."""

    image_id: str
    prompt: str
    steps: int
    guidance: float | None  # None: unused by the engine (guidance_kind 'none')
    seed: int
    width: int
    height: int
    scheduler: str | None = None  # a name of the engine's ``schedulers``; None: the model's own

    def __post_init__(self) -> None:
        # Rows come from pandas: accept numpy scalars, store plain Python values.
        if not isinstance(self.image_id, str) or not self.image_id:
            raise ValueError(f"image_id: expected a non-empty string, got {self.image_id!r}")
        if not isinstance(self.prompt, str):
            raise ValueError(f"{self.image_id}: prompt must be a string, got {type(self.prompt).__name__}")
        steps = _whole_number(f"{self.image_id}: steps", self.steps)
        if steps < 1:
            raise ValueError(f"{self.image_id}: steps must be at least 1, got {steps}")
        if isinstance(self.guidance, bool):
            raise ValueError(f"{self.image_id}: guidance must be a number, got {self.guidance!r}")
        # None (or NaN, an empty table cell): the engine takes no guidance value.
        guidance = None if self.guidance is None or math.isnan(float(self.guidance)) else float(self.guidance)
        if guidance is not None and (not math.isfinite(guidance) or guidance < 0):
            raise ValueError(f"{self.image_id}: guidance must be a finite number >= 0, got {self.guidance!r}")
        seed = _whole_number(f"{self.image_id}: seed", self.seed)
        if not 0 <= seed < MAX_SEED:
            raise ValueError(f"{self.image_id}: seed must be in [0, 2**63), got {seed}")
        sizes = {}
        for name in ("width", "height"):
            value = _whole_number(f"{self.image_id}: {name}", getattr(self, name))
            if value < 8 or value % 8:
                raise ValueError(f"{self.image_id}: {name} must be a positive multiple of 8, got {value}")
            sizes[name] = value
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "guidance", guidance)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "width", sizes["width"])
        object.__setattr__(self, "height", sizes["height"])
        # None (or NaN / empty, a table cell of a sweep without a scheduler axis): the model's own.
        scheduler = self.scheduler
        if scheduler is not None and not isinstance(scheduler, str):
            if isinstance(scheduler, float) and math.isnan(scheduler):
                scheduler = None
            else:
                raise ValueError(f"{self.image_id}: scheduler must be a name, got {scheduler!r}")
        object.__setattr__(self, "scheduler", scheduler or None)


class Engine(abc.ABC):
    """A loaded text-to-image model. Subclasses set the three class attributes and the methods."""

    name: ClassVar[str]  # registry key, the value of the sweep's ``engine`` column
    default_model: ClassVar[str]  # hub id of the weights used when nothing else is configured
    setting: ClassVar[str]  # environment variable that points the engine at other weights
    pipeline_name: ClassVar[str] = "pipeline"  # the diffusers pipeline class of the releases (in messages)

    # The engine's parameter semantics, declared here and checked before any model loads.
    steps_limits: ClassVar[tuple[int, int]] = (4, 60)  # steps a sweep may ask for
    default_steps: ClassVar[tuple[int, int]] = (8, 48)  # the sweep's range when none is given
    # What "guidance" means: "cfg" (classifier-free guidance scale), "distilled" (a guidance value
    # the transformer takes as an embedding, one pass per step), "none" (unused: a sweep gives no
    # guidance range, rows and the export carry no guidance value).
    guidance_kind: ClassVar[str] = "cfg"
    guidance_limits: ClassVar[tuple[float, float] | None] = (0.5, 12.0)  # None when unused
    default_guidance: ClassVar[tuple[float, float] | None] = (1.0, 8.0)  # None when unused
    size_multiple: ClassVar[int] = 8  # width and height must be multiples of this
    # Samplers a sweep may choose by name (its ``scheduler`` axis), each mapped to what the engine
    # needs to build it. Empty: only the model's own scheduler.
    schedulers: ClassVar[dict[str, object]] = {}

    @classmethod
    def uses_guidance(cls) -> bool:
        return cls.guidance_kind != "none"

    def prepare_prompts(self, prompts: Sequence[str]) -> None:
        """Called once by a run with every distinct prompt it will generate, before any batch.
        Engines whose text encoders are large encode them all here, keep the embeddings and free
        the encoders, so the denoiser never shares the device with them. Default: nothing."""

    # Rough peak activation memory of one image of 1024x1024 in one pipeline call (guidance
    # included, reduced precision); scales with the pixel count. Sizes automatic batches on CUDA.
    activation_bytes_per_megapixel: ClassVar[int] = 4 << 30

    identity: ModelIdentity  # what produced the images: hub id or path, and revision
    runtime: Runtime
    compiled: bool = False  # the denoiser runs under torch.compile

    @property
    def needs_warm_up(self) -> bool:
        """Whether the first call of a batch shape pays one-time costs worth keeping out of
        ``elapsed_ms``: CUDA (kernel loading, cuBLAS/cuDNN selection) and compiled models."""
        return self.runtime.is_cuda or self.compiled

    def warm_up(self, batch: Sequence[ImageRequest]) -> None:
        """An untimed call shaped like ``batch`` with at most two steps; its images are dropped.
        The tensors' shapes do not depend on the step count."""
        self.generate([replace(r, steps=min(r.steps, 2)) for r in batch])

    @classmethod
    @abc.abstractmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool, compile: bool = False,
             digests: DigestCache | None = None, cpu_offload: bool = False) -> Engine:
        """Load weights from a hub id or a local directory; raise MissingWeightsError if absent.
        ``digests`` remembers weight hashes between runs. ``cpu_offload``: on CUDA, each model
        comes onto the GPU only for its own forward pass (diffusers' model CPU offload); no effect
        on a CPU."""

    @classmethod
    def _pipeline_class(cls) -> type:
        """The diffusers pipeline class that loads the releases (its ``download`` fetches them)."""
        raise NotImplementedError

    @classmethod
    def _resolve(cls, location: str, *, offline: bool) -> str:
        """The local directory of the pipeline at ``location`` (downloading it unless ``offline``):
        a diffusers directory (it has ``model_index.json``) or a hub id."""
        checked = check_location(cls.name, location, cls.setting)
        if is_local(checked):
            if not (Path(checked) / "model_index.json").is_file():
                raise MissingWeightsError(
                    f"{cls.name}: {location!r} is not a diffusers {cls.pipeline_name} directory (no "
                    f"model_index.json); set {cls.setting} to such a directory or to a Hugging Face hub id"
                )
            return checked
        try:
            return cls._pipeline_class().download(checked, local_files_only=offline)
        except hub_errors() as exc:
            raise missing_weights(cls.name, location, cls.setting, exc) from exc

    @classmethod
    def check_available(cls, location: str, *, locations: Mapping[str, str] | None = None) -> None:
        """Without loading or going online: the weights at ``location`` are on this machine (a
        pipeline directory, or the Hugging Face cache); MissingWeightsError naming the setting
        otherwise. ``locations``: every configured location by model key (second weights)."""
        cls._resolve(location, offline=True)

    @classmethod
    def identify_weights(cls, location: str, *, digests: DigestCache | None = None) -> ModelIdentity | None:
        """The identity ``load`` would give these weights, without loading them or going online;
        None when it cannot be told (weights not on this machine). Lets a run check that existing
        images were made by the configured model before deciding that nothing needs the GPU."""
        try:
            resolved = cls._resolve(location, offline=True)
        except MissingWeightsError:
            return None
        return identify(location, resolved, digests)

    @abc.abstractmethod
    def generate(self, batch: Sequence[ImageRequest]) -> list[PIL.Image.Image]:
        """Make the images of one batch (a group from ``plan_batches``), in order."""

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the model and hand its memory back."""

    @classmethod
    @abc.abstractmethod
    def build_tiny(cls, directory: Path) -> None:
        """Write a tiny random-weight model that ``load`` accepts, for tests."""

    @classmethod
    @abc.abstractmethod
    def build_random_full(cls, directory: Path) -> None:
        """Write the full-size architecture with random weights, for timing and memory checks."""

    def batch_size_for(self, width: int, height: int) -> int:
        """Images per call at this size when the run does not fix it: 1 on a CPU, where a batch
        is no faster than its images one by one; on CUDA as many as fit in half the free memory,
        at most ``MAX_CUDA_BATCH`` (512x512 on an 80 GB card: 16)."""
        per_image = self.activation_bytes_per_megapixel * width * height // (1024 * 1024)
        return device_batch_size(self.runtime, per_image, cpu=1, most=MAX_CUDA_BATCH)

    @classmethod
    def batch_key(cls, request: ImageRequest) -> Hashable:
        """Requests with equal keys may share a batch. Engines widen this to what one call must share."""
        return (request.steps, request.width, request.height, request.scheduler)

    @classmethod
    def plan_batches(
        cls, requests: Sequence[ImageRequest], max_batch: int | Callable[[ImageRequest], int]
    ) -> list[list[ImageRequest]]:
        """Group requests that may share a batch, in order of first appearance, in chunks of
        ``max_batch`` (a number, or a function of a group's first request, such as
        ``lambda r: engine.batch_size_for(r.width, r.height)``).

        A class method: a run can plan (and count) its batches before any weights load.
        """
        if callable(max_batch):
            size_of = max_batch
        else:
            fixed = _batch_size(max_batch)
            size_of = lambda _request: fixed  # noqa: E731
        groups: dict[Hashable, list[ImageRequest]] = {}
        for request in requests:
            groups.setdefault(cls.batch_key(request), []).append(request)
        batches = []
        for group in groups.values():
            size = _batch_size(size_of(group[0]))
            batches += [group[i : i + size] for i in range(0, len(group), size)]
        return batches

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
