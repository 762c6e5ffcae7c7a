"""Random-weight Stable Diffusion XL pipelines, saved the way a hub release is saved.

Two sizes, both made of the classes a RealVisXL / SDXL release is made of
(``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTextModelWithProjection``,
two ``CLIPTokenizer`` with the real 49,408-token vocabulary, ``EulerDiscreteScheduler``) and
written with ``save_pretrained`` (safetensors), so they load through the same
``from_pretrained`` path as real weights:

* **tiny**: diffusers' own SDXL test recipe (UNet channels (32, 64), text encoders of width 32);
  a 64x64, 2-step image takes a fraction of a second on a CPU. Seeded: the same weights every time.
* **full-size**: the architecture of ``stabilityai/stable-diffusion-xl-base-1.0`` from the
  configuration values below (UNet 2.57 B parameters, ViT-L and bigG text encoders), random weights,
  for timing and memory measurements.

A pipeline is written into a temporary sibling directory and renamed onto the target, so a target
directory either holds a complete pipeline or nothing.

diffusers and transformers are imported inside the builders: importing this module is cheap.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flexyface_pipeline.lib.models.tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer

logger = logging.getLogger(__name__)

# The configuration values of stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/,
# text_encoder_2/, scheduler/ config files). RealVisXL releases share them: they are fine-tunes of it.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + 1280 (bigG pooled projection)
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,  # the original SDXL VAE overflows float16
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14 text tower (OpenAI), the first SDXL text encoder.
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB_SIZE,
}

# OpenCLIP ViT-bigG/14 text tower with its projection, the second SDXL text encoder.
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": CLIP_VOCAB_SIZE,
}

# The scheduler file also lists DDIM/PNDM keys (clip_sample, set_alpha_to_one, skip_prk_steps)
# that EulerDiscreteScheduler ignores; only its own keys are kept here.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# diffusers' SDXL fast-test components (tests/pipelines/stable_diffusion_xl), with the text
# encoders' vocabulary widened to the real CLIP tokenizer's.
TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 80,  # 6 time ids x 8 + 32 (pooled projection)
    "cross_attention_dim": 64,  # 32 + 32: both text encoders' hidden states, concatenated
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "sample_size": 128,
}

TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "pad_token_id": 1,
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_act": "gelu",
    "projection_dim": 32,
}

TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
}

# SDXL's second tokenizer pads with "!" (id 0), the first with the end-of-text token.
_TOKENIZER_2_PAD = "!"


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # torch's own ``to``: diffusers' ModelMixin.to warns about float32-kept modules on every dtype
    # cast, even for models that keep none.
    return torch.nn.Module.to(module, dtype=dtype)


def _check_target(directory: Path) -> Path:
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} already exists and is not an empty directory; choose a new model directory")
    return directory


def _tokenizers(workdir: Path) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    vocab_dir = write_clip_tokenizer(workdir / "clip-vocab")
    tokenizer = CLIPTokenizer.from_pretrained(vocab_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(vocab_dir, pad_token=_TOKENIZER_2_PAD)
    return tokenizer, tokenizer_2


def _publish(components: dict[str, Any], directory: Path) -> Path:
    """Save an SDXL pipeline of ``components`` into ``directory``: written next to it, then renamed."""
    from diffusers import StableDiffusionXLPipeline

    directory = _check_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        pipeline = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipeline.save_pretrained(staging, safe_serialization=True)
        if directory.exists():
            directory.rmdir()  # empty (checked above); a rename cannot replace a directory that has files
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def build_tiny_sdxl(directory: Path) -> Path:
    """Write a tiny, deterministic random-weight SDXL pipeline (diffusers' test recipe) to ``directory``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    directory = _check_target(directory)
    with tempfile.TemporaryDirectory() as work, torch.random.fork_rng(devices=[]):
        tokenizer, tokenizer_2 = _tokenizers(Path(work))
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        scheduler = EulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG)
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        torch.manual_seed(0)
        text_config = CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        components = dict(
            unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )
        return _publish(components, directory)


def _random_unet(dtype: torch.dtype) -> Any:
    """The full-size SDXL UNet with PyTorch's default initialisation, allocated directly in ``dtype``.

    The modules are created on the meta device (no memory, no initialisation), cast, materialised
    once, then every layer's own ``reset_parameters`` draws its weights: the initialisation diffusers'
    constructor would give, without first filling 10 GB of float32.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    if any(True for _ in unet.buffers()):
        raise RuntimeError("the SDXL UNet has buffers; meta-device construction would leave them uninitialised")
    unet = _cast(unet, dtype).to_empty(device="cpu")
    initialised: set[int] = set()
    with torch.no_grad():
        for module in unet.modules():
            own = list(module.parameters(recurse=False))
            if own and hasattr(module, "reset_parameters"):
                module.reset_parameters()
                initialised.update(id(p) for p in own)
    left = [name for name, p in unet.named_parameters() if id(p) not in initialised]
    if left:
        raise RuntimeError(f"no initialiser for SDXL UNet parameters {left[:5]}")
    return unet


def build_random_full_sdxl(directory: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a full-size SDXL pipeline with random weights, stored in ``dtype`` (bf16: about 7 GB).

    Peak memory is about the size of the weights in ``dtype`` plus one text encoder in float32.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    directory = _check_target(directory)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = _tokenizers(Path(work))
        unet = _random_unet(dtype)
        vae = _cast(AutoencoderKL(**SDXL_VAE_CONFIG), dtype)
        text_encoder = CLIPTextModel._from_config(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIG), dtype=dtype)
        text_encoder_2 = CLIPTextModelWithProjection._from_config(
            CLIPTextConfig(**SDXL_TEXT_ENCODER_2_CONFIG), dtype=dtype
        )
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
        built = time.perf_counter()
        components = dict(
            unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )
        _publish(components, directory)
    logger.info(
        "full-size SDXL with random weights (%s): built in %.1f s, saved in %.1f s to %s",
        dtype, built - start, time.perf_counter() - built, directory,
    )
    return directory
