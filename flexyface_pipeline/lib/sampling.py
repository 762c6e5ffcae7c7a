"""Deterministic sampling of a sweep's parameters.

The same sweep name and spec always give the same table: the random stream is seeded from the
sweep's base seed and a hash of its name, never from global state.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.config import SweepSpec
from flexyface_pipeline.lib.designs import DesignResult

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


def stream(spec: SweepSpec) -> np.random.Generator:
    """The sweep's random stream: from its base seed and a hash of its name, never global state."""
    name_key = int.from_bytes(hashlib.sha256(spec.sweep.encode("utf-8")).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.base_seed, name_key])))



def parameter_columns(spec: SweepSpec) -> list[str]:
    """The parameters table's columns: ``scheduler`` only where the sweep has a scheduler axis
    (tables of sweeps without one are exactly what they were before the axis existed)."""
    return PARAMETER_COLUMNS + (["scheduler"] if spec.schedulers else [])


def sample_design(spec: SweepSpec, engine_classes: dict | None = None) -> DesignResult:
    """One row per image of every engine, and the design's report (e.g. Sobol discrepancy).

    The design draws one paired set of rows (prompt, seed, settings); each engine gets a copy,
    its settings mapped into its own ranges (``designs`` module docstring). Rows are ordered
    engine by engine; image ids number them in that order.
    """
    from flexyface_pipeline.lib.designs import get_design, guidance_range, guidance_from_quantile, steps_from_quantile, steps_range

    if engine_classes is None:
        from flexyface_pipeline.lib.engines import ENGINES

        engine_classes = ENGINES
    design = get_design(spec.design)
    classes = [engine_classes[name] for name in spec.engines]
    rng = stream(spec)
    base, info = design.base_rows(spec, rng, classes[0])
    frames = []
    for name, cls in zip(spec.engines, classes):
        rows = base.copy()
        g_range = guidance_range(spec, cls)
        if "u_steps" in rows:
            lo, hi = steps_range(spec, cls)
            if "first_steps" in rows and (lo, hi) == steps_range(spec, classes[0]):
                rows["steps"] = rows["first_steps"]
            else:
                rows["steps"] = steps_from_quantile(rows["u_steps"].to_numpy(), lo, hi)
            rows["guidance"] = (np.nan if g_range is None
                                else guidance_from_quantile(rows["u_guidance"].to_numpy(), *g_range))
        elif g_range is None and len(rows):
            # An axis-value design: an engine without guidance gets each cell once, guidance NaN.
            first = rows["guidance"].iloc[0]
            rows = rows[(rows["guidance"] == first) | rows["guidance"].isna()].assign(guidance=np.nan)
        rows["engine"] = name
        frames.append(rows)
    rows = pd.concat(frames, ignore_index=True)
    n = len(rows)
    sizes = spec.size_axis
    size_index = rows["size_index"].to_numpy(dtype=np.int64) if "size_index" in rows else np.zeros(n, dtype=np.int64)
    df = pd.DataFrame(
        {
            "image_id": [image_id(spec.sweep, i) for i in range(n)],
            "sweep": spec.sweep,
            "index": np.arange(n, dtype=np.int64),
            "prompt": [spec.prompts[int(i)] for i in rows["prompt_index"]],
            "prompt_index": rows["prompt_index"].to_numpy(dtype=np.int64),
            "steps": rows["steps"].to_numpy(dtype=np.int64),
            "guidance": rows["guidance"].to_numpy(dtype=np.float64),
            "seed": rows["seed"].to_numpy(dtype=np.int64),
            "width": np.array([sizes[i][0] for i in size_index], dtype=np.int64),
            "height": np.array([sizes[i][1] for i in size_index], dtype=np.int64),
            "engine": rows["engine"].to_numpy(dtype=object),
        }
    )
    if spec.schedulers:
        df["scheduler"] = [spec.scheduler_axis[int(i)] for i in rows["scheduler_index"]]
    return DesignResult(df[parameter_columns(spec)], {"design": spec.design, **info})


def sample_parameters(spec: SweepSpec, engine_classes: dict | None = None) -> pd.DataFrame:
    """One row per image: prompt, steps, guidance and a per-image seed (see ``sample_design``).

    Prompts are balanced (each prompt gets ``n // len(prompts)`` or one more images, shuffled), so
    per-prompt normalisation has the same support for every prompt. Guidance is rounded to 0.01.
    """
    return sample_design(spec, engine_classes).table
