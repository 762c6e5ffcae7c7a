"""Sweep designs: how a sweep's rows (prompt, seed, steps, guidance, size, scheduler) are chosen.

Every design is deterministic: its random stream is seeded from the sweep's base seed and a hash
of its name (``sampling.stream``). A design draws one paired set of rows — prompts, seeds and
settings — and every engine of the sweep gets the same prompts and seeds: a setting is drawn as a
quantile ``u`` in [0, 1) and mapped into each engine's own range, so engines with different step
ranges get steps at the same relative position. Engines that take no guidance get NaN guidance
(and a grid collapses its guidance axis for them).

Adding a design: subclass :class:`Design`, implement ``base_rows`` (one row per image of the
paired set, with the quantile columns ``u_steps`` and ``u_guidance``, or the fixed values
``steps`` and ``guidance`` for axis-value designs), and add one line to ``DESIGNS``. Settings the
design needs go on ``SweepSpec`` (with a default, so stored sweeps still load) and are validated
in ``config.build_sweep_spec``.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # designs know specs by their fields; config validates with the designs
    from flexyface_pipeline.lib.config import SweepSpec

MAX_SEED = 2**31 - 1


@dataclass
class DesignResult:
    """The sampled rows (``sampling.PARAMETER_COLUMNS``) and what the design reports about itself."""

    table: pd.DataFrame
    info: dict = field(default_factory=dict)


class Design:
    name: ClassVar[str]
    description: ClassVar[str]
    axis_values: ClassVar[bool] = False  # takes explicit axis values (steps_values, ...), not ranges
    adaptive: ClassVar[bool] = False  # rows come from a tuner round by round (lib/tuning.py)

    def base_rows(self, spec: SweepSpec, rng: np.random.Generator,
                  first_engine: type) -> tuple[pd.DataFrame, dict]:
        """The paired set: columns prompt_index, seed, size_index, scheduler_index and either
        (steps, guidance) for ``first_engine`` plus quantiles (u_steps, u_guidance), or fixed
        (steps, guidance) values. Returns the rows and the design's report."""
        raise NotImplementedError


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Indices 0..k-1, each ``n // k`` or one more times, shuffled."""
    return rng.permutation(np.arange(n) % k)


def steps_range(spec: SweepSpec, engine: type) -> tuple[int, int]:
    """The sweep's steps range for ``engine``: the given one, else the engine's default."""
    if spec.steps_min is not None and spec.steps_max is not None:
        return int(spec.steps_min), int(spec.steps_max)
    lo, hi = engine.default_steps
    return int(lo), int(hi)


def guidance_range(spec: SweepSpec, engine: type) -> tuple[float, float] | None:
    """The sweep's guidance range for ``engine``; None when the engine takes no guidance."""
    if getattr(engine, "guidance_kind", "cfg") == "none":
        return None
    if spec.guidance_min is not None and spec.guidance_max is not None:
        return float(spec.guidance_min), float(spec.guidance_max)
    lo, hi = engine.default_guidance
    return float(lo), float(hi)


def steps_from_quantile(u: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Integers in [lo, hi], each with probability 1 / (hi - lo + 1) for uniform ``u``."""
    return np.clip(lo + np.floor(u * (hi - lo + 1)).astype(np.int64), lo, hi)


def guidance_from_quantile(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo + (hi - lo) u`` rounded to 0.01 (the arithmetic of ``Generator.uniform``)."""
    return np.clip(np.round(lo + (hi - lo) * u, 2), lo, hi)


class RandomDesign(Design):
    """Uniform random steps and guidance, prompts balanced. A single-engine sweep draws exactly
    the stream it always has; more engines, sizes or schedulers draw extra numbers after it."""

    name = "random"
    description = "uniform random over the steps and guidance ranges"

    def base_rows(self, spec, rng, first_engine):
        n = spec.num_images
        prompt_index = _balanced(rng, n, len(spec.prompts))
        s_lo, s_hi = steps_range(spec, first_engine)
        steps = rng.integers(s_lo, s_hi, size=n, endpoint=True)
        u_guidance = rng.random(n)  # Generator.uniform(lo, hi) is lo + (hi - lo) * this
        seeds = rng.integers(0, MAX_SEED, size=n, dtype=np.int64)
        # Appended to the stream (earlier draws unchanged): where in its integer bin each step
        # count lies, so ``u_steps`` is uniform and maps onto other engines' ranges.
        jitter = rng.random(n) if len(spec.engines) > 1 else np.full(n, 0.5)
        u_steps = (steps - s_lo + jitter) / (s_hi - s_lo + 1)
        rows = pd.DataFrame({"prompt_index": prompt_index, "seed": seeds, "u_steps": u_steps,
                             "u_guidance": u_guidance, "first_steps": steps.astype(np.int64)})
        _categorical_axes(rows, spec, rng)
        return rows, {}


class SobolDesign(Design):
    """Scrambled Sobol points over (steps, guidance) quantiles: the settings cover the ranges
    more evenly than random draws. Prompts are balanced and shuffled as in ``random``."""

    name = "sobol"
    description = "scrambled Sobol sequence over the steps and guidance ranges (scipy.stats.qmc)"

    def base_rows(self, spec, rng, first_engine):
        from scipy.stats import qmc

        n = spec.num_images
        prompt_index = _balanced(rng, n, len(spec.prompts))
        seeds = rng.integers(0, MAX_SEED, size=n, dtype=np.int64)
        sampler = qmc.Sobol(2, scramble=True, rng=rng)
        m = max(0, int(np.ceil(np.log2(n))))
        points = sampler.random_base2(m)[:n]  # the first n of 2^m points
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            discrepancy = float(qmc.discrepancy(points)) if n > 1 else 0.0
            baseline = rng.random((n, 2))
            random_discrepancy = float(qmc.discrepancy(baseline)) if n > 1 else 0.0
        rows = pd.DataFrame({"prompt_index": prompt_index, "seed": seeds,
                             "u_steps": points[:, 0], "u_guidance": points[:, 1]})
        _categorical_axes(rows, spec, rng)
        return rows, {"discrepancy": discrepancy, "random_discrepancy": random_discrepancy}


class GridDesign(Design):
    """Every combination of the axis values (steps × guidance × sizes × schedulers) for every
    prompt, with ``seeds_per_cell`` seeds per prompt: the same seeds in every cell of a prompt."""

    name = "grid"
    description = "every combination of the given axis values, the same seeds in every cell of a prompt"
    axis_values = True

    def base_rows(self, spec, rng, first_engine):
        k = spec.seeds_per_cell
        seeds = rng.integers(0, MAX_SEED, size=(len(spec.prompts), k), dtype=np.int64)
        guidance = spec.guidance_values or (np.nan,)
        cells = list(itertools.product(spec.steps_values, guidance, range(len(spec.size_axis)),
                                       range(len(spec.scheduler_axis))))
        records = [
            {"prompt_index": p, "seed": seeds[p, j], "steps": s, "guidance": g, "size_index": z, "scheduler_index": c}
            for p in range(len(spec.prompts)) for (s, g, z, c) in cells for j in range(k)
        ]
        return pd.DataFrame.from_records(records), {"cells": len(cells)}


class AdaptiveDesign(Design):
    """Rows proposed round by round by a multi-objective Optuna study (``lib/tuning.py``):
    ``num_images`` is the budget. Sampling gives no rows; each round appends its trials' rows."""

    name = "adaptive"
    description = "Optuna proposes each round's settings from the scores so far (flexyface tune)"
    adaptive = True

    def base_rows(self, spec, rng, first_engine):
        return pd.DataFrame({"prompt_index": [], "seed": [], "steps": [], "guidance": []}), {}


def _categorical_axes(rows: pd.DataFrame, spec: SweepSpec, rng: np.random.Generator) -> None:
    """Size and scheduler per row, balanced; drawn only when the axis has several values."""
    n = len(rows)
    for column, axis in (("size_index", spec.size_axis), ("scheduler_index", spec.scheduler_axis)):
        rows[column] = _balanced(rng, n, len(axis)) if len(axis) > 1 else 0


def axis_bins(stored: dict | None) -> dict:
    """Contact-sheet bin counts for a stored sweep spec: a grid's sheets get one bin per axis
    value (every cell filled); other designs keep the sheets' defaults."""
    if not stored or stored.get("design") != "grid":
        return {}
    return {"steps_bins": len(stored.get("steps_values") or ()) or 1,
            "guidance_bins": len(stored.get("guidance_values") or ()) or 1}


DESIGNS: dict[str, Design] = {
    design.name: design for design in (RandomDesign(), GridDesign(), SobolDesign(), AdaptiveDesign())
}


def get_design(name: str) -> Design:
    """The design registered under ``name``."""
    try:
        return DESIGNS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown design {name!r}; known designs: {', '.join(DESIGNS)}") from None
