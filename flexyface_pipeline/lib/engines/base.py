"""What every text-to-image engine offers: load weights, plan batches, generate, close.

An engine is one model family behind one loading path. Real weights (a hub id or a local
directory) and the random-weight test models of the same classes load through the same
``load``; ``build_tiny`` / ``build_random_full`` write those test models.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import PIL.Image

from flexyface_pipeline.lib.models.common import DigestCache, ModelIdentity, Runtime, device_batch_size

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
    guidance: float
    seed: int
    width: int
    height: int

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
        guidance = float(self.guidance)
        if not math.isfinite(guidance) or guidance < 0:
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


class Engine(abc.ABC):
    """A loaded text-to-image model. Subclasses set the three class attributes and the methods."""

    name: ClassVar[str]  # registry key, the value of the sweep's ``engine`` column
    default_model: ClassVar[str]  # hub id of the weights used when nothing else is configured
    setting: ClassVar[str]  # environment variable that points the engine at other weights

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
             digests: DigestCache | None = None) -> Engine:
        """Load weights from a hub id or a local directory; raise MissingWeightsError if absent.
        ``digests`` remembers weight hashes between runs."""

    @classmethod
    def identify_weights(cls, location: str, *, digests: DigestCache | None = None) -> ModelIdentity | None:
        """The identity ``load`` would give these weights, without loading them or going online;
        None when it cannot be told (weights not on this machine). Lets a run check that existing
        images were made by the configured model before deciding that nothing needs the GPU."""
        return None

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
        return (request.steps, request.width, request.height)

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
