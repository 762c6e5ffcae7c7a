"""GPU memory of each diffusion-transformer engine, on paper: text encoders first vs all at once.

    .venv/bin/python benchmarks/engine_memory.py [--dtype-bytes 2] [--megapixels 1.0]

Parameter counts come from the full-size configurations in lib/models/dit_builders.py (and
sdxl_builders.py for realvis_xl), built on the meta device: shapes only, no memory, no download.
Weights are counted at ``--dtype-bytes`` per parameter (2: bf16). "activations" is the engine's own
``activation_bytes_per_megapixel`` estimate for one image of ``--megapixels`` (the figure that sizes
automatic batches), not a measurement.

Ours (text encoders first, ``TextFirstEngine``): the device holds the text encoders while prompts
are encoded, then the transformer and VAE; the peak is the larger stage. Baseline (all at once,
``pipeline.to("cuda")`` as the model cards do): every model at once. With ``FLEXYFACE_CPU_OFFLOAD``
the peak drops to the largest single model plus activations.
"""

from __future__ import annotations

import argparse
import logging

import torch

from flexyface_pipeline.lib.engines import ENGINES
from flexyface_pipeline.lib.engines.dit import TextFirstEngine

GPUS_GB = (24, 48, 80, 141)
GB = 1e9


def _meta_sdxl() -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from flexyface_pipeline.lib.models import sdxl_builders as b

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**b.SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**b.SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**b.SDXL_TEXT_ENCODER_CONFIG)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**b.SDXL_TEXT_ENCODER_2_CONFIG)),
        }


def parameter_counts(name: str) -> dict[str, int]:
    from flexyface_pipeline.lib.models.dit_builders import meta_components

    cls = ENGINES[name]
    modules = meta_components(cls.pipeline_name) if issubclass(cls, TextFirstEngine) else _meta_sdxl()
    return {part: sum(p.numel() for p in module.parameters()) for part, module in modules.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per parameter (2: bf16/fp16)")
    parser.add_argument("--megapixels", type=float, default=1.0, help="image size for the activation estimate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = []
    print("## Parameters (billions) and bf16 weights (GB) per component\n")
    print("| engine | component | parameters (B) | weights (GB) |")
    print("|---|---|---:|---:|")
    for name, cls in ENGINES.items():
        counts = parameter_counts(name)
        encoders = [p for p in counts if p.startswith("text_encoder")]
        for part, count in counts.items():
            print(f"| {name} | {part} | {count / 1e9:.3f} | {count * args.dtype_bytes / GB:.1f} |")
        text_gb = sum(counts[p] for p in encoders) * args.dtype_bytes / GB
        denoise_gb = sum(c for p, c in counts.items() if p not in encoders) * args.dtype_bytes / GB
        largest_gb = max(counts.values()) * args.dtype_bytes / GB
        act_gb = cls.activation_bytes_per_megapixel * args.megapixels / GB
        rows.append((name, text_gb, denoise_gb, largest_gb, act_gb))

    print(f"\n## Peak GPU memory, weights + activations of one {args.megapixels:g}-megapixel image (GB)\n")
    header = " | ".join(f"fits {g} GB" for g in GPUS_GB)
    print(f"| engine | text encoders | transformer + VAE | activations | text-encoder-first (ours) | "
          f"all at once (baseline) | CPU offload | {header} |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---|" * len(GPUS_GB))
    for name, text_gb, denoise_gb, largest_gb, act_gb in rows:
        # realvis_xl keeps its (small) text encoders beside the UNet: its "ours" is all at once.
        ours = max(text_gb, denoise_gb + act_gb) if issubclass(ENGINES[name], TextFirstEngine) else \
            text_gb + denoise_gb + act_gb
        baseline = text_gb + denoise_gb + act_gb
        offload = largest_gb + act_gb
        fits = " | ".join(
            "both" if baseline <= g else "ours only" if ours <= g else "offload only" if offload <= g else "no"
            for g in GPUS_GB
        )
        print(f"| {name} | {text_gb:.1f} | {denoise_gb:.1f} | {act_gb:.1f} | {ours:.1f} | {baseline:.1f} | "
              f"{offload:.1f} | {fits} |")
    print("\n'both': text-encoder-first and all-at-once fit; 'ours only': only text-encoder-first fits; "
          "'offload only': only with FLEXYFACE_CPU_OFFLOAD=true. GB = 1e9 bytes, cards compared at their "
          "nominal size in GB (conservative: a '24 GB' card has 24 GiB = 25.8 GB); the CUDA context and "
          "allocator overhead (~1 GB) are not counted.")


if __name__ == "__main__":
    main()
