"""Human Preference Score v2.1 with hpsv2's own model code.

What ``hpsv2.img_score.score`` computes — the diagonal of ``image_features @ text_features.T``
of hpsv2's open_clip ``ViT-H-14`` carrying the HPS v2.1 weights — without its per-call
checkpoint reload, its module-level model or its download of the LAION backbone (the v2.1
checkpoint holds every weight). The checkpoint is read once in ``load``; images are scored in
batches and each distinct prompt is encoded once per loaded scorer. A reduced-precision runtime
runs the towers under autocast, as hpsv2 does with ``torch.cuda.amp.autocast``.

Weight locations:
- a hub id (default ``xswu/HPSv2``): ``HPS_v2.1_compressed.pt`` from that repository;
- a local ``.pt`` file: a ``ViT-H-14`` checkpoint;
- a local directory: ``hps_model.json`` naming the architecture and checkpoint file (an
  open_clip-style architecture JSON beside it is registered with hpsv2's open_clip), or else
  ``HPS_v2.1_compressed.pt`` for ``ViT-H-14``.
HPS values only compare images made from the same prompt.
"""

from __future__ import annotations

import json
import logging
import types
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

import PIL.Image
import torch
import torch.nn.functional as F

from flexyface_pipeline.lib.metrics.base import Scorer, prompt_index
from flexyface_pipeline.lib.models.common import (
    DigestCache,
    MissingWeightsError,
    ModelIdentity,
    Runtime,
    identify,
    is_local,
    missing_weights,
)
from flexyface_pipeline.lib.models.tokenizer import ensure_hpsv2_vocab

logger = logging.getLogger(__name__)

HPS_ARCHITECTURE = "ViT-H-14"
HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"
MODEL_INFO = "hps_model.json"  # {"architecture": <open_clip model name>, "checkpoint": <file name>}


def hpsv2_open_clip() -> types.ModuleType:
    """hpsv2's vendored open_clip (its tokenizer needs the BPE file its wheel lacks)."""
    ensure_hpsv2_vocab()
    from hpsv2.src import open_clip

    return open_clip


def register_architecture(config_file: Path) -> str:
    """Make an open_clip-style architecture JSON known to hpsv2's open_clip; returns its name."""
    open_clip = hpsv2_open_clip()
    name = config_file.stem
    wanted = json.loads(config_file.read_text())
    if open_clip.get_model_config(name) != wanted:
        open_clip.add_model_config(config_file)
        if open_clip.get_model_config(name) != wanted:
            raise ValueError(f"{config_file}: not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    return name


def resolve_checkpoint(location: str, setting: str, *, offline: bool,
                       digests: DigestCache | None = None) -> tuple[str, Path, ModelIdentity]:
    """(architecture name, checkpoint file, identity) for a hub id, a .pt file or a directory."""
    title = HpsV2Scorer.title
    if is_local(location):
        path = Path(location).expanduser().resolve()
        if path.is_file():
            return HPS_ARCHITECTURE, path, identify(str(path), digests=digests)
        info_file = path / MODEL_INFO
        if info_file.is_file():
            info = json.loads(info_file.read_text())
            if not isinstance(info, dict) or not {"architecture", "checkpoint"} <= set(info):
                raise ValueError(f"{info_file}: expected an object with 'architecture' and 'checkpoint'")
            architecture, checkpoint = str(info["architecture"]), path / str(info["checkpoint"])
            config_file = path / f"{architecture}.json"
            if config_file.is_file():
                register_architecture(config_file)
        else:
            architecture, checkpoint = HPS_ARCHITECTURE, path / HPS_CHECKPOINT
        if not checkpoint.is_file():
            raise MissingWeightsError(
                f"{title}: {checkpoint.name} not found in {path}; set {setting} to the HPS v2.1 checkpoint "
                f"({HPS_CHECKPOINT}) or a directory holding it"
            )
        return architecture, checkpoint, identify(str(path), digests=digests)
    from huggingface_hub import hf_hub_download

    try:
        cached = hf_hub_download(location, HPS_CHECKPOINT, local_files_only=offline)
    except OSError as err:
        raise missing_weights(f"{title} ({HPS_CHECKPOINT})", location, setting, err) from err
    found = identify(location, cached, digests)
    return HPS_ARCHITECTURE, Path(cached), ModelIdentity(f"{location}/{HPS_CHECKPOINT}", found.revision)


class HpsV2Scorer(Scorer):
    """HPS v2.1: cosine of hpsv2's ViT-H-14 image and prompt features (about 0.2-0.35 for real images)."""

    metric: ClassVar[str] = "hps_v2_score"
    column_prefix: ClassVar[str] = "hps_v2"
    default_model: ClassVar[str] = "xswu/HPSv2"
    setting: ClassVar[str] = "FLEXYFACE_HPS_V2_MODEL"
    title: ClassVar[str] = "HPS v2.1"
    checkpoint_file: ClassVar[str] = HPS_CHECKPOINT
    activation_bytes_per_image: ClassVar[int] = 48 << 20
    # hpsv2 scores under torch.cuda.amp.autocast() on CUDA: float16 towers.
    reference_cuda_dtype: ClassVar[torch.dtype] = torch.float16

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[PIL.Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], architecture: str, identity: ModelIdentity,
                 runtime: Runtime) -> None:
        super().__init__(identity, runtime)
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.architecture = architecture

    @classmethod
    def check_available(cls, location: str, *, locations: Mapping[str, str] | None = None) -> None:
        resolve_checkpoint(cls.check(location), cls.setting, offline=True)

    @classmethod
    def load(cls, location: str, runtime: Runtime, *, offline: bool, digests: DigestCache | None = None) -> HpsV2Scorer:
        location = cls.check(location)
        architecture, checkpoint, identity = resolve_checkpoint(location, cls.setting, offline=offline,
                                                                digests=digests)
        open_clip = hpsv2_open_clip()
        # img_score.initialize_model's arguments, without the LAION backbone download: the v2.1
        # checkpoint holds every weight. fp32 weights; lower precision runs under autocast ("amp").
        precision = "fp32" if runtime.dtype == torch.float32 else "amp"
        logger.info("loading %s (%s) from %s on %s (%s)",
                    cls.title, architecture, checkpoint, runtime.device, precision)
        from transformers.initialization import no_init_weights

        # No random initialisation (18 s for ViT-H-14 on two cores): the strict load_state_dict
        # below overwrites every parameter and persistent buffer.
        with no_init_weights():
            model, _, preprocess = open_clip.create_model_and_transforms(
                architecture,
                pretrained=None,
                precision=precision,
                device=runtime.device,
                jit=False,
                force_quick_gelu=False,
                force_custom_text=False,
                force_patch_dropout=False,
                force_image_size=None,
                pretrained_image=False,
                image_mean=None,
                image_std=None,
                light_augmentation=True,
                aug_cfg={},
                output_dict=True,
                with_score_predictor=False,
                with_region_predictor=False,
            )
        # Memory-mapped where the file allows it (torch.save's zip format): no second copy in memory.
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(checkpoint))
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
        del state
        model.eval()
        return cls(model, preprocess, open_clip.get_tokenizer(architecture), architecture, identity, runtime)

    def prepare(self, image: PIL.Image.Image) -> torch.Tensor:
        # hpsv2's ``preprocess_val`` (torchvision transforms on the PIL image).
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.preprocess(image).float()

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        text = self.tokenizer(prompts).to(self.runtime.device)
        with self._autocast():
            features = self.model.encode_text(text)
        return F.normalize(features.float(), dim=-1)

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # hpsv2 normalises inside encode_image/encode_text (in the autocast dtype); here the
        # features are normalised in float32, which is the same in float32 and closer otherwise.
        distinct, index = prompt_index(prompts)
        with self._autocast():
            features = self.model.encode_image(pixels)
        image_features = F.normalize(features.float(), dim=-1)
        text_features = self.prompt_features(distinct)[index.to(image_features.device)]
        return (image_features * text_features).sum(dim=-1)

    def _release(self) -> None:
        del self.model, self.preprocess, self.tokenizer
