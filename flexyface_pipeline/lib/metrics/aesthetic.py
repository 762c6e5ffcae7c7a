"""LAION aesthetic predictors v1 and v2 (linear MSE head) through simple-aesthetics-predictor.

Both are heads on the L2-normalised CLIP ViT-L/14 image embedding (the predictor classes
normalise inside ``forward``; an unnormalised embedding gives scores above 10). v1 is one
``Linear(768, 1)``; v2 "sac+logos+ava1-l14-linearMSE" is five Linear layers. The prompt is not
used. The embedding can come from another scorer with the same ``vision_digest``
(``score_from_embeddings``), which gives the same numbers as scoring the images directly. The
head always runs in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from flexyface_pipeline.lib.metrics.base import ImageEmbedder, Scorer, as_embeddings, hf_call, hf_identity
from flexyface_pipeline.lib.metrics.clip_score import prepare_image, vision_tower_digest
from flexyface_pipeline.lib.models.common import DigestCache, MissingWeightsError, ModelIdentity, Runtime

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

logger = logging.getLogger(__name__)


def import_aesthetics_predictor() -> ModuleType:
    """The ``aesthetics_predictor`` package, imported without its side effect: its modules call
    ``transformers.logging.set_verbosity_error()`` for the whole process, which would hide
    transformers' report of missing or unexpected weights. The verbosity from before the first
    import is restored."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    try:
        import aesthetics_predictor
    finally:
        hf_logging.set_verbosity(verbosity)
    return aesthetics_predictor


def check_loading_info(title: str, location: str, setting: str, info: dict) -> None:
    """Refuse a model some of whose weights were not in the checkpoint (``from_pretrained`` then
    initialises them at random, which gives plausible-looking scores)."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ())
    if not missing and not mismatched:
        return
    problems = []
    if missing:
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        problems.append(f"weights missing from the checkpoint: {shown}")
    if mismatched:
        problems.append(f"weights with another shape in the checkpoint: {', '.join(mismatched[:12])}")
    raise MissingWeightsError(
        f"{title}: {location!r} is not a checkpoint of this model ({'; '.join(problems)}). They would be "
        f"initialised at random; point {setting} at the model's own repository or directory."
    )


class _AestheticScorer(Scorer, ImageEmbedder):
    """Shared loading and scoring of the two predictor classes."""

    predictor_class: ClassVar[str]  # attribute name in ``aesthetics_predictor``
    head_attribute: ClassVar[str]  # the predictor's head module on top of the embedding
    bounds: ClassVar[tuple[float | None, float | None]] = (None, None)
    activation_bytes_per_image: ClassVar[int] = 32 << 20

    def __init__(self, model: CLIPVisionModelWithProjection, image_processor: CLIPImageProcessor,
                 identity: ModelIdentity, runtime: Runtime) -> None:
        super().__init__(identity, runtime)
        self.model = model
        self.image_processor = image_processor

    @classmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool,
             digests: DigestCache | None = None) -> _AestheticScorer:
        location = cls.check(location)
        from transformers import CLIPImageProcessor

        predictor = getattr(import_aesthetics_predictor(), cls.predictor_class)
        logger.info("loading %s from %s on %s (%s)", cls.title, location, runtime.device, runtime.dtype)
        # float32 weights; a reduced-precision runtime runs the image tower under autocast and
        # the head in float32.
        model, info = hf_call(cls.title, location, cls.setting, lambda: predictor.from_pretrained(
            location, dtype=torch.float32, local_files_only=offline, output_loading_info=True))
        check_loading_info(cls.title, location, cls.setting, info)
        # The image half of the repository's CLIPProcessor: the prompt is not used.
        image_processor = hf_call(cls.title, location, cls.setting, lambda: CLIPImageProcessor.from_pretrained(
            location, local_files_only=offline))
        model.eval()
        scorer = cls(model, image_processor, hf_identity(location, digests=digests), runtime)
        # hashed on the CPU, before the move to the device
        scorer.vision_digest = vision_tower_digest(model, image_processor, runtime,
                                                   identity=scorer.identity, digests=digests)
        model.to(runtime.device)
        return scorer

    @cached_property
    def vision_digest(self) -> str:
        return vision_tower_digest(self.model, self.image_processor, self.runtime)

    def prepare(self, image: PIL.Image.Image) -> torch.Tensor:
        return prepare_image(self.image_processor, image)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        # What CLIPVisionModelWithProjection.forward computes as ``image_embeds``.
        with self._autocast():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            projected = self.model.visual_projection(pooled)
        return F.normalize(projected.float(), dim=-1)

    def embed_prepared(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_open()
        with self._inference():
            return self._embed(self._to_device(pixels)).to("cpu")

    def _head(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The predictor head in float32 on L2-normalised embeddings (on the device)."""
        head = getattr(self.model, self.head_attribute)
        return head(embeddings.float())[:, 0]

    def score_from_embeddings(self, embeddings: torch.Tensor | np.ndarray,
                              prompts: Sequence[str] | None = None) -> np.ndarray:
        """Scores from L2-normalised image embeddings (``image_embeddings`` of a scorer with an
        equal ``vision_digest``); the prompt is not used."""
        self._check_open()
        embeddings = as_embeddings(embeddings)
        if prompts is not None and len(prompts) != embeddings.shape[0]:
            raise ValueError(f"{self.title}: got {embeddings.shape[0]} embeddings but {len(prompts)} prompts")
        if not embeddings.shape[0]:
            return np.empty(0, dtype=np.float64)
        with self._inference():
            return self._head(embeddings.to(self.runtime.device)).to("cpu", torch.float64).numpy()

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._head(self._embed(pixels))

    def _release(self) -> None:
        del self.model, self.image_processor


class AestheticV1Scorer(_AestheticScorer):
    """LAION aesthetic predictor v1 (``sa_0_4_vit_l_14_linear``), roughly 1-10."""

    metric: ClassVar[str] = "aesthetic_score"
    column_prefix: ClassVar[str] = "aesthetic_v1"
    default_model: ClassVar[str] = "shunk031/aesthetics-predictor-v1-vit-large-patch14"
    setting: ClassVar[str] = "FLEXYFACE_AESTHETIC_V1_MODEL"
    title: ClassVar[str] = "LAION aesthetic predictor v1"
    predictor_class: ClassVar[str] = "AestheticsPredictorV1"
    head_attribute: ClassVar[str] = "predictor"


class AestheticV2Scorer(_AestheticScorer):
    """Improved aesthetic predictor v2, "sac+logos+ava1-l14-linearMSE" head, roughly 1-10."""

    metric: ClassVar[str] = "aes_v2_score"
    column_prefix: ClassVar[str] = "aesthetic_v2"
    default_model: ClassVar[str] = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    setting: ClassVar[str] = "FLEXYFACE_AESTHETIC_V2_MODEL"
    title: ClassVar[str] = "improved aesthetic predictor v2 (linearMSE)"
    predictor_class: ClassVar[str] = "AestheticsPredictorV2Linear"
    head_attribute: ClassVar[str] = "layers"
