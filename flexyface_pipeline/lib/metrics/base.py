"""What every image metric shares: the scorer interface, input checks and weight resolution.

A scorer loads its model once (``Scorer.load``) and then scores batches of images against their
prompts. Scoring is split in two so that file decoding and preprocessing can run in worker
threads ahead of the model (see ``images.py``):

- ``prepare(image)``: one RGB PIL image to the model's input tensor, on the CPU. No model work,
  safe to call from several threads at once.
- ``score_prepared(pixels, prompts)``: the model work for a stacked batch of prepared images.

``score(images, prompts)`` does both. Models keep float32 weights; with a ``bfloat16`` or
``float16`` runtime the towers run under ``torch.autocast`` and everything after them (the
normalisation, cosine similarities and the small aesthetic heads) runs in float32; scores then
differ from float32 by at most 2e-2 (CLIP score, HPS) and 5e-2 (aesthetic scores), as the tests
check (BENCHMARKS.md has the measured differences). The scoring precision is a setting of its
own (``scoring_runtime``): by default each metric computes as its reference library does, and
scoring sets torch's TF32 flags to its runtime's ``tf32`` while it runs (``tf32_mode``). Each distinct prompt is encoded once per
loaded scorer (``prompt_features``).

The same classes load real weights (a hub id or a local directory) and the tiny / full-size
random-weight models that ``lib/models/scorer_builders.py`` writes, through the same path.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import PIL.Image
import torch

from flexyface_pipeline.lib.models.common import (
    DigestCache,
    MissingWeightsError,
    ModelIdentity,
    Runtime,
    check_cached,
    check_location,
    free_memory,
    identify,
    is_local,
    missing_weights,
    tf32_mode,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CACHED_PROMPTS = 10_000  # prompt features kept per loaded scorer (a few KB each)
PROMPT_BATCH = 256  # prompts per text-tower forward pass


# The scoring precision setting (FLEXYFACE_SCORING_DTYPE): "reference" computes each metric as its
# reference library does (``Scorer.reference_cuda_dtype`` on CUDA, float32 on a CPU, TF32 off);
# "bf16" is bfloat16 autocast with TF32 allowed (the fast option); "fp32" and "fp16" are explicit.
SCORING_DTYPES = ("reference", "bf16", "fp32", "fp16")
_SCORING_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def check_scoring_dtype(value: str, setting: str = "scoring_dtype") -> str:
    """``value`` if it is a scoring precision, else a one-line ValueError naming ``setting``."""
    if value not in SCORING_DTYPES:
        raise ValueError(f"{setting}: expected one of {', '.join(SCORING_DTYPES)}, got {value!r}")
    return value


def scoring_runtime(scorer: type[Scorer], device: torch.device, scoring_dtype: str = "reference") -> Runtime:
    """The runtime ``scorer`` scores on at the precision ``scoring_dtype`` (``SCORING_DTYPES``)."""
    check_scoring_dtype(scoring_dtype)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if scoring_dtype == "reference":
        return Runtime(device, scorer.reference_cuda_dtype if cuda else torch.float32, tf32=False)
    return Runtime(device, _SCORING_TORCH_DTYPES[scoring_dtype], tf32=cuda and scoring_dtype == "bf16")


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


def check_pixels(pixels: torch.Tensor, count: int | None = None) -> None:
    """A stacked batch of prepared images: (images, channels, height, width), floating point."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or not pixels.is_floating_point():
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels: expected a float tensor (images, channels, height, width), got {shape}")
    if count is not None and pixels.shape[0] != count:
        raise ValueError(f"got {pixels.shape[0]} prepared images but {count} prompts; pass one prompt per image")


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


def hf_identity(location: str, filename: str = "config.json", digests: DigestCache | None = None) -> ModelIdentity:
    """Identity of weights loaded with ``from_pretrained``: local path + digest, or hub id + commit."""
    if is_local(location):
        return identify(location, digests=digests)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(location, filename)
    resolved = str(Path(cached).parent) if isinstance(cached, str) else None
    return identify(location, resolved, digests)


def _tensor_sha256(tensor: torch.Tensor) -> str:
    t = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"").hexdigest()


def tensors_digest(state: dict[str, torch.Tensor], extra: dict | None = None, *, workers: int = 8) -> str:
    """SHA-256 over named tensors (name, dtype, shape, SHA-256 of the bytes) and an optional
    JSON-able dict. Tensors are hashed in ``workers`` threads (hashlib releases the GIL)."""
    names = sorted(state)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="digest") as pool:
        hashes = list(pool.map(lambda name: _tensor_sha256(state[name]), names))
    h = hashlib.sha256()
    for name, tensor_hash in zip(names, hashes):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{tensor_hash}|".encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Scorer(abc.ABC):
    """One image metric with its model loaded. Scores are float64, one per (image, prompt)."""

    metric: ClassVar[str]  # export column
    column_prefix: ClassVar[str]  # provenance columns: <prefix>_model, <prefix>_model_revision
    default_model: ClassVar[str]  # hub id
    setting: ClassVar[str]  # environment variable users set to override the model location
    title: ClassVar[str]  # human name used in messages
    higher_is_better: ClassVar[bool] = True
    bounds: ClassVar[tuple[float | None, float | None]] = (None, None)
    # Rough peak activation memory of one image in a reduced-precision forward pass; sizes
    # batches to the free memory of a CUDA device (``images.device_batch_size``).
    activation_bytes_per_image: ClassVar[int] = 64 << 20
    # The compute dtype of the metric's reference implementation on CUDA (scoring_dtype "reference").
    reference_cuda_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, identity: ModelIdentity, runtime: Runtime) -> None:
        self.identity = identity
        self.runtime = runtime
        self._closed = False
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @classmethod
    @abc.abstractmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool, digests: DigestCache | None = None) -> Scorer:
        """Load the model from a hub id or a local path (checked before anything loads);
        ``digests`` remembers weight hashes between runs."""

    @classmethod
    def check_available(cls, location: str, *, locations: Mapping[str, str] | None = None) -> None:
        """Without loading or going online: the weights at ``location`` are on this machine (a local
        path, or the Hugging Face cache); MissingWeightsError naming the setting otherwise."""
        check_cached(cls.title, location, cls.setting)

    @classmethod
    def check(cls, location: str) -> str:
        """Validate ``location`` (hub id or existing path) and return it normalised."""
        return check_location(cls.title, location, cls.setting)

    # -- scoring ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image as the model's float32 input tensor (channels, height, width) on the CPU.

        Thread-safe and free of model work: ``images.score_paths`` calls it from worker threads.
        """

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """Score one batch: ``images[i]`` against ``prompts[i]``."""
        check_inputs(images, prompts)
        self._check_open()
        if not images:
            return np.empty(0, dtype=np.float64)
        return self.score_prepared(torch.stack([self.prepare(im) for im in as_rgb(images)]), prompts)

    def score_prepared(self, pixels: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        """Score a stacked batch of ``prepare`` outputs: ``pixels[i]`` against ``prompts[i]``."""
        check_pixels(pixels, len(prompts))
        check_prompts(prompts)
        self._check_open()
        if not len(prompts):
            return np.empty(0, dtype=np.float64)
        with self._inference():
            values = self._score_pixels(self._to_device(pixels), list(prompts))
        return values.detach().to("cpu", torch.float64).numpy()

    @abc.abstractmethod
    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """One score per image (pixels already on the device), any float dtype, any device."""

    # -- prompts ---------------------------------------------------------------------------------
    def prompt_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 prompt features, one row per prompt, on the model's device.

        Each distinct prompt is encoded once while the scorer is loaded: a sweep has a few
        prompts and many images. Prompts not seen before go through the text tower
        ``PROMPT_BATCH`` at a time. The cache keeps the ``MAX_CACHED_PROMPTS`` most recently
        requested prompts; the result always covers every requested prompt.
        """
        self._check_open()
        cache = self._prompt_cache
        distinct = list(dict.fromkeys(prompts))
        features = {p: cache[p] for p in distinct if p in cache}
        missing = [p for p in distinct if p not in features]
        if missing:
            check_prompts(missing)
            with self._inference():
                for start in range(0, len(missing), PROMPT_BATCH):
                    chunk = missing[start:start + PROMPT_BATCH]
                    features.update(zip(chunk, self._encode_prompts(chunk)))
        # Most recently requested last; the oldest entries go first when the cache is full.
        for p in distinct:
            cache.pop(p, None)
            cache[p] = features[p]
        for p in list(itertools.islice(cache, max(0, len(cache) - MAX_CACHED_PROMPTS))):
            del cache[p]
        return torch.stack([features[p] for p in prompts])

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised float32 features of distinct prompts (metrics that use the prompt)."""
        raise NotImplementedError(f"{self.title} does not use the prompt")

    # -- runtime helpers -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Inference mode, with torch's TF32 flags set to the runtime's for the duration."""
        with torch.inference_mode(), tf32_mode(self.runtime):
            yield

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Reduced-precision autocast for the model towers when the runtime asks for it."""
        if self.runtime.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.runtime.dtype)

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.runtime.device, torch.float32, non_blocking=True)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.title} scorer was closed")

    def row_columns(self, prompts: Sequence[str]) -> dict[str, list]:
        """Per-row provenance columns for images scored against ``prompts`` (none by default)."""
        return {}

    def columns(self) -> dict[str, str | bool]:
        """Provenance columns for rows this scorer produced: model, revision, device, dtype, TF32."""
        return self.identity.as_columns(self.column_prefix) | self.runtime.columns(self.column_prefix)

    def close(self) -> None:
        """Release the model and hand its memory back."""
        if self._closed:
            return
        self._release()
        self._prompt_cache.clear()
        self._closed = True
        free_memory(self.runtime.device)

    @abc.abstractmethod
    def _release(self) -> None:
        """Drop references to the model and its helpers."""

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageEmbedder(abc.ABC):
    """A scorer built on the CLIP ViT-L/14 image tower.

    Scorers whose ``vision_digest`` is equal compute identical image embeddings, so a caller can
    compute ``image_embeddings`` once and hand them to ``score_from_embeddings`` of the others
    (``lib/scoring.py`` keeps them per sweep on disk for exactly that).
    """

    @property
    @abc.abstractmethod
    def vision_digest(self) -> str:
        """SHA-256 over the image tower's tensors (as loaded), its configuration, the image
        preprocessing (settings and class), the compute dtype and, on CUDA, whether TF32 is
        allowed: what decides the embedding of an image file."""

    @abc.abstractmethod
    def prepare(self, image: PIL.Image.Image) -> torch.Tensor:
        """One image as the image tower's float32 input (see ``Scorer.prepare``)."""

    @abc.abstractmethod
    def embed_prepared(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings of a stacked batch of ``prepare`` outputs;
        float32, on the CPU, one row per image."""

    def image_embeddings(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """L2-normalised projected image embeddings, float32 on the CPU, one row per image."""
        for i, image in enumerate(images):
            if not isinstance(image, PIL.Image.Image):
                raise ValueError(f"image {i}: expected a PIL image, got {type(image).__name__}")
        if not images:
            raise ValueError("image_embeddings: no images")
        return self.embed_prepared(torch.stack([self.prepare(im) for im in as_rgb(images)]))

    @abc.abstractmethod
    def score_from_embeddings(self, embeddings: torch.Tensor | np.ndarray,
                              prompts: Sequence[str] | None = None) -> np.ndarray:
        """Scores (float64) from L2-normalised embeddings of a scorer with an equal ``vision_digest``.

        Only the cheap part runs: the prompt side for CLIP score, the head for the aesthetic
        predictors (which ignore ``prompts``).
        """


def as_embeddings(embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validate a (images x dims) embedding matrix and return it as a float32 tensor."""
    if isinstance(embeddings, np.ndarray):
        embeddings = torch.from_numpy(embeddings)
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2:
        shape = tuple(embeddings.shape) if hasattr(embeddings, "shape") else type(embeddings).__name__
        raise ValueError(f"embeddings: expected a 2-D tensor (images x dims), got shape {shape}")
    return embeddings.float()


__all__ = [
    "SCORING_DTYPES",
    "ImageEmbedder",
    "MissingWeightsError",
    "Scorer",
    "as_embeddings",
    "check_inputs",
    "check_pixels",
    "check_prompts",
    "check_scoring_dtype",
    "dtype_name",
    "hf_call",
    "hf_identity",
    "prompt_index",
    "scoring_runtime",
    "tensors_digest",
]
