"""CLIP score: cosine similarity of the CLIP image and prompt embeddings, clipped at 0.

Same quantity as torchmetrics' ``CLIPScore`` divided by 100 (so it lies in [0, 1]), computed
with transformers' ``CLIPModel`` and ``CLIPProcessor`` (``openai/clip-vit-large-patch14`` by
default). The model is loaded once; each distinct prompt of a batch is encoded once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import PIL.Image
import torch
import torch.nn.functional as F

from flexyface_pipeline.lib.metrics.base import (
    ImageEmbedder,
    Scorer,
    as_rgb,
    hf_call,
    hf_identity,
    prompt_index,
    tensors_digest,
)
from flexyface_pipeline.lib.models.common import ModelIdentity, Runtime

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

logger = logging.getLogger(__name__)

VISION_PREFIXES = ("vision_model.", "visual_projection.")
_PROCESSOR_META_KEYS = ("processor_class", "image_processor_type", "feature_extractor_type", "_processor_class")


def preprocessing_settings(image_processor: CLIPImageProcessor) -> dict:
    """The image processor's settings that decide pixel values (no class names)."""
    settings = image_processor.to_dict()
    return {k: v for k, v in settings.items() if k not in _PROCESSOR_META_KEYS}


def vision_tower_digest(model: torch.nn.Module, image_processor: CLIPImageProcessor) -> str:
    """Digest of a CLIP image tower (``vision_model.*``, ``visual_projection.*``) and its preprocessing."""
    state = {k: v for k, v in model.state_dict().items() if k.startswith(VISION_PREFIXES)}
    return tensors_digest(state, preprocessing_settings(image_processor))


def pixel_values(
    image_processor: CLIPImageProcessor, images: Sequence[PIL.Image.Image], runtime: Runtime
) -> torch.Tensor:
    batch = image_processor(images=as_rgb(images), return_tensors="pt")
    return batch["pixel_values"].to(runtime.device, runtime.dtype)


class ClipScorer(Scorer, ImageEmbedder):
    """``max(cos(image, prompt), 0)`` with CLIP ViT-L/14; in [0, 1], higher is better."""

    metric: ClassVar[str] = "clip_score"
    column_prefix: ClassVar[str] = "clip"
    default_model: ClassVar[str] = "openai/clip-vit-large-patch14"
    setting: ClassVar[str] = "FLEXYFACE_CLIP_MODEL"
    title: ClassVar[str] = "CLIP score model"
    bounds: ClassVar[tuple[float | None, float | None]] = (0.0, 1.0)

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, identity: ModelIdentity, runtime: Runtime) -> None:
        super().__init__(identity, runtime)
        self.model = model
        self.processor = processor
        self._max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool) -> ClipScorer:
        location = cls.check(location)
        from transformers import CLIPModel, CLIPProcessor

        logger.info("loading %s from %s on %s (%s)", cls.title, location, runtime.device, runtime.dtype)
        model = hf_call(cls.title, location, cls.setting, lambda: CLIPModel.from_pretrained(
            location, dtype=runtime.dtype, local_files_only=offline))
        processor = hf_call(cls.title, location, cls.setting, lambda: CLIPProcessor.from_pretrained(
            location, local_files_only=offline))
        model.to(runtime.device).eval()
        return cls(model, processor, hf_identity(location), runtime)

    @cached_property
    def vision_digest(self) -> str:
        return vision_tower_digest(self.model, self.processor.image_processor)

    def image_embeddings(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        with torch.inference_mode():
            pixels = pixel_values(self.processor.image_processor, images, self.runtime)
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
            return F.normalize(features.float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected prompt embeddings (prompts longer than 77 tokens are truncated)."""
        tokens = self.processor.tokenizer(list(prompts), padding=True, truncation=True,
                                          max_length=self._max_length, return_tensors="pt")
        if tokens["input_ids"].shape[1] >= self._max_length:
            logger.debug("some prompts reached CLIP's %d-token limit and were truncated", self._max_length)
        tokens = {k: v.to(self.runtime.device) for k, v in tokens.items()}
        with torch.inference_mode():
            features = self.model.get_text_features(**tokens).pooler_output
            return F.normalize(features.float(), dim=-1)

    def _score(self, images: list[PIL.Image.Image], prompts: list[str]) -> torch.Tensor:
        distinct, index = prompt_index(prompts)
        image_emb = self.image_embeddings(images)
        text_emb = self.text_embeddings(distinct)[index.to(image_emb.device)]
        return (image_emb * text_emb).sum(dim=-1).clamp(min=0.0)

    def _release(self) -> None:
        del self.model, self.processor

    @classmethod
    def build_tiny(cls, directory: Path) -> None:
        from flexyface_pipeline.lib.models.scorer_builders import build_tiny_clip

        build_tiny_clip(directory)

    @classmethod
    def build_random_full(cls, directory: Path) -> None:
        from flexyface_pipeline.lib.models.scorer_builders import build_random_full_clip

        build_random_full_clip(directory)
