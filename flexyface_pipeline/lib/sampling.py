"""Deterministic sampling of a sweep's parameters.

The same sweep name and spec always give the same table: the random stream is seeded from the
sweep's base seed and a hash of its name, never from global state.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.config import SweepSpec

PARAMETER_COLUMNS = [
    "image_id",
    "sweep",
    "index",
    "prompt",
    "prompt_index",
    "steps",
    "guidance",
    "seed",
    "width",
    "height",
    "engine",
]


def image_id(sweep: str, index: int) -> str:
    return f"{sweep}-{index:05d}"


def _stream(spec: SweepSpec) -> np.random.Generator:
    name_key = int.from_bytes(hashlib.sha256(spec.sweep.encode("utf-8")).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.base_seed, name_key])))


def sample_parameters(spec: SweepSpec) -> pd.DataFrame:
    """One row per image: prompt, steps, guidance and a per-image seed.

    Prompts are balanced (each prompt gets ``n // len(prompts)`` or one more images, shuffled), so
    per-prompt normalisation has the same support for every prompt. Guidance is rounded to 0.01.
    """
    rng = _stream(spec)
    n = spec.num_images
    prompt_index = rng.permutation(np.arange(n) % len(spec.prompts))
    steps = rng.integers(spec.steps_min, spec.steps_max, size=n, endpoint=True)
    guidance = np.round(rng.uniform(spec.guidance_min, spec.guidance_max, size=n), 2)
    guidance = np.clip(guidance, spec.guidance_min, spec.guidance_max)
    seeds = rng.integers(0, 2**31 - 1, size=n, dtype=np.int64)
    df = pd.DataFrame(
        {
            "image_id": [image_id(spec.sweep, i) for i in range(n)],
            "sweep": spec.sweep,
            "index": np.arange(n, dtype=np.int64),
            "prompt": [spec.prompts[i] for i in prompt_index],
            "prompt_index": prompt_index.astype(np.int64),
            "steps": steps.astype(np.int64),
            "guidance": guidance.astype(np.float64),
            "seed": seeds,
            "width": np.int64(spec.width),
            "height": np.int64(spec.height),
            "engine": spec.engine,
        }
    )
    return df[PARAMETER_COLUMNS]
