"""Effects of a categorical axis (engine, scheduler, size): per value, the mean within-prompt
z-score of a metric with a bootstrap 95 % interval.

z-scores within each prompt (``within_prompt_zscores``) make values comparable across prompts,
so a scheduler used more often with an easy prompt is not credited for it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.analysis.stats import bootstrap_mean, within_prompt_zscores

CATEGORICAL_AXES = ("engine", "scheduler", "size")


def categorical_axes(df: pd.DataFrame) -> list[str]:
    """The categorical columns that vary in ``df`` (``size`` is width × height)."""
    out = []
    for axis in CATEGORICAL_AXES:
        values = _values(df, axis)
        if values is not None and values.nunique(dropna=False) > 1:
            out.append(axis)
    return out


def _values(df: pd.DataFrame, axis: str) -> pd.Series | None:
    if axis == "size":
        if "width" not in df or "height" not in df:
            return None
        return df["width"].astype("Int64").astype(str) + "x" + df["height"].astype("Int64").astype(str)
    if axis not in df:
        return None
    return df[axis].astype("object").where(df[axis].notna(), "default").astype(str)


def categorical_effect(df: pd.DataFrame, axis: str, metric: str, *, n_resamples: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """One row per value of ``axis``: images, mean raw score, mean within-prompt z and its 95 %
    bootstrap interval. Raises ValueError for an axis or metric the table lacks."""
    values = _values(df, axis)
    if values is None:
        raise ValueError(f"categorical axis {axis!r} is not in the table; known axes: {list(CATEGORICAL_AXES)}")
    if metric not in df:
        raise ValueError(f"metric {metric!r} is not in the table")
    z = within_prompt_zscores(df, [metric])[f"{metric}_z"].to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    rows = []
    for value in dict.fromkeys(values):
        mask = (values == value).to_numpy()
        zs = np.asarray(z[mask], dtype=float)
        zs = zs[np.isfinite(zs)]
        estimate = bootstrap_mean(zs, n_resamples=n_resamples, rng=rng)
        rows.append({"axis": axis, "value": value, "n": int(zs.size),
                     "mean": float(pd.to_numeric(df.loc[mask, metric], errors="coerce").mean()),
                     "z_mean": estimate.mean, "z_ci_low": estimate.ci_low, "z_ci_high": estimate.ci_high})
    return pd.DataFrame(rows)


def categorical_tables(df: pd.DataFrame, metrics, *, n_resamples: int = 1000, seed: int = 0) -> list[pd.DataFrame]:
    """``categorical_effect`` of every varying categorical axis and every metric, one table per
    (axis, metric) with a ``metric`` column; none when no categorical axis varies."""
    tables = []
    for axis in categorical_axes(df):
        for metric in metrics:
            if metric in df:
                tables.append(categorical_effect(df, axis, metric, n_resamples=n_resamples, seed=seed)
                              .assign(metric=metric))
    return tables


def categorical_records(df: pd.DataFrame, metrics, *, n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """The same as plain records (NaN as None), for recommendations.json."""
    out = []
    for table in categorical_tables(df, metrics, n_resamples=n_resamples, seed=seed):
        for row in table.to_dict("records"):
            out.append({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
    return out
