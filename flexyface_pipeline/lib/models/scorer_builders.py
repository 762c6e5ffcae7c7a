"""Random-weight models for the four image metrics, written as real weights are shipped.

- ``tiny``: the same classes with tiny, seeded configurations (CLIP width 32 on 32x32 images;
  a 1.6 M-parameter open_clip model for HPS) and the real 49,408-token CLIP tokenizer. Tests
  and smoke runs load them through the scorers' ``load``, the path real weights take.
- ``random_full``: the published architectures (CLIP ViT-L/14; hpsv2's ``ViT-H-14``) with random
  weights, to measure speed and memory without the real checkpoints.

The CLIP score model and both aesthetic predictors share one seeded image tower, as the real
predictors carry OpenAI's ViT-L/14 image tower: their ``vision_digest`` is equal, so the
pipeline can compute the image embedding once for all three.

Each model directory is written next to its target and renamed into place when complete.
``SCORER_BUILDERS`` maps each metric to its two builders. This module depends on the metric
modules (their constants and loaders), never the other way round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from flexyface_pipeline.lib.atomic import atomic_path, atomic_write_bytes
from flexyface_pipeline.lib.metrics.aesthetic import AestheticV1Scorer, AestheticV2Scorer, import_aesthetics_predictor
from flexyface_pipeline.lib.metrics.clip_score import ClipScorer
from flexyface_pipeline.lib.metrics.hps import (
    HPS_ARCHITECTURE,
    HPS_CHECKPOINT,
    MODEL_INFO,
    HpsV2Scorer,
    hpsv2_open_clip,
    register_architecture,
)
from flexyface_pipeline.lib.models.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, write_clip_tokenizer

logger = logging.getLogger(__name__)

SEED = 0

# openai/clip-vit-large-patch14 (config.json, preprocessor_config.json): architecture only.
CLIP_VIT_L14_CONFIG: dict = {
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0,
    "text_config": {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    },
}
CLIP_VIT_L14_PREPROCESSOR: dict = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}

TINY_CLIP_CONFIG: dict = {
    "projection_dim": 16,
    "text_config": {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "projection_dim": 16,
        "bos_token_id": CLIP_VOCAB_SIZE - 2,
        "eos_token_id": CLIP_VOCAB_SIZE - 1,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "projection_dim": 16,
    },
}
TINY_CLIP_PREPROCESSOR: dict = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}

TINY_HPS_ARCHITECTURE = "flexyface-tiny-hps"
TINY_HPS_CONFIG: dict = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {
        "context_length": CLIP_MAX_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 4, "layers": 2,
    },
}


@contextlib.contextmanager
def model_directory(directory: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``directory``; renamed onto it once complete.

    ``directory`` must not exist or be empty.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} already exists and is not an empty directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clip_config(spec: dict):
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(spec["text_config"]), vision_config=dict(spec["vision_config"]),
                      **{k: v for k, v in spec.items() if k not in ("text_config", "vision_config")})


def _vision_config(spec: dict):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**spec["vision_config"])


def _image_processor(spec: dict):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**spec)


def _vision_tower_state(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random CLIP image tower (``vision_model.*``, ``visual_projection.*``)."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(_vision_config(spec)).state_dict()


def _with_vision_tower(model: torch.nn.Module, spec: dict, seed: int) -> torch.nn.Module:
    state = _vision_tower_state(spec, seed)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"image tower keys not in {type(model).__name__}: {result.unexpected_keys[:5]}")
    missing_vision = [k for k in result.missing_keys if k.startswith(("vision_model.", "visual_projection."))]
    if missing_vision:
        raise RuntimeError(f"image tower keys missing from the seeded tower: {missing_vision[:5]}")
    return model


def build_clip(directory: Path, spec: dict, preprocessor: dict, seed: int = SEED) -> Path:
    """A ``CLIPModel`` with random weights, its tokenizer and image processor (``save_pretrained``)."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    with model_directory(directory) as tmp:
        torch.manual_seed(seed + 1)
        model = _with_vision_tower(CLIPModel(_clip_config(spec)).eval(), spec, seed)
        model.save_pretrained(tmp, safe_serialization=True)
        write_clip_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer", model_max_length=CLIP_MAX_LENGTH)
        shutil.rmtree(tmp / "tokenizer")
        CLIPProcessor(image_processor=_image_processor(preprocessor), tokenizer=tokenizer).save_pretrained(tmp)
    logger.info("wrote random-weight CLIP model to %s", directory)
    return Path(directory)


def _unit_gain(head: torch.nn.Module) -> None:
    """Re-draw a head's Linear layers with weights ~ N(0, 1/fan_in) and zero bias.

    With transformers' default init (std 0.02) a five-layer linear head maps unit embeddings to
    outputs near 1e-5, which would make score comparisons meaningless for random weights.
    """
    for layer in head.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            torch.nn.init.zeros_(layer.bias)


def build_aesthetic(directory: Path, predictor_class: str, spec: dict, preprocessor: dict, seed: int = SEED) -> Path:
    """An aesthetics_predictor model with random weights, written as the hub repositories are."""
    from transformers import CLIPProcessor, CLIPTokenizer

    predictor = getattr(import_aesthetics_predictor(), predictor_class)
    with model_directory(directory) as tmp:
        torch.manual_seed(seed + 2)
        model = _with_vision_tower(predictor(_vision_config(spec)).eval(), spec, seed)
        _unit_gain(model.predictor if hasattr(model, "predictor") else model.layers)
        model.save_pretrained(tmp, safe_serialization=True)
        write_clip_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer", model_max_length=CLIP_MAX_LENGTH)
        shutil.rmtree(tmp / "tokenizer")
        CLIPProcessor(image_processor=_image_processor(preprocessor), tokenizer=tokenizer).save_pretrained(tmp)
    logger.info("wrote random-weight %s to %s", predictor_class, directory)
    return Path(directory)


def build_hps(directory: Path, architecture: str, config: dict | None, *, half: bool, seed: int = SEED) -> Path:
    """hpsv2's open_clip model with random weights, saved as ``{"state_dict": ...}`` like the HPS
    checkpoints. ``config`` (an open_clip architecture JSON) is written beside it when the
    architecture is not one hpsv2 ships; ``hps_model.json`` names architecture and checkpoint."""
    open_clip = hpsv2_open_clip()
    with model_directory(directory) as tmp:
        if config is not None:
            config_file = atomic_write_bytes(tmp / f"{architecture}.json", json.dumps(config, indent=2).encode())
            register_architecture(config_file)
        torch.manual_seed(seed)
        model = open_clip.create_model(architecture, pretrained=None, precision="fp32", device="cpu")
        state = model.state_dict()
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        checkpoint = HPS_CHECKPOINT if architecture == HPS_ARCHITECTURE else f"{architecture}.pt"
        with atomic_path(tmp / checkpoint) as part:
            torch.save({"state_dict": state}, part)
        info = {"architecture": architecture, "checkpoint": checkpoint}
        atomic_write_bytes(tmp / MODEL_INFO, json.dumps(info, indent=2).encode())
    logger.info("wrote random-weight HPS model (%s) to %s", architecture, directory)
    return Path(directory)


def build_tiny_clip(directory: Path) -> Path:
    return build_clip(directory, TINY_CLIP_CONFIG, TINY_CLIP_PREPROCESSOR)


def build_random_full_clip(directory: Path) -> Path:
    return build_clip(directory, CLIP_VIT_L14_CONFIG, CLIP_VIT_L14_PREPROCESSOR)


def build_tiny_aesthetic(directory: Path, predictor_class: str) -> Path:
    return build_aesthetic(directory, predictor_class, TINY_CLIP_CONFIG, TINY_CLIP_PREPROCESSOR)


def build_random_full_aesthetic(directory: Path, predictor_class: str) -> Path:
    return build_aesthetic(directory, predictor_class, CLIP_VIT_L14_CONFIG, CLIP_VIT_L14_PREPROCESSOR)


def build_tiny_hps(directory: Path) -> Path:
    return build_hps(directory, TINY_HPS_ARCHITECTURE, TINY_HPS_CONFIG, half=False)


def build_random_full_hps(directory: Path) -> Path:
    """hpsv2's shipped ``ViT-H-14`` architecture, fp16 tensors as in ``HPS_v2.1_compressed.pt``."""
    return build_hps(directory, HPS_ARCHITECTURE, None, half=True)


@dataclass(frozen=True)
class ScorerBuilder:
    """The two random-weight builders of one metric: ``build_tiny(directory)`` and
    ``build_random_full(directory)`` (the interface ``ModelResource`` builds profiles with)."""

    metric: str
    tiny: Callable[[Path], Path]
    random_full: Callable[[Path], Path]

    def build_tiny(self, directory: Path) -> Path:
        """Write the tiny random-weight model of this metric, loadable with its scorer's ``load``."""
        return self.tiny(Path(directory))

    def build_random_full(self, directory: Path) -> Path:
        """Write the published full-size architecture with random weights, in the real file format."""
        return self.random_full(Path(directory))


def _aesthetic_builder(metric: str, predictor_class: str) -> ScorerBuilder:
    return ScorerBuilder(metric, lambda d: build_tiny_aesthetic(d, predictor_class),
                         lambda d: build_random_full_aesthetic(d, predictor_class))


SCORER_BUILDERS: dict[str, ScorerBuilder] = {
    ClipScorer.metric: ScorerBuilder(ClipScorer.metric, build_tiny_clip, build_random_full_clip),
    AestheticV1Scorer.metric: _aesthetic_builder(AestheticV1Scorer.metric, AestheticV1Scorer.predictor_class),
    AestheticV2Scorer.metric: _aesthetic_builder(AestheticV2Scorer.metric, AestheticV2Scorer.predictor_class),
    HpsV2Scorer.metric: ScorerBuilder(HpsV2Scorer.metric, build_tiny_hps, build_random_full_hps),
}


def scorer_builder(metric: str) -> ScorerBuilder:
    """The random-weight builders of ``metric`` (an export column name)."""
    try:
        return SCORER_BUILDERS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(SCORER_BUILDERS)}") from None
