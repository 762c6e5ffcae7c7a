"""Stable Diffusion 3.5 (Large by default; Medium and Large Turbo by pointing the weights setting at
them) through diffusers' ``StableDiffusion3Pipeline``.

Classifier-free guidance with one scale per image (``PerImageCFGMixin``); scales <= 1 run without
CFG and never share a batch with guided ones. Text encoders: CLIP-L, CLIP-G and T5-XXL, run first
(``TextFirstEngine``); the unconditional embeddings are those of the empty prompt, as diffusers
makes them. T5 input is 256 tokens (diffusers' default for SD3). Defaults from the model cards:
3.5 Large 28 steps at guidance 3.5, 3.5 Medium 40 steps at 4.5.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from flexyface_pipeline.lib.engines.base import ImageRequest
from flexyface_pipeline.lib.engines.dit import PerImageCFGMixin, PinnedDeviceMixin, TextFirstEngine


@functools.cache
def _pipeline_class() -> type:
    from diffusers import StableDiffusion3Pipeline

    class TextFirstSD3Pipeline(PerImageCFGMixin, PinnedDeviceMixin, StableDiffusion3Pipeline):
        pass

    return TextFirstSD3Pipeline


class SD35Engine(TextFirstEngine):
    """Stable Diffusion 3.5 (any SD3-family pipeline in diffusers format) on one device."""

    name = "sd35"
    default_model = "stabilityai/stable-diffusion-3.5-large"
    setting = "FLEXYFACE_SD35_MODEL"
    pipeline_name = "StableDiffusion3Pipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    max_sequence_length = 256

    steps_limits = (4, 60)
    default_steps = (16, 40)
    guidance_kind = "cfg"
    guidance_limits = (1.0, 10.0)
    default_guidance = (2.0, 7.0)
    # 8 B transformer, CFG doubles the batch: 2 x (4096 + 333) tokens at 1024x1024, bf16.
    activation_bytes_per_megapixel = 4 << 30

    @classmethod
    def _pipeline_class(cls) -> type:
        return _pipeline_class()

    def _encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.runtime.device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )
        return [{"prompt_embeds": prompt_embeds[i : i + 1], "pooled_prompt_embeds": pooled[i : i + 1]}
                for i in range(len(prompts))]

    def _call_kwargs(self, batch: list[ImageRequest], embeddings: dict[str, torch.Tensor]) -> dict[str, Any]:
        negative = self.negative_embeddings(len(batch))
        return dict(
            embeddings,
            negative_prompt_embeds=negative["prompt_embeds"],
            negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"],
            guidance_scale=self.guidance_argument(batch),
            max_sequence_length=self.max_sequence_length,
        )
