"""What the diffusion-transformer engines (FLUX.1, SD 3.5, HiDream-I1, FLUX.2) share.

Their text encoders are large (T5-XXL 4.8 B parameters, Llama-3.1-8B, Mistral-Small-24B), often larger
than the transformer, and a sweep has few distinct prompts and many images. So the text encoders
run first (``prepare_prompts``): every distinct prompt is encoded once with the pipeline's own
``encode_prompt``, the embeddings are kept in host memory, and the encoders leave the device
before the transformer and the VAE come onto it. Batches then call the pipeline with the
embeddings. A prompt that was not prepared is encoded when a batch needs it, by the same swap
(denoiser off the device, encoders on, encode, encoders off): correct, only slower. The device
never holds a text encoder and the transformer at once, so the peak is the larger of the two
stages, not their sum (``benchmarks/engine_memory.py``).

With ``cpu_offload`` (CUDA only) diffusers' ``enable_model_cpu_offload`` moves each model onto the
device for its own forward pass instead; placement is then diffusers' business.

Each image has its own seeded ``torch.Generator``, so an image does not depend on its batch (up to
the last bits of batched arithmetic). Guidance per image: see ``PerImageCFGMixin`` (classifier-free
guidance) and ``PerImageEmbeddedGuidanceMixin`` (a guidance value the transformer embeds).

diffusers is imported when a model loads: importing the engine registry stays cheap.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from flexyface_pipeline.lib.engines.base import Engine, ImageRequest
from flexyface_pipeline.lib.engines.guidance import GuidanceScales, uses_cfg
from flexyface_pipeline.lib.models.common import (
    DigestCache,
    MissingWeightsError,
    ModelIdentity,
    Runtime,
    free_memory,
    hub_errors,
    identify,
)

logger = logging.getLogger(__name__)

ENCODE_BATCH = 8  # prompts per text-encoder call
PARKED = torch.device("cpu")  # where models wait while another stage has the device
NEGATIVE_PROMPT = ""  # what diffusers' CFG pipelines use as the unconditional prompt


class PinnedDeviceMixin:
    """Pipelines whose models sit on different devices on purpose (text encoders parked on the CPU,
    transformer on the GPU): intermediate tensors go to ``pinned_device`` instead of the device of
    the first registered model."""

    pinned_device: torch.device | None = None

    @property
    def _execution_device(self) -> torch.device:
        if self.pinned_device is not None:
            return self.pinned_device
        return super()._execution_device  # type: ignore[misc]


class PerImageCFGMixin:
    """Classifier-free-guidance pipelines (SD3, HiDream) that also take a list of scales, one per
    image. diffusers runs a scale <= 1 without CFG, so a batch's scales must all be > 1 or all <= 1."""

    per_image_guidance: GuidanceScales | None = None

    @property
    def guidance_scale(self) -> Any:
        if self.per_image_guidance is not None:
            return self.per_image_guidance
        return self._guidance_scale  # type: ignore[attr-defined]

    def __call__(self, *args: Any, guidance_scale: float | Sequence[float] = 5.0, **kwargs: Any) -> Any:
        if isinstance(guidance_scale, (int, float)):
            return super().__call__(*args, guidance_scale=guidance_scale, **kwargs)  # type: ignore[misc]
        scales = [float(g) for g in guidance_scale]
        guided = {uses_cfg(g) for g in scales}
        if len(guided) != 1:
            raise ValueError(
                "guidance scales of one batch must all be > 1 or all be <= 1: diffusers runs a scale "
                f"<= 1 without classifier-free guidance; got {scales}"
            )
        if not guided.pop():
            return super().__call__(*args, guidance_scale=max(scales), **kwargs)  # type: ignore[misc]
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise ValueError("per-image guidance scales need num_images_per_prompt=1")
        if kwargs.get("skip_guidance_layers"):
            raise ValueError("per-image guidance scales do not support skip_guidance_layers")
        self.per_image_guidance = GuidanceScales(torch.tensor(scales, dtype=torch.float32))
        try:
            return super().__call__(*args, guidance_scale=max(scales), **kwargs)  # type: ignore[misc]
        finally:
            self.per_image_guidance = None


class PerImageEmbeddedGuidanceMixin:
    """Guidance-distilled pipelines (FLUX.2) that also take a list of guidance values, one per image.
    The pipeline builds ``guidance = torch.full([1], guidance_scale, float32).expand(batch)`` and
    passes it to the transformer; a forward pre-hook replaces it with the (B,) float32 tensor of
    the batch's values, the same numbers a single-image call embeds."""

    def __call__(self, *args: Any, guidance_scale: float | Sequence[float] = 4.0, **kwargs: Any) -> Any:
        if isinstance(guidance_scale, (int, float)):
            return super().__call__(*args, guidance_scale=guidance_scale, **kwargs)  # type: ignore[misc]
        scales = torch.tensor([float(g) for g in guidance_scale], dtype=torch.float32)
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise ValueError("per-image guidance values need num_images_per_prompt=1")

        def per_image(_module: Any, args: tuple, hook_kwargs: dict) -> tuple[tuple, dict]:
            guidance = hook_kwargs.get("guidance")
            if guidance is None or guidance.shape[0] != scales.shape[0]:
                raise RuntimeError(f"expected a guidance tensor of {scales.shape[0]} values, got {guidance}")
            return args, hook_kwargs | {"guidance": scales.to(guidance.device, guidance.dtype)}

        handle = self.transformer.register_forward_pre_hook(per_image, with_kwargs=True)  # type: ignore[attr-defined]
        try:
            return super().__call__(*args, guidance_scale=float(scales[0]), **kwargs)  # type: ignore[misc]
        finally:
            handle.remove()


def _scheduler_of(request: ImageRequest) -> str | None:
    """The request's scheduler name; None: the model's own (the only one these engines run)."""
    return getattr(request, "scheduler", None) or None


class TextFirstEngine(Engine):
    """A diffusers text-to-image pipeline whose text encoders run before, not beside, the denoiser.

    Subclasses set the class attributes below and implement ``_pipeline_class``, ``_encode`` and
    ``_call_kwargs``.
    """

    pipeline_name: ClassVar[str]  # the diffusers pipeline class of the releases (model_index.json)
    text_encoders: ClassVar[tuple[str, ...]]  # pipeline components that only encode prompts
    denoisers: ClassVar[tuple[str, ...]] = ("transformer", "vae")
    max_sequence_length: ClassVar[int]
    size_multiple = 16  # VAE 8x downsampling x 2x2 patches
    # Dimension along which a prompt's embedding tensors are batched, where it is not 0.
    batch_dims: ClassVar[dict[str, int]] = {}
    # Weights loaded from a second location: ``load`` keyword -> ModelResource location key.
    extra_locations: ClassVar[dict[str, str]] = {}

    def __init__(self, pipeline: Any, runtime: Runtime, identity: ModelIdentity, *, offloaded: bool = False) -> None:
        self._pipeline = pipeline
        self.runtime = runtime
        self.identity = identity
        self.offloaded = offloaded  # diffusers' model CPU offload places the models
        self._embeddings: dict[str, dict[str, torch.Tensor]] = {}  # prompt -> its embeddings, on PARKED
        self.resident: set[str] = set()  # components on runtime.device (when not offloaded)
        self.encode_calls = 0  # text-encoder passes so far (prepare_prompts and on-demand)
        if not offloaded:
            pipeline.pinned_device = runtime.device

    # -- subclass hooks ------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Each prompt's embeddings (batch dimension of size 1) from the pipeline's ``encode_prompt``."""
        raise NotImplementedError

    def _call_kwargs(self, batch: list[ImageRequest], embeddings: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Pipeline arguments for ``batch`` besides size, steps and generators."""
        raise NotImplementedError

    @classmethod
    def _check_pipeline(cls, pipeline: Any, location: str) -> None:
        """Refuse weights this engine cannot run as documented."""

    @classmethod
    def _extra_components(cls, resolved: str, runtime: Runtime, *, offline: bool, **options: Any) -> dict[str, Any]:
        """Components loaded from elsewhere than the pipeline directory (HiDream's Llama)."""
        return {}

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool, compile: bool = False,
             digests: DigestCache | None = None, cpu_offload: bool = False, **options: Any) -> TextFirstEngine:
        resolved = cls._resolve(location, offline=offline)
        start = time.perf_counter()
        extra = cls._extra_components(resolved, runtime, offline=offline, **options)
        try:
            # Loaded into host memory; prepare_prompts and generate move the stages onto the device.
            pipeline = cls._pipeline_class().from_pretrained(
                resolved, dtype=runtime.dtype, local_files_only=offline, low_cpu_mem_usage=True, **extra,
            )
        except hub_errors() as exc:
            raise MissingWeightsError(
                f"{cls.name}: cannot load the {cls.pipeline_name} at {location!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); set {cls.setting} to a complete pipeline"
            ) from exc
        cls._check_pipeline(pipeline, location)
        pipeline.set_progress_bar_config(disable=True)
        offloaded = False
        if cpu_offload:
            if runtime.is_cuda:
                pipeline.enable_model_cpu_offload(device=runtime.device)
                offloaded = True
            else:
                logger.info("%s: cpu_offload has no effect on %s (models already live in host memory)",
                            cls.name, runtime.device)
        if compile:
            pipeline.transformer.compile()
        identity = identify(location, resolved, digests)
        logger.info(
            "%s: loaded %s (%s) in %s in %.1f s%s%s",
            cls.name, identity.model_id, identity.revision, runtime.dtype, time.perf_counter() - start,
            ", model CPU offload" if offloaded else "", ", transformer compiled" if compile else "",
        )
        engine = cls(pipeline, runtime, identity, offloaded=offloaded)
        engine.compiled = compile
        return engine

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            raise RuntimeError(f"{self.name}: the engine is closed")
        return self._pipeline

    # -- placement -----------------------------------------------------------------------------

    def _place(self, on_device: Iterable[str]) -> None:
        """Put the components ``on_device`` on the runtime device and every other model off it
        (parked first, so the device never holds both stages)."""
        if self.offloaded:
            return
        wanted = set(on_device)
        pipeline = self.pipeline
        models = [n for n in (*self.text_encoders, *self.denoisers) if getattr(pipeline, n, None) is not None]
        for name in models:  # park first: memory is freed before anything else arrives
            if name in self.resident and name not in wanted:
                getattr(pipeline, name).to(PARKED)
                self.resident.discard(name)
        if self.runtime.is_cuda:
            free_memory(self.runtime.device)
        for name in models:
            if name in wanted and name not in self.resident:
                getattr(pipeline, name).to(self.runtime.device)
                self.resident.add(name)

    # -- prompts -------------------------------------------------------------------------------

    def _prompts_needed(self, prompts: Iterable[str]) -> list[str]:
        needed = list(dict.fromkeys(prompts))
        if self.uses_guidance() and self.guidance_kind == "cfg":
            needed.append(NEGATIVE_PROMPT)
        return [p for p in dict.fromkeys(needed) if p not in self._embeddings]

    def prepare_prompts(self, prompts: Sequence[str]) -> None:
        """Encode every distinct prompt once (and the empty negative prompt of CFG engines), then
        move the text encoders off the device."""
        todo = self._prompts_needed(prompts)
        if todo:
            self._encode_all(todo)

    @torch.no_grad()
    def _encode_all(self, prompts: list[str]) -> None:
        start = time.perf_counter()
        self._place(self.text_encoders)
        for i in range(0, len(prompts), ENCODE_BATCH):
            chunk = prompts[i : i + ENCODE_BATCH]
            for prompt, embeddings in zip(chunk, self._encode(chunk), strict=True):
                self._embeddings[prompt] = {k: v.to(PARKED) for k, v in embeddings.items()}
            self.encode_calls += 1
        self._place(())
        logger.info("%s: encoded %d prompts in %.1f s; text encoders off the device", self.name, len(prompts),
                    time.perf_counter() - start)

    def _batch_embeddings(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        device = self.runtime.device
        first = self._embeddings[prompts[0]]
        return {
            key: torch.cat([self._embeddings[p][key] for p in prompts], dim=self.batch_dims.get(key, 0)).to(device)
            for key in first
        }

    def negative_embeddings(self, count: int) -> dict[str, torch.Tensor]:
        """The unconditional embeddings, repeated ``count`` times, keyed like the prompts'."""
        return self._batch_embeddings([NEGATIVE_PROMPT] * count)

    # -- generation ----------------------------------------------------------------------------

    @classmethod
    def batch_key(cls, request: ImageRequest) -> Hashable:
        if cls.guidance_kind == "cfg":
            return (request.steps, request.width, request.height, uses_cfg(request.guidance))
        return (request.steps, request.width, request.height)

    def _check_batch(self, batch: Sequence[ImageRequest]) -> list[ImageRequest]:
        batch = list(batch)
        if not batch:
            raise ValueError("generate: the batch is empty")
        for request in batch:
            scheduler = _scheduler_of(request)
            if scheduler is not None:
                raise ValueError(f"{self.name}: scheduler {scheduler!r} is not supported; this engine runs the "
                                 "scheduler its weights ship with — leave the scheduler unset")
            if request.width % self.size_multiple or request.height % self.size_multiple:
                raise ValueError(f"{request.image_id}: {self.name} needs width and height that are multiples of "
                                 f"{self.size_multiple}, got {request.width}x{request.height}")
            if self.uses_guidance() and request.guidance is None:
                raise ValueError(f"{request.image_id}: {self.name} needs a guidance value")
        keys = {self.batch_key(r) for r in batch}
        if len(keys) != 1:
            what = "steps, size and guidance mode (> 1 or <= 1)" if self.guidance_kind == "cfg" else "steps and size"
            raise ValueError(f"generate: a batch must share {what}; got {sorted(keys, key=str)} — group requests "
                             "with plan_batches")
        return batch

    def guidance_argument(self, batch: list[ImageRequest]) -> float | list[float]:
        scales = [float(r.guidance) for r in batch]  # type: ignore[arg-type]
        return scales[0] if len(set(scales)) == 1 else scales

    @torch.no_grad()
    def generate_arrays(self, batch: Sequence[ImageRequest]) -> np.ndarray:
        """The batch's images as float32 RGB in [0, 1], shape (N, height, width, 3)."""
        batch = self._check_batch(batch)
        pipeline = self.pipeline
        missing = self._prompts_needed(r.prompt for r in batch)
        if missing:
            logger.info("%s: %d prompts were not prepared; encoding them now", self.name, len(missing))
            self._encode_all(missing)
        self._place(self.denoisers)
        first = batch[0]
        embeddings = self._batch_embeddings([r.prompt for r in batch])
        generators = [torch.Generator(device=self.runtime.device).manual_seed(r.seed) for r in batch]
        finite: list[bool] = []

        def check_finite(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
            finite.extend(torch.isfinite(output).flatten(1).all(dim=1).tolist())

        hook = pipeline.vae.decoder.register_forward_hook(check_finite)
        start = time.perf_counter()
        try:
            images = pipeline(
                num_inference_steps=first.steps, width=first.width, height=first.height, generator=generators,
                output_type="np", **self._call_kwargs(batch, embeddings),
            ).images
        finally:
            hook.remove()
        bad = [r.image_id for r, ok in zip(batch, finite) if not ok]
        if bad:
            raise RuntimeError(f"{self.name}: non-finite pixel values in {bad} ({self.runtime.dtype}); the model "
                               "overflowed this dtype — try bf16 or fp32")
        logger.debug("%s: %d images, %d steps, %dx%d in %.2f s", self.name, len(batch), first.steps, first.width,
                     first.height, time.perf_counter() - start)
        return np.asarray(images, dtype=np.float32)

    def generate(self, batch: Sequence[ImageRequest]) -> list[PIL.Image.Image]:
        images = self.generate_arrays(batch)
        return self.pipeline.image_processor.numpy_to_pil(images)

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline = None
            self._embeddings.clear()
            self.resident.clear()
            free_memory(self.runtime.device)

    # -- test models ---------------------------------------------------------------------------

    @classmethod
    def build_tiny(cls, directory: Path) -> None:
        from flexyface_pipeline.lib.models.dit_builders import build

        build(cls.pipeline_name, directory)

    @classmethod
    def build_random_full(cls, directory: Path, *, dtype: torch.dtype = torch.bfloat16) -> None:
        from flexyface_pipeline.lib.models.dit_builders import build

        build(cls.pipeline_name, directory, full=True, dtype=dtype)


def exact_sample_size(width: int, height: int, vae_scale_factor: int) -> float:
    """A ``default_sample_size`` for which HiDream's area rescaling keeps ``width`` x ``height``."""
    side = math.isqrt(width * height)
    if side * side == width * height and side % vae_scale_factor == 0:
        return side // vae_scale_factor
    return math.sqrt(width * height) * (1 + 1e-9) / vae_scale_factor
