"""What every image metric shares: the scorer interface, input checks and weight resolution.

A scorer loads its model once (``Scorer.load``) and then scores batches of PIL images against
their prompts (``Scorer.score``). The same classes load real weights (a hub id or a local
directory) and the tiny / full-size random-weight models that ``build_tiny`` and
``build_random_full`` write, through the same loading path.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import PIL.Image
import torch

from flexyface_pipeline.lib.models.common import (
    MissingWeightsError,
    ModelIdentity,
    Runtime,
    check_location,
    free_memory,
    identify,
    is_local,
    missing_weights,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


def check_prompts(prompts: Sequence[str]) -> None:
    """Every prompt must be a non-empty string."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i}: expected a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"prompt {i} is empty; every image needs the prompt it was generated from")


def check_inputs(images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> None:
    """Validate a scoring request before any model work."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    for i, image in enumerate(images):
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"image {i}: expected a PIL image, got {type(image).__name__}")
    check_prompts(prompts)


def as_rgb(images: Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def prompt_index(prompts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts (first-seen order) and, per image, the index of its prompt among them."""
    order: dict[str, int] = {}
    idx = [order.setdefault(p, len(order)) for p in prompts]
    return list(order), torch.tensor(idx, dtype=torch.long)


def hf_call(model: str, location: str, setting: str, load: Callable[[], T]) -> T:
    """Run a Hugging Face loader; a hub id that cannot be resolved becomes a MissingWeightsError."""
    try:
        return load()
    except OSError as err:
        if is_local(location):
            raise
        raise missing_weights(model, location, setting, err) from err


def hf_identity(location: str, filename: str = "config.json") -> ModelIdentity:
    """Identity of weights loaded with ``from_pretrained``: local path + digest, or hub id + commit."""
    if is_local(location):
        return identify(location)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(location, filename)
    resolved = str(Path(cached).parent) if isinstance(cached, str) else None
    return identify(location, resolved)


def tensors_digest(state: dict[str, torch.Tensor], extra: dict | None = None) -> str:
    """SHA-256 over named tensors (name, dtype, shape, bytes) and an optional JSON-able dict."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Scorer(abc.ABC):
    """One image metric with its model loaded. Scores are float64, one per (image, prompt)."""

    metric: ClassVar[str]  # export column
    column_prefix: ClassVar[str]  # provenance columns: <prefix>_model, <prefix>_model_revision
    default_model: ClassVar[str]  # hub id
    setting: ClassVar[str]  # environment variable users set to override the model location
    title: ClassVar[str]  # human name used in messages
    higher_is_better: ClassVar[bool] = True
    bounds: ClassVar[tuple[float | None, float | None]] = (None, None)

    def __init__(self, identity: ModelIdentity, runtime: Runtime) -> None:
        self.identity = identity
        self.runtime = runtime
        self._closed = False

    @classmethod
    @abc.abstractmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool) -> Scorer:
        """Load the model from a hub id or a local path (checked before anything loads)."""

    @classmethod
    def check(cls, location: str) -> str:
        """Validate ``location`` (hub id or existing path) and return it normalised."""
        return check_location(cls.title, location, cls.setting)

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Score one batch: ``images[i]`` against ``prompts[i]``."""
        check_inputs(images, prompts)
        if self._closed:
            raise RuntimeError(f"{self.title} scorer was closed")
        if not images:
            return np.empty(0, dtype=np.float64)
        with torch.inference_mode():
            values = self._score(as_rgb(images), list(prompts))
        return values.detach().to("cpu", torch.float64).numpy()

    @abc.abstractmethod
    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> torch.Tensor:
        """One score per image, any float dtype, any device."""

    def columns(self) -> dict[str, str]:
        """Provenance columns for rows this scorer produced."""
        return self.identity.as_columns(self.column_prefix)

    def close(self) -> None:
        """Release the model and hand its memory back."""
        if self._closed:
            return
        self._release()
        self._closed = True
        free_memory(self.runtime.device)

    @abc.abstractmethod
    def _release(self) -> None:
        """Drop references to the model and its helpers."""

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    @abc.abstractmethod
    def build_tiny(cls, directory: Path) -> None:
        """Write a tiny random-weight model of the same classes, loadable with ``load``."""

    @classmethod
    @abc.abstractmethod
    def build_random_full(cls, directory: Path) -> None:
        """Write the published full-size architecture with random weights, in the real file format."""


class ImageEmbedder(abc.ABC):
    """A scorer built on the CLIP ViT-L/14 image tower.

    Scorers whose ``vision_digest`` is equal compute identical image embeddings, so a caller can
    compute ``image_embeddings`` once and hand them to ``score_from_embeddings`` of the others.
    """

    @property
    @abc.abstractmethod
    def vision_digest(self) -> str:
        """SHA-256 over the image tower's tensors (as loaded) and the image preprocessing settings."""

    @abc.abstractmethod
    def image_embeddings(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """L2-normalised projected image embeddings, float32, one row per image."""


__all__ = [
    "ImageEmbedder",
    "MissingWeightsError",
    "Scorer",
    "check_inputs",
    "check_prompts",
    "hf_call",
    "hf_identity",
    "prompt_index",
    "tensors_digest",
]
