"""Random-weight diffusion-transformer pipelines (FLUX.1, SD 3.5, HiDream-I1, FLUX.2), saved like hub releases.

Each pipeline is made of the classes its release is made of and written with ``save_pretrained``
(safetensors), so it loads through the same ``from_pretrained`` path as the real weights, offline:

* **tiny**: the transformer, VAE and text encoders of diffusers' own fast tests (tests/pipelines/
  flux, stable_diffusion_3, hidream_image, flux2), a few layers of width 8-64, with a four-block VAE
  (8x downsampling, like the real ones, so image sizes behave the same). Their tokenizers come from
  the hub in diffusers' tests; here they are built offline: CLIP with the real 49,408-token
  vocabulary (``tokenizer.write_clip_tokenizer``), T5 as a small Unigram vocabulary, Llama and
  Mistral as byte-level BPE vocabularies of the 256 byte symbols plus the special tokens the
  pipelines use. Seeded: the same weights every time.
* **full-size**: the published architectures from the configuration values below, random
  weights, for memory and timing measurements (tens of GB: see ``benchmarks/engine_memory.py``).

diffusers and transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flexyface_pipeline.lib.models.sdxl_builders import SDXL_TEXT_ENCODER_2_CONFIG, SDXL_TEXT_ENCODER_CONFIG
from flexyface_pipeline.lib.models.tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Full-size configurations (values of the published config.json files)
# ---------------------------------------------------------------------------------------------

# The 16-channel VAE of black-forest-labs/FLUX.1-* (vae/config.json); HiDream-I1 ships the same VAE.
FLUX1_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# stabilityai/stable-diffusion-3.5-* vae/config.json: the same architecture, its own latent statistics.
SD35_VAE_CONFIG: dict[str, Any] = FLUX1_VAE_CONFIG | {"scaling_factor": 1.5305, "shift_factor": 0.0609}

# google/t5-v1_1-xxl's encoder, text_encoder_2 of FLUX.1 and text_encoder_3 of SD 3.5 / HiDream-I1.
T5_XXL_CONFIG: dict[str, Any] = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

# black-forest-labs/FLUX.1-schnell transformer/config.json (FLUX.1-dev differs in guidance_embeds=True).
FLUX1_SCHNELL_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# FLUX.1-schnell scheduler/scheduler_config.json: timestep-distilled, no resolution-dependent shift.
FLUX1_SCHNELL_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

# stabilityai/stable-diffusion-3.5-large transformer/config.json (8.1 B parameters).
SD35_LARGE_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 2432,
    "dual_attention_layers": [],
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 38,
    "num_layers": 38,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}

SD35_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# HiDream-ai/HiDream-I1-Full transformer/config.json (17 B parameters, mixture-of-experts feed-forward).
HIDREAM_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [64, 32, 32],
    "caption_channels": [4096, 4096],
    "in_channels": 16,
    "llama_layers": list(range(32)) + [31] * 16,
    "max_resolution": [128, 128],
    "num_activated_experts": 2,
    "num_attention_heads": 20,
    "num_layers": 16,
    "num_routed_experts": 4,
    "num_single_layers": 32,
    "out_channels": 16,
    "patch_size": 2,
    "text_emb_dim": 2048,
}

# HiDream-I1's CLIP text encoders: SD3's CLIP-L / CLIP-G with projection, 248 positions (Long-CLIP).
HIDREAM_TEXT_ENCODER_CONFIG: dict[str, Any] = SDXL_TEXT_ENCODER_CONFIG | {"max_position_embeddings": 248}
HIDREAM_TEXT_ENCODER_2_CONFIG: dict[str, Any] = SDXL_TEXT_ENCODER_2_CONFIG | {"max_position_embeddings": 248}

# meta-llama/Llama-3.1-8B-Instruct config.json, HiDream-I1's text_encoder_4.
LLAMA31_8B_CONFIG: dict[str, Any] = {
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
}

HIDREAM_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

# black-forest-labs/FLUX.2-dev transformer (diffusers scripts/convert_flux2_to_diffusers.py, "flux2-dev").
FLUX2_DEV_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "in_channels": 128,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}

# FLUX.2-dev's VAE is AutoencoderKLFlux2 with its default configuration (32 latent channels).
FLUX2_VAE_CONFIG: dict[str, Any] = {}

# FLUX.2-dev's text encoder: Mistral-Small-3.2-24B-Instruct (transformers' Mistral3Config defaults
# are these values: text 5120 wide, 40 layers, 131,072 tokens; Pixtral vision tower 1024 wide, 24
# layers), with a separate output head.
FLUX2_TEXT_ENCODER_CONFIG: dict[str, Any] = {"tie_word_embeddings": False}

# FLUX.2-dev reuses FLUX.1-dev's scheduler (resolution-dependent shift; the pipeline computes mu).
FLUX2_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# ---------------------------------------------------------------------------------------------
# Tiny configurations (diffusers' fast-test components, see the module docstring)
# ---------------------------------------------------------------------------------------------

TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [8, 8, 8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

TINY_CLIP_CONFIG: dict[str, Any] = {
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "pad_token_id": 1,
    "projection_dim": 32,
    "vocab_size": CLIP_VOCAB_SIZE,
}

TINY_T5_CONFIG: dict[str, Any] = {
    "d_ff": 37,
    "d_kv": 8,
    "d_model": 32,
    "feed_forward_proj": "gated-gelu",
    "num_heads": 4,
    "num_layers": 2,
    "relative_attention_max_distance": 16,
    "relative_attention_num_buckets": 8,
    "vocab_size": 128,
}

TINY_FLUX1_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 4, 8],
    "guidance_embeds": False,
    "in_channels": 16,  # 4 latent channels, packed 2x2
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 1,
    "patch_size": 1,
    "pooled_projection_dim": 32,
}

TINY_SD3_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 8,
    "caption_projection_dim": 32,
    "in_channels": 4,
    "joint_attention_dim": 64,
    "num_attention_heads": 4,
    "num_layers": 1,
    "out_channels": 4,
    "patch_size": 2,
    "pooled_projection_dim": 64,  # two CLIP projections of 32
    "qk_norm": "rms_norm",
    "sample_size": 32,
}

TINY_HIDREAM_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 8,
    "axes_dims_rope": [4, 2, 2],
    "caption_channels": [32, 16],  # T5 width, Llama width
    "in_channels": 4,
    "llama_layers": [0, 1],
    "max_resolution": [32, 32],
    "num_activated_experts": 2,
    "num_attention_heads": 4,
    "num_layers": 1,
    "num_routed_experts": 4,
    "num_single_layers": 1,
    "out_channels": 4,
    "patch_size": 2,
    "text_emb_dim": 64,  # two CLIP projections of 32
}

TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 37,
    "max_position_embeddings": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "vocab_size": 320,
}

# Flux2Pipeline stacks the Mistral hidden states of layers (10, 20, 30) by default: 30 layers, so the
# pipeline runs with its default arguments. joint_attention_dim = 3 x 16.
TINY_MISTRAL3_CONFIG: dict[str, Any] = {
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 320,
        "hidden_size": 16,
        "intermediate_size": 37,
        "max_position_embeddings": 1024,
        "num_attention_heads": 4,
        "num_hidden_layers": 30,
        "num_key_value_heads": 2,
        "head_dim": 4,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000000.0,
        "sliding_window": None,
    },
    "vision_config": {
        "model_type": "pixtral",
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "image_size": 30,
        "patch_size": 6,
        "num_channels": 3,
        "head_dim": 4,
    },
    "image_seq_length": 4,
    "vision_feature_layer": -1,
    "tie_word_embeddings": False,
}

TINY_FLUX2_TRANSFORMER_CONFIG: dict[str, Any] = {
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 4, 4, 4],
    "in_channels": 16,  # 4 latent channels, patchified 2x2
    "joint_attention_dim": 48,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 1,
    "patch_size": 1,
    "timestep_guidance_channels": 256,
}

TINY_FLUX2_VAE_CONFIG: dict[str, Any] = TINY_VAE_CONFIG | {"batch_norm_eps": 1e-4}

# ---------------------------------------------------------------------------------------------
# Tokenizers, built offline
# ---------------------------------------------------------------------------------------------

# A text-only rendering of Mistral-Small-3.x's chat format ([SYSTEM_PROMPT]...[/SYSTEM_PROMPT]
# [INST]...[/INST]), enough for Flux2Pipeline's text prompts.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                          "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
LLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>"]


def clip_tokenizers(workdir: Path, *, second_pad: str | None = None) -> tuple[Any, Any]:
    """Two CLIP tokenizers of the real vocabulary; the second pads with ``second_pad`` if given
    (CLIP-G tokenizers of SDXL/SD3 pad with "!")."""
    from transformers import CLIPTokenizer

    vocab_dir = write_clip_tokenizer(workdir / "clip-vocab")
    first = CLIPTokenizer.from_pretrained(vocab_dir)
    second = CLIPTokenizer.from_pretrained(vocab_dir, **({"pad_token": second_pad} if second_pad else {}))
    return first, second


def t5_tokenizer() -> Any:
    """A T5 tokenizer (Unigram, T5's special tokens <pad>=0, </s>=1, <unk>=2) of a small vocabulary."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -4.0) for c in string.ascii_lowercase]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    if len(pieces) > TINY_T5_CONFIG["vocab_size"]:
        raise RuntimeError("tiny T5 vocabulary larger than the tiny T5 model's embedding")
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def byte_level_bpe(specials: list[str], *, bos: str, eos: str, pad: str | None, template_bos: bool) -> Any:
    """A byte-level BPE tokenizer (as Llama 3 and Mistral's Tekken are) of the 256 byte symbols and
    ``specials``, without merges: each byte is a token. ``template_bos`` prepends the BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(specials)
    if template_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    kwargs = {"bos_token": bos, "eos_token": eos} | ({"pad_token": pad} if pad else {})
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=131072, **kwargs)


def llama_tokenizer() -> Any:
    return byte_level_bpe(LLAMA_SPECIAL_TOKENS, bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                          template_bos=True)


def pixtral_processor() -> Any:
    """A ``PixtralProcessor`` (what FLUX.2 releases ship as ``tokenizer``) with a byte-level tokenizer."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokenizer = byte_level_bpe(MISTRAL_SPECIAL_TOKENS, bos="<s>", eos="</s>", pad="<pad>", template_bos=False)
    tokenizer.unk_token = "<unk>"
    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size={"height": 6, "width": 6}),
                            tokenizer=tokenizer, patch_size=6, chat_template=MISTRAL_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def check_target(directory: Path) -> Path:
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} already exists and is not an empty directory; choose a new model directory")
    return directory


def publish(pipeline_class: type, components: dict[str, Any], directory: Path) -> Path:
    """Save a pipeline of ``components`` into ``directory``: written next to it, then renamed."""
    directory = check_target(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        pipeline_class(**components).save_pretrained(staging, safe_serialization=True)
        if directory.exists():
            directory.rmdir()
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Construct modules directly in ``dtype`` (random full-size weights without a float32 copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _seeded(seed: int, make: Any) -> Any:
    torch.manual_seed(seed)
    return make()


# ---------------------------------------------------------------------------------------------
# Components of each pipeline
# ---------------------------------------------------------------------------------------------


def flux1_components(workdir: Path, *, full: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, _ = clip_tokenizers(workdir)
    return dict(
        transformer=_seeded(0, lambda: FluxTransformer2DModel(
            **(FLUX1_SCHNELL_TRANSFORMER_CONFIG if full else TINY_FLUX1_TRANSFORMER_CONFIG))),
        vae=_seeded(0, lambda: AutoencoderKL(**(FLUX1_VAE_CONFIG if full else TINY_VAE_CONFIG | {
            "scaling_factor": 0.3611, "shift_factor": 0.1159}))),
        text_encoder=_seeded(0, lambda: CLIPTextModel(CLIPTextConfig(
            **(SDXL_TEXT_ENCODER_CONFIG if full else TINY_CLIP_CONFIG)))),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(0, lambda: T5EncoderModel(T5Config(**(T5_XXL_CONFIG if full else TINY_T5_CONFIG)))),
        tokenizer_2=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_SCHNELL_SCHEDULER_CONFIG),
    )


def sd35_components(workdir: Path, *, full: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizers(workdir, second_pad="!")
    tiny_t5 = TINY_T5_CONFIG | {"d_model": 64}  # the CLIP pair (2 x 32) is padded to T5's width
    return dict(
        transformer=_seeded(0, lambda: SD3Transformer2DModel(
            **(SD35_LARGE_TRANSFORMER_CONFIG if full else TINY_SD3_TRANSFORMER_CONFIG))),
        vae=_seeded(0, lambda: AutoencoderKL(**(SD35_VAE_CONFIG if full else TINY_VAE_CONFIG | {
            "scaling_factor": 1.5305, "shift_factor": 0.0609}))),
        text_encoder=_seeded(0, lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            **(SDXL_TEXT_ENCODER_CONFIG if full else TINY_CLIP_CONFIG)))),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(1, lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            **(SDXL_TEXT_ENCODER_2_CONFIG if full else TINY_CLIP_CONFIG)))),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_seeded(0, lambda: T5EncoderModel(T5Config(**(T5_XXL_CONFIG if full else tiny_t5)))),
        tokenizer_3=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG),
    )


def hidream_components(workdir: Path, *, full: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImageTransformer2DModel
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM,
                              T5Config, T5EncoderModel)

    tokenizer, tokenizer_2 = clip_tokenizers(workdir)
    tiny_clip = TINY_CLIP_CONFIG | {"max_position_embeddings": 128}  # HiDream pads CLIP input to 128 tokens
    return dict(
        transformer=_seeded(0, lambda: HiDreamImageTransformer2DModel(
            **(HIDREAM_TRANSFORMER_CONFIG if full else TINY_HIDREAM_TRANSFORMER_CONFIG))),
        vae=_seeded(0, lambda: AutoencoderKL(**(FLUX1_VAE_CONFIG if full else TINY_VAE_CONFIG | {
            "scaling_factor": 0.3611, "shift_factor": 0.1159}))),
        text_encoder=_seeded(0, lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            **(HIDREAM_TEXT_ENCODER_CONFIG if full else tiny_clip)))),
        tokenizer=tokenizer,
        text_encoder_2=_seeded(1, lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            **(HIDREAM_TEXT_ENCODER_2_CONFIG if full else tiny_clip)))),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_seeded(0, lambda: T5EncoderModel(T5Config(**(T5_XXL_CONFIG if full else TINY_T5_CONFIG)))),
        tokenizer_3=t5_tokenizer(),
        text_encoder_4=_seeded(0, lambda: LlamaForCausalLM(LlamaConfig(
            **(LLAMA31_8B_CONFIG if full else TINY_LLAMA_CONFIG)))),
        tokenizer_4=llama_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**HIDREAM_SCHEDULER_CONFIG),
    )


def flux2_components(workdir: Path, *, full: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    del workdir  # nothing to write: the processor is built in memory
    return dict(
        transformer=_seeded(0, lambda: Flux2Transformer2DModel(
            **(FLUX2_DEV_TRANSFORMER_CONFIG if full else TINY_FLUX2_TRANSFORMER_CONFIG))),
        vae=_seeded(0, lambda: AutoencoderKLFlux2(**(FLUX2_VAE_CONFIG if full else TINY_FLUX2_VAE_CONFIG))),
        text_encoder=_seeded(0, lambda: Mistral3ForConditionalGeneration(Mistral3Config(
            **(FLUX2_TEXT_ENCODER_CONFIG if full else TINY_MISTRAL3_CONFIG)))),
        tokenizer=pixtral_processor(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
    )


COMPONENTS = {
    "FluxPipeline": flux1_components,
    "StableDiffusion3Pipeline": sd35_components,
    "HiDreamImagePipeline": hidream_components,
    "Flux2Pipeline": flux2_components,
}


def build(pipeline_name: str, directory: Path, *, full: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the tiny (float32) or full-size (``dtype``) random-weight pipeline ``pipeline_name``."""
    import diffusers

    directory = check_target(directory)
    make = COMPONENTS[pipeline_name]
    with tempfile.TemporaryDirectory() as work, torch.random.fork_rng(devices=[]):
        context = default_dtype(dtype) if full else contextlib.nullcontext()
        with context:
            components = make(Path(work), full=full)
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                module.eval()
        publish(getattr(diffusers, pipeline_name), components, directory)
    logger.info("%s %s with random weights written to %s", "full-size" if full else "tiny", pipeline_name, directory)
    return directory


def meta_components(pipeline_name: str) -> dict[str, torch.nn.Module]:
    """The full-size modules of ``pipeline_name`` on the meta device (shapes only, no memory)."""
    with tempfile.TemporaryDirectory() as work, torch.device("meta"):
        components = COMPONENTS[pipeline_name](Path(work), full=True)
    return {name: m for name, m in components.items() if isinstance(m, torch.nn.Module)}
