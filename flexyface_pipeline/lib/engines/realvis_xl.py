"""RealVisXL, a Stable Diffusion XL fine-tune, through diffusers' ``StableDiffusionXLPipeline``.

Batches hold images of one step count, one size and one guidance mode, each image with its own
prompt, seed and guidance scale:

* one ``torch.Generator`` per image, seeded from its row, so an image does not depend on the batch
  it ran in (up to the last bits of batched arithmetic);
* per-image classifier-free guidance: diffusers combines the two noise predictions with a single
  float; ``GuidanceScales`` (``guidance.py``) makes that combination use one scale per image with
  the same float32 arithmetic and rounding, so each image is what diffusers makes for it alone;
* diffusers runs a scale <= 1 without classifier-free guidance (a single, text-conditioned UNet
  pass), so such images never share a batch with guided ones (``batch_key``).

diffusers is imported when a model loads: importing the engine registry stays cheap.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

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


@functools.cache
def _pipeline_class() -> type:
    """``StableDiffusionXLPipeline`` that also takes a list of per-image guidance scales."""
    from diffusers import StableDiffusionXLPipeline

    class PerImageGuidanceSDXLPipeline(StableDiffusionXLPipeline):
        _per_image_guidance: GuidanceScales | None = None

        @property
        def guidance_scale(self) -> Any:
            if self._per_image_guidance is not None:
                return self._per_image_guidance
            return self._guidance_scale

        def __call__(self, *args: Any, guidance_scale: float | Sequence[float] = 5.0, **kwargs: Any) -> Any:
            if isinstance(guidance_scale, (int, float)):
                return super().__call__(*args, guidance_scale=guidance_scale, **kwargs)
            scales = [float(g) for g in guidance_scale]
            guided = {uses_cfg(g) for g in scales}
            if len(guided) != 1:
                raise ValueError(
                    "guidance scales of one batch must all be > 1 or all be <= 1: diffusers runs a scale "
                    f"<= 1 without classifier-free guidance; got {scales}"
                )
            if not guided.pop():
                # No guidance: the scale is not used at all.
                return super().__call__(*args, guidance_scale=max(scales), **kwargs)
            if self.unet.config.time_cond_proj_dim is not None:
                raise ValueError("per-image guidance scales are not supported for guidance-embedding UNets")
            if kwargs.get("num_images_per_prompt", 1) != 1:
                raise ValueError("per-image guidance scales need num_images_per_prompt=1")
            if kwargs.get("guidance_rescale", 0.0):
                raise ValueError("per-image guidance scales do not support guidance_rescale")
            scale_tensor = torch.tensor(scales, dtype=torch.float32, device=self._execution_device)
            self._per_image_guidance = GuidanceScales(scale_tensor)
            try:
                return super().__call__(*args, guidance_scale=max(scales), **kwargs)
            finally:
                self._per_image_guidance = None

    return PerImageGuidanceSDXLPipeline


class RealVisXLEngine(Engine):
    """RealVisXL (any SDXL pipeline in diffusers format) on one device."""

    name = "realvis_xl"
    default_model = "SG161222/RealVisXL_V5.0"
    setting = "FLEXYFACE_REALVIS_XL_MODEL"
    pipeline_name = "SDXL pipeline"

    steps_limits = (4, 60)
    default_steps = (8, 48)
    guidance_kind = "cfg"
    guidance_limits = (0.5, 12.0)
    default_guidance = (1.0, 8.0)
    size_multiple = 8
    # Sampler names (as in the usual SDXL front ends) -> diffusers scheduler class and settings,
    # built from the model's own scheduler config (``Scheduler.from_config``).
    schedulers = {
        "Euler": ("EulerDiscreteScheduler", {}),
        "Euler a": ("EulerAncestralDiscreteScheduler", {}),
        "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
        "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        "UniPC": ("UniPCMultistepScheduler", {}),
        "DDIM": ("DDIMScheduler", {}),
    }

    def __init__(self, pipeline: Any, runtime: Runtime, identity: ModelIdentity) -> None:
        self._pipeline = pipeline
        self.runtime = runtime
        self.identity = identity
        self._own_scheduler = pipeline.scheduler if pipeline is not None else None
        self._schedulers: dict[str, Any] = {}

    def _use_scheduler(self, name: str | None) -> None:
        """Put the scheduler ``name`` (None: the model's own) into the pipeline for the next call."""
        if name is None:
            self.pipeline.scheduler = self._own_scheduler
            return
        if name not in self.schedulers:
            raise ValueError(f"{self.name}: unknown scheduler {name!r}; known: {list(self.schedulers)}")
        if name not in self._schedulers:
            import diffusers

            class_name, settings = self.schedulers[name]
            self._schedulers[name] = getattr(diffusers, class_name).from_config(self._own_scheduler.config, **settings)
        self.pipeline.scheduler = self._schedulers[name]

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def _pipeline_class(cls) -> type:
        return _pipeline_class()

    @classmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool, compile: bool = False,
             digests: DigestCache | None = None, cpu_offload: bool = False) -> RealVisXLEngine:
        resolved = cls._resolve(location, offline=offline)
        pipeline_class = _pipeline_class()
        start = time.perf_counter()
        try:
            # low_cpu_mem_usage (accelerate): the weights are placed into empty modules instead of
            # overwriting a full random initialisation. No watermark: images are scored, and the
            # invisible watermark would change pixels depending on whether its package is installed.
            pipeline = pipeline_class.from_pretrained(
                resolved, dtype=runtime.dtype, local_files_only=offline, low_cpu_mem_usage=True,
                add_watermarker=False,
            )
        except hub_errors() as exc:
            raise MissingWeightsError(
                f"{cls.name}: cannot load the SDXL pipeline at {location!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200]}); set {cls.setting} to a complete pipeline"
            ) from exc
        if cpu_offload and runtime.is_cuda:
            pipeline.enable_model_cpu_offload(device=runtime.device)
        else:
            if cpu_offload:
                logger.info("%s: cpu_offload has no effect on %s", cls.name, runtime.device)
            pipeline.to(runtime.device)
        # The original SDXL VAE overflows float16 (activations beyond 65504 become inf/NaN: black
        # images); its config says so with force_upcast=True, and it decodes in float32. VAEs fixed
        # for float16 (madebyollin/sdxl-vae-fp16-fix) say force_upcast=False and stay in float16.
        # bfloat16 has float32's exponent range, and float32 needs nothing: both keep the runtime dtype.
        # The VAE stays in float32 for good instead of being cast back and forth on every batch
        # (torch's own ``to``: diffusers' ModelMixin.to warns on any dtype cast).
        if runtime.dtype == torch.float16 and getattr(pipeline.vae.config, "force_upcast", False):
            torch.nn.Module.to(pipeline.vae, dtype=torch.float32)
        pipeline.set_progress_bar_config(disable=True)
        if compile:
            # Compiles at the first call of each input shape (batch size, size, guidance mode);
            # generate_sweep makes that call untimed (Engine.warm_up).
            pipeline.unet.compile()
        identity = identify(location, resolved, digests)
        logger.info(
            "%s: loaded %s (%s) on %s in %s (VAE %s) in %.1f s%s",
            cls.name, identity.model_id, identity.revision, runtime.device, runtime.dtype,
            pipeline.vae.dtype, time.perf_counter() - start, ", UNet compiled" if compile else "",
        )
        engine = cls(pipeline, runtime, identity)
        engine.compiled = compile
        return engine

    # -- generation ----------------------------------------------------------------------------

    @classmethod
    def batch_key(cls, request: ImageRequest) -> Hashable:
        if request.guidance is None:
            raise ValueError(f"{request.image_id}: {cls.name} needs a guidance value (classifier-free guidance scale)")
        return (request.steps, request.width, request.height, uses_cfg(request.guidance), request.scheduler)

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            raise RuntimeError(f"{self.name}: the engine is closed")
        return self._pipeline

    def _check_batch(self, batch: Sequence[ImageRequest]) -> list[ImageRequest]:
        batch = list(batch)
        if not batch:
            raise ValueError("generate: the batch is empty")
        keys = {self.batch_key(r) for r in batch}
        if len(keys) != 1:
            raise ValueError(
                "generate: a batch must share steps, size, guidance mode (> 1 or <= 1) and scheduler; "
                f"got {sorted(keys, key=str)} — group requests with plan_batches"
            )
        return batch

    def generate_arrays(self, batch: Sequence[ImageRequest]) -> np.ndarray:
        """The batch's images as float32 RGB in [0, 1], shape (N, height, width, 3)."""
        batch = self._check_batch(batch)
        pipeline = self.pipeline
        first = batch[0]
        generators = [torch.Generator(device=self.runtime.device).manual_seed(r.seed) for r in batch]
        scales = [r.guidance for r in batch]
        self._use_scheduler(first.scheduler)
        start = time.perf_counter()
        latents = pipeline(
            prompt=[r.prompt for r in batch],
            num_inference_steps=first.steps,
            guidance_scale=scales[0] if len(set(scales)) == 1 else scales,
            width=first.width,
            height=first.height,
            generator=generators,
            output_type="latent",
        ).images
        images, finite = self._decode(latents)
        bad = [r.image_id for r, ok in zip(batch, finite) if not ok]
        if bad:
            raise RuntimeError(
                f"{self.name}: non-finite pixel values in {bad} ({self.runtime.dtype}); the model overflowed "
                "this dtype — try bf16 or fp32"
            )
        logger.debug(
            "%s: %d images, %d steps, %dx%d in %.2f s",
            self.name, len(batch), first.steps, first.width, first.height, time.perf_counter() - start,
        )
        return images

    def generate(self, batch: Sequence[ImageRequest]) -> list[PIL.Image.Image]:
        """The batch's images as RGB PIL images, in the order of ``batch``."""
        images = self.generate_arrays(batch)
        return self.pipeline.image_processor.numpy_to_pil(images)

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> tuple[np.ndarray, list[bool]]:
        """VAE-decode one image at a time (bounded memory; a batch decodes as its images would
        alone). Returns the images and, per image, whether the decoder's output was finite
        (checked before postprocessing, whose clamp turns inf into white or black)."""
        vae = self.pipeline.vae
        config = vae.config
        latents = latents.to(dtype=vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean_t = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std_t / config.scaling_factor + mean_t
        else:
            latents = latents / config.scaling_factor
        decoded = torch.cat([vae.decode(latent[None], return_dict=False)[0] for latent in latents])
        finite = torch.isfinite(decoded).flatten(1).all(dim=1).tolist()
        return self.pipeline.image_processor.postprocess(decoded, output_type="np"), finite

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline = None
            free_memory(self.runtime.device)

    # -- test models ---------------------------------------------------------------------------

    @classmethod
    def build_tiny(cls, directory: Path) -> None:
        from flexyface_pipeline.lib.models.sdxl_builders import build_tiny_sdxl

        build_tiny_sdxl(directory)

    @classmethod
    def build_random_full(cls, directory: Path, *, dtype: torch.dtype = torch.bfloat16) -> None:
        from flexyface_pipeline.lib.models.sdxl_builders import build_random_full_sdxl

        build_random_full_sdxl(directory, dtype=dtype)
