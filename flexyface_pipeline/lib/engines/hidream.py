"""HiDream-I1 (Full by default; Dev and Fast by pointing the weights setting at them) through diffusers'
``HiDreamImagePipeline``.

Text encoders: CLIP-L and CLIP-G (pooled), T5-XXL and Llama-3.1-8B-Instruct (hidden states of every
layer), run first (``TextFirstEngine``); the unconditional embeddings are those of the empty prompt,
as diffusers makes them. HiDream's hub releases do not contain the Llama model: it is loaded from
``FLEXYFACE_HIDREAM_LLAMA_MODEL`` (default ``meta-llama/Llama-3.1-8B-Instruct``, as the model cards
do) unless the pipeline directory has its own ``text_encoder_4``.

Guidance: classifier-free with one scale per image (``PerImageCFGMixin``) for I1-Full (model card:
50 steps, guidance 5.0). I1-Dev (28 steps) and I1-Fast (16 steps) are guidance-distilled and run
with guidance 0: sweep them with a guidance range of exactly 1.0 (<= 1 turns CFG off, and the
value is then unused).

Image size: diffusers' pipeline rescales every request to the area of 1024x1024 (keeping the aspect
ratio); this engine makes the image the size the request asks for.
"""

from __future__ import annotations

import functools
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from flexyface_pipeline.lib.engines.base import ImageRequest
from flexyface_pipeline.lib.engines.dit import (
    PerImageCFGMixin,
    PinnedDeviceMixin,
    TextFirstEngine,
    exact_sample_size,
)
from flexyface_pipeline.lib.models.common import (
    MissingWeightsError,
    Runtime,
    check_cached,
    check_location,
    hub_errors,
    missing_weights,
)

LLAMA_SETTING = "FLEXYFACE_HIDREAM_LLAMA_MODEL"
DEFAULT_LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


@functools.cache
def _pipeline_class() -> type:
    from diffusers import HiDreamImagePipeline

    class TextFirstHiDreamPipeline(PerImageCFGMixin, PinnedDeviceMixin, HiDreamImagePipeline):
        def __call__(self, *args: Any, width: int, height: int, **kwargs: Any) -> Any:
            # The pipeline scales (width, height) to the area default_sample_size**2 x vae_scale_factor**2.
            saved = self.default_sample_size
            self.default_sample_size = exact_sample_size(width, height, self.vae_scale_factor)
            try:
                return super().__call__(*args, width=width, height=height, **kwargs)
            finally:
                self.default_sample_size = saved

    return TextFirstHiDreamPipeline


class HiDreamEngine(TextFirstEngine):
    """HiDream-I1 (a ``HiDreamImagePipeline`` in diffusers format) on one device."""

    name = "hidream"
    default_model = "HiDream-ai/HiDream-I1-Full"
    setting = "FLEXYFACE_HIDREAM_MODEL"
    pipeline_name = "HiDreamImagePipeline"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    max_sequence_length = 128
    batch_dims = {"prompt_embeds_llama3": 1}  # (llama layers, batch, tokens, width)
    extra_locations = {"text_encoder_4": "hidream_llama"}

    steps_limits = (8, 60)
    default_steps = (20, 50)
    guidance_kind = "cfg"
    guidance_limits = (1.0, 8.0)
    default_guidance = (2.0, 7.0)
    # 17 B mixture-of-experts transformer, CFG doubles the batch, 4096 image + 128 T5 + 2x128 Llama tokens.
    activation_bytes_per_megapixel = 5 << 30

    @classmethod
    def _pipeline_class(cls) -> type:
        return _pipeline_class()

    @classmethod
    def check_available(cls, location: str, *, locations: Mapping[str, str] | None = None) -> None:
        resolved = cls._resolve(location, offline=True)
        if not (Path(resolved) / "text_encoder_4").is_dir():
            llama = (locations or {}).get("hidream_llama") or DEFAULT_LLAMA
            check_cached(f"{cls.name} Llama text encoder", llama, LLAMA_SETTING)

    @classmethod
    def _extra_components(cls, resolved: str, runtime: Runtime, *, offline: bool,
                          text_encoder_4: str | None = None, **_: Any) -> dict[str, Any]:
        if (Path(resolved) / "text_encoder_4").is_dir():
            return {}
        location = check_location(f"{cls.name} Llama text encoder", text_encoder_4 or DEFAULT_LLAMA, LLAMA_SETTING)
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

        try:
            return {
                "tokenizer_4": PreTrainedTokenizerFast.from_pretrained(location, local_files_only=offline),
                "text_encoder_4": LlamaForCausalLM.from_pretrained(location, dtype=runtime.dtype,
                                                                   local_files_only=offline),
            }
        except hub_errors() as exc:
            if offline:
                raise missing_weights(f"{cls.name} Llama text encoder", location, LLAMA_SETTING, exc) from exc
            raise MissingWeightsError(f"{cls.name}: cannot load the Llama text encoder at {location!r} ({exc}); "
                                      f"set {LLAMA_SETTING}") from exc

    def _encode(self, prompts: list[str]) -> list[dict[str, torch.Tensor]]:
        t5, _, llama, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, device=self.runtime.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return [{"prompt_embeds_t5": t5[i : i + 1], "prompt_embeds_llama3": llama[:, i : i + 1],
                 "pooled_prompt_embeds": pooled[i : i + 1]} for i in range(len(prompts))]

    def _call_kwargs(self, batch: list[ImageRequest], embeddings: dict[str, torch.Tensor]) -> dict[str, Any]:
        negative = self.negative_embeddings(len(batch))
        return dict(
            embeddings,
            negative_prompt_embeds_t5=negative["prompt_embeds_t5"],
            negative_prompt_embeds_llama3=negative["prompt_embeds_llama3"],
            negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"],
            guidance_scale=self.guidance_argument(batch),
            max_sequence_length=self.max_sequence_length,
        )
