"""CLIP score: cosine similarity of the CLIP image and prompt embeddings, clipped at 0.

Same quantity as torchmetrics' ``CLIPScore`` divided by 100 (so it lies in [0, 1]), computed
with transformers' ``CLIPModel`` and ``CLIPProcessor`` (``openai/clip-vit-large-patch14`` by
default). The model is loaded once; each distinct prompt is encoded once per loaded scorer.

A prompt longer than CLIP's 77-token context is truncated as OpenAI CLIP, open_clip and
diffusers do: BOS, its first 75 tokens, EOS (the text embedding is taken at that EOS). Score
tables flag such rows (``clip_prompt_truncated``). torchmetrics' ``CLIPScore`` differs there: it
keeps the first 77 tokens without EOS, so every long prompt is pooled at its BOS token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from flexyface_pipeline.lib.metrics.base import (
    ImageEmbedder,
    Scorer,
    as_embeddings,
    check_prompts,
    dtype_name,
    hf_call,
    hf_identity,
    prompt_index,
    tensors_digest,
)
from flexyface_pipeline.lib.models.common import DigestCache, ModelIdentity, Runtime

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

logger = logging.getLogger(__name__)

VISION_PREFIXES = ("vision_model.", "visual_projection.")
_PROCESSOR_META_KEYS = ("processor_class", "image_processor_type", "feature_extractor_type", "_processor_class")
# Configuration keys that name or describe a model without changing what its image tower computes.
_CONFIG_META_KEYS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "id2label", "label2id", "problem_type", "output_attentions", "output_hidden_states", "return_dict",
})


def preprocessing_settings(image_processor: CLIPImageProcessor) -> dict:
    """The image processor's settings that decide pixel values (no class names)."""
    settings = image_processor.to_dict()
    return {k: v for k, v in settings.items() if k not in _PROCESSOR_META_KEYS}


def vision_config_settings(model: torch.nn.Module) -> dict:
    """The settings of the image tower's configuration that decide its output.

    ``CLIPModel`` keeps them in ``config.vision_config``, the aesthetic predictors (a
    ``CLIPVisionModelWithProjection``) in ``config``; both hand the same ``CLIPVisionConfig`` to
    ``model.vision_model``, which is read here. Only the keys the configuration class defines
    are kept, less names and bookkeeping (``_CONFIG_META_KEYS``): configuration files written by
    other transformers versions carry other leftovers (``dropout``, ``add_cross_attention``,
    ``transformers_version``) that the image tower does not read, and the same tower saved as a
    ``CLIPModel`` and as a predictor must give the same settings. The attention implementation
    (eager, sdpa, ...) is added: it changes the embedding in the last bits.
    """
    config = model.vision_model.config
    known = set(type(config)().to_dict()) - _CONFIG_META_KEYS
    settings = {k: v for k, v in config.to_dict().items() if k in known}
    settings["attn_implementation"] = getattr(config, "_attn_implementation", None)
    return settings


def tf32_settings(runtime: Runtime) -> dict | None:
    """Whether float32 matrix products and convolutions may run in TF32 (CUDA only): the image
    tower's float32 parts then give other numbers. Scoring sets torch's flags to ``runtime.tf32``
    while it runs (``Scorer._inference``)."""
    if not runtime.is_cuda:
        return None
    return {"matmul": bool(runtime.tf32), "cudnn": bool(runtime.tf32)}


def vision_tower_digest(model: torch.nn.Module, image_processor: CLIPImageProcessor, runtime: Runtime,
                        *, identity: ModelIdentity | None = None, digests: DigestCache | None = None) -> str:
    """Digest of a CLIP image tower (``vision_model.*``, ``visual_projection.*``), its
    configuration (``vision_config_settings``), its preprocessing (settings and image processor
    class), the dtype it computes in and, on CUDA, whether TF32 is allowed. With the
    ``identity`` of the weights it was loaded from (a hub commit or a file digest), ``digests``
    remembers it for the next load, keyed by that identity and all of the settings above."""
    extra = {
        "preprocessing": preprocessing_settings(image_processor),
        "image_processor": type(image_processor).__name__,
        "vision_config": vision_config_settings(model),
        "compute_dtype": dtype_name(runtime.dtype),
        "tf32": tf32_settings(runtime),
    }

    def compute() -> str:
        state = {k: v for k, v in model.state_dict().items() if k.startswith(VISION_PREFIXES)}
        return tensors_digest(state, extra)

    if digests is None or identity is None or identity.revision == "unknown":
        return compute()
    key = "vision|" + json.dumps([type(model).__name__, identity.model_id, identity.revision, extra],
                                 sort_keys=True, default=str)
    return digests.remember(key, compute)


def prepare_image(image_processor: CLIPImageProcessor, image: PIL.Image.Image) -> torch.Tensor:
    """One image through the CLIP image processor: float32 (3, size, size) on the CPU."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image_processor(images=[image], return_tensors="pt")["pixel_values"][0].float()


class ClipScorer(Scorer, ImageEmbedder):
    """``max(cos(image, prompt), 0)`` with CLIP ViT-L/14; in [0, 1], higher is better."""

    metric: ClassVar[str] = "clip_score"
    column_prefix: ClassVar[str] = "clip"
    default_model: ClassVar[str] = "openai/clip-vit-large-patch14"
    setting: ClassVar[str] = "FLEXYFACE_CLIP_MODEL"
    title: ClassVar[str] = "CLIP score model"
    bounds: ClassVar[tuple[float | None, float | None]] = (0.0, 1.0)
    activation_bytes_per_image: ClassVar[int] = 32 << 20

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, identity: ModelIdentity, runtime: Runtime) -> None:
        super().__init__(identity, runtime)
        self.model = model
        self.processor = processor
        self._max_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool, digests: DigestCache | None = None) -> ClipScorer:
        location = cls.check(location)
        from transformers import CLIPModel, CLIPProcessor

        logger.info("loading %s from %s on %s (%s)", cls.title, location, runtime.device, runtime.dtype)
        # float32 weights; a reduced-precision runtime runs the towers under autocast.
        model = hf_call(cls.title, location, cls.setting, lambda: CLIPModel.from_pretrained(
            location, dtype=torch.float32, local_files_only=offline))
        processor = hf_call(cls.title, location, cls.setting, lambda: CLIPProcessor.from_pretrained(
            location, local_files_only=offline))
        model.eval()
        scorer = cls(model, processor, hf_identity(location, digests=digests), runtime)
        # hashed on the CPU, before the move to the device
        scorer.vision_digest = vision_tower_digest(model, processor.image_processor, runtime,
                                                   identity=scorer.identity, digests=digests)
        model.to(runtime.device)
        return scorer

    @cached_property
    def vision_digest(self) -> str:
        return vision_tower_digest(self.model, self.processor.image_processor, self.runtime)

    def prepare(self, image: PIL.Image.Image) -> torch.Tensor:
        return prepare_image(self.processor.image_processor, image)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            features = self.model.get_image_features(pixel_values=pixels).pooler_output
        return F.normalize(features.float(), dim=-1)

    def embed_prepared(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_open()
        with self._inference():
            return self._embed(self._to_device(pixels)).to("cpu")

    def prompt_token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens of each prompt with BOS and EOS, before truncation."""
        check_prompts(prompts)
        distinct = list(dict.fromkeys(prompts))
        ids = self.processor.tokenizer(distinct, truncation=False, verbose=False)["input_ids"]
        count = {p: len(i) for p, i in zip(distinct, ids)}
        return [count[p] for p in prompts]

    def prompts_truncated(self, prompts: Sequence[str]) -> list[bool]:
        """Whether each prompt is longer than CLIP's context (77 tokens with BOS and EOS), so that
        it is scored as BOS + its first 75 tokens + EOS."""
        return [n > self._max_length for n in self.prompt_token_counts(prompts)]

    def row_columns(self, prompts: Sequence[str]) -> dict[str, list]:
        return {f"{self.column_prefix}_prompt_truncated": self.prompts_truncated(prompts)}

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        # Truncation keeps BOS + the first 75 tokens + EOS (the tokenizer adds the special tokens
        # after truncating to max_length - 2).
        tokens = self.processor.tokenizer(prompts, padding=True, truncation=True,
                                          max_length=self._max_length, return_tensors="pt")
        tokens = {k: v.to(self.runtime.device) for k, v in tokens.items()}
        with self._autocast():
            features = self.model.get_text_features(**tokens).pooler_output
        return F.normalize(features.float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected prompt embeddings (a prompt longer than 77 tokens is encoded
        as BOS + its first 75 tokens + EOS)."""
        check_prompts(prompts)
        return self.prompt_features(prompts)

    def _from_embeddings(self, image_emb: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        distinct, index = prompt_index(prompts)
        text_emb = self.prompt_features(distinct)[index.to(image_emb.device)]
        return (image_emb * text_emb).sum(dim=-1).clamp(min=0.0)

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._from_embeddings(self._embed(pixels), prompts)

    def score_from_embeddings(self, embeddings: torch.Tensor | np.ndarray,
                              prompts: Sequence[str] | None = None) -> np.ndarray:
        self._check_open()
        embeddings = as_embeddings(embeddings)
        if prompts is None or len(prompts) != embeddings.shape[0]:
            got = "no prompts" if prompts is None else f"{len(prompts)} prompts"
            raise ValueError(f"{self.title}: got {embeddings.shape[0]} embeddings but {got}; pass one prompt per image")
        check_prompts(prompts)
        if not len(prompts):
            return np.empty(0, dtype=np.float64)
        with self._inference():
            values = self._from_embeddings(embeddings.to(self.runtime.device), list(prompts))
        return values.to("cpu", torch.float64).numpy()

    def _release(self) -> None:
        del self.model, self.processor
