"""FLUX.2 [dev], a guidance-distilled rectified-flow transformer, through diffusers' ``Flux2Pipeline``.

Guidance is a value the transformer embeds (one pass per step, no CFG); each image of a batch has
its own (``PerImageEmbeddedGuidanceMixin``), so guidance does not split batches. The text encoder
(Mistral-Small-3.x, 24 B parameters: three quarters of the 32 B transformer; the hidden states of
its layers 10, 20 and 30 are stacked) runs first (``TextFirstEngine``). Defaults: diffusers'
``Flux2Pipeline`` runs 50 steps at guidance 4.0 (its documented example: 50 steps at 2.5).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from flexyface_pipeline.lib.engines.base import ImageRequest
from flexyface_pipeline.lib.engines.dit import PerImageEmbeddedGuidanceMixin, PinnedDeviceMixin, TextFirstEngine


@functools.cache
def _pipeline_class() -> type:
    from diffusers import Flux2Pipeline

    class TextFirstFlux2Pipeline(PerImageEmbeddedGuidanceMixin, PinnedDeviceMixin, Flux2Pipeline):
        pass

    return TextFirstFlux2Pipeline


class Flux2DevEngine(TextFirstEngine):
    """FLUX.2 [dev] (a ``Flux2Pipeline`` in diffusers format) on one device."""

    name = "flux2_dev"
    default_model = "black-forest-labs/FLUX.2-dev"
    setting = "FLEXYFACE_FLUX2_DEV_MODEL"
    pipeline_name = "Flux2Pipeline"
    text_encoders = ("text_encoder",)
    max_sequence_length = 512

    steps_limits = (4, 60)
    default_steps = (20, 50)
    guidance_kind = "distilled"
    guidance_limits = (1.0, 8.0)
    default_guidance = (2.0, 6.0)
    # 32 B transformer, 4096 image tokens at 1024x1024 + 512 text tokens of width 6144, bf16.
    activation_bytes_per_megapixel = 6 << 30

    @classmethod
    def _pipeline_class(cls) -> type:
        return _pipeline_class()

    def _encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        prompt_embeds, _text_ids = self.pipeline.encode_prompt(
            prompt=prompts, device=self.runtime.device, max_sequence_length=self.max_sequence_length,
        )
        return [{"prompt_embeds": prompt_embeds[i : i + 1]} for i in range(len(prompts))]

    def _call_kwargs(self, batch: list[ImageRequest], embeddings: dict[str, torch.Tensor]) -> dict[str, Any]:
        return dict(embeddings, guidance_scale=self.guidance_argument(batch),
                    max_sequence_length=self.max_sequence_length)
