"""FLUX.1 [schnell], a timestep-distilled rectified-flow transformer, through diffusers' ``FluxPipeline``.

No guidance: schnell has no guidance embedding and is not run with classifier-free guidance
(diffusers' FLUX docs: "guidance_scale needs to be 0", "max_sequence_length cannot be more than
256"; the model card's example uses 4 steps). Requests carry ``guidance=None``; a value, if given,
is ignored. Text encoders: CLIP ViT-L (pooled) and T5-XXL, run first (``TextFirstEngine``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from flexyface_pipeline.lib.engines.base import ImageRequest
from flexyface_pipeline.lib.engines.dit import PinnedDeviceMixin, TextFirstEngine


@functools.cache
def _pipeline_class() -> type:
    from diffusers import FluxPipeline

    class TextFirstFluxPipeline(PinnedDeviceMixin, FluxPipeline):
        pass

    return TextFirstFluxPipeline


class Flux1SchnellEngine(TextFirstEngine):
    """FLUX.1 [schnell] (any timestep-distilled FLUX.1 pipeline in diffusers format) on one device."""

    name = "flux1_schnell"
    default_model = "black-forest-labs/FLUX.1-schnell"
    setting = "FLEXYFACE_FLUX1_SCHNELL_MODEL"
    pipeline_name = "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    max_sequence_length = 256

    steps_limits = (1, 8)
    default_steps = (1, 4)
    guidance_kind = "none"
    guidance_limits = None
    default_guidance = None
    # 12 B transformer, 4096 image tokens at 1024x1024 + 256 text tokens, bf16.
    activation_bytes_per_megapixel = 3 << 30

    @classmethod
    def _pipeline_class(cls) -> type:
        return _pipeline_class()

    @classmethod
    def _check_pipeline(cls, pipeline: Any, location: str) -> None:
        if pipeline.transformer.config.guidance_embeds:
            raise ValueError(
                f"{cls.name}: the transformer at {location!r} takes a guidance embedding (FLUX.1 [dev]?); this "
                f"engine runs timestep-distilled FLUX.1 [schnell] weights — point {cls.setting} at such weights"
            )

    def _encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        prompt_embeds, pooled, _text_ids = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.runtime.device, max_sequence_length=self.max_sequence_length,
        )
        return [{"prompt_embeds": prompt_embeds[i : i + 1], "pooled_prompt_embeds": pooled[i : i + 1]}
                for i in range(len(prompts))]

    def _call_kwargs(self, batch: list[ImageRequest], embeddings: dict[str, torch.Tensor]) -> dict[str, Any]:
        # guidance_scale is unused without a guidance embedding; true CFG is off without a negative prompt.
        return dict(embeddings, guidance_scale=0.0, max_sequence_length=self.max_sequence_length)
