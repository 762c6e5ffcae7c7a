"""Statistical building blocks of the sweep analysis: binning, bootstrap intervals, tests, fronts.

Everything here is a pure function of its arguments. Random resampling takes an explicit
``numpy.random.Generator``; :func:`child_rng` derives one per analysis unit from the user's seed
and a stable key, so adding a metric never changes the intervals of another.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.nonparametric.smoothers_lowess import lowess
from statsmodels.stats.multitest import multipletests

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap confidence interval and the number of images behind it."""

    mean: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "mean": _finite_or_none(self.mean),
            "ci_low": _finite_or_none(self.ci_low),
            "ci_high": _finite_or_none(self.ci_high),
            "n": int(self.n),
        }


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def child_rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator determined by ``seed`` and the string ``keys`` (stable across runs and platforms)."""
    words = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF]
    words += [zlib.crc32(k.encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


# --------------------------------------------------------------------------------------------
# Binning


@dataclass(frozen=True)
class Bins:
    """Contiguous bins over one setting. Bin ``i`` holds values in ``[lows[i], highs[i]]``.

    For integer settings (steps) the bounds are the smallest and largest integer in the bin; for
    continuous ones (guidance) they are the bin edges (each bin includes its lower edge, the last
    one also its upper edge).
    """

    lows: tuple[float, ...]
    highs: tuple[float, ...]
    integer: bool

    def __len__(self) -> int:
        return len(self.lows)

    @property
    def centres(self) -> np.ndarray:
        return (np.asarray(self.lows, dtype=float) + np.asarray(self.highs, dtype=float)) / 2.0

    def label(self, i: int) -> str:
        lo, hi = self.lows[i], self.highs[i]
        if self.integer:
            return f"{int(lo)}" if lo == hi else f"{int(lo)}–{int(hi)}"
        return f"{lo:.2f}" if lo == hi else f"{lo:.2f}–{hi:.2f}"

    @property
    def labels(self) -> list[str]:
        return [self.label(i) for i in range(len(self))]

    def assign(self, values: np.ndarray | pd.Series) -> np.ndarray:
        """Bin index of each value; -1 for NaN or values outside every bin."""
        v = np.asarray(values, dtype=float)
        lows = np.asarray(self.lows, dtype=float)
        highs = np.asarray(self.highs, dtype=float)
        idx = np.searchsorted(lows, v, side="right") - 1
        ok = np.isfinite(v) & (idx >= 0)
        idx = np.where(ok, idx, 0)
        # searchsorted puts a value equal to the next bin's low edge into that bin, so checking the
        # upper bound covers closed integer bins, half-open continuous bins and single-value bins.
        inside = ok & (v <= highs[idx])
        return np.where(inside, idx, -1)


def make_bins(values: np.ndarray | pd.Series, n_bins: int, *, integer: bool) -> Bins:
    """Equal-width bins over the observed range of ``values``.

    When the setting took at most ``n_bins`` distinct values, each value is its own bin (a sweep
    over a handful of fixed step counts keeps them apart). Raises ``ValueError`` on empty input.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("cannot bin an empty or all-NaN column")
    distinct = np.unique(v)
    if distinct.size <= n_bins:
        return Bins(tuple(float(x) for x in distinct), tuple(float(x) for x in distinct), integer)
    lo, hi = float(distinct[0]), float(distinct[-1])
    if integer:
        edges = np.linspace(lo, hi + 1.0, n_bins + 1)
        lows = np.ceil(edges[:-1] - 1e-9)
        highs = np.ceil(edges[1:] - 1e-9) - 1.0
        keep = lows <= highs
        return Bins(tuple(float(x) for x in lows[keep]), tuple(float(x) for x in highs[keep]), True)
    edges = np.linspace(lo, hi, n_bins + 1)
    return Bins(tuple(float(x) for x in edges[:-1]), tuple(float(x) for x in edges[1:]), False)


def auto_bin_count(n: int, distinct: int, *, min_per_bin: int, max_bins: int) -> int:
    """Bins so that an average bin holds about three times ``min_per_bin`` images."""
    by_size = max(2, n // max(1, 3 * min_per_bin))
    return int(max(1, min(max_bins, by_size, distinct)))


# --------------------------------------------------------------------------------------------
# Bootstrap intervals


def bootstrap_mean(values: np.ndarray, *, n_resamples: int, rng: np.random.Generator) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap 95 % interval (``scipy.stats.bootstrap``).

    With fewer than two values (or ``n_resamples == 0``) the interval is NaN.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if n < 2 or n_resamples <= 0:
        return Estimate(mean, math.nan, math.nan, n)
    if np.ptp(v) == 0:
        return Estimate(mean, mean, mean, n)
    res = stats.bootstrap(
        (v,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=True,
        rng=rng,
    )
    return Estimate(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), n)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def bootstrap_difference(
    a: np.ndarray, b: np.ndarray, *, n_resamples: int, rng: np.random.Generator
) -> Estimate:
    """``mean(a) - mean(b)`` for independent samples, with a percentile bootstrap 95 % interval.

    ``n`` is the number of images in both samples together.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    n = int(a.size + b.size)
    if a.size == 0 or b.size == 0:
        return Estimate(math.nan, math.nan, math.nan, n)
    diff = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2 or n_resamples <= 0:
        return Estimate(diff, math.nan, math.nan, n)
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return Estimate(diff, diff, diff, n)
    res = stats.bootstrap(
        (a, b),
        _mean_difference,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        vectorized=True,
        paired=False,
        rng=rng,
    )
    return Estimate(diff, float(res.confidence_interval.low), float(res.confidence_interval.high), n)


# --------------------------------------------------------------------------------------------
# Tests


@dataclass(frozen=True)
class EffectTest:
    """Welch's one-way ANOVA across bins of one setting (unequal variances allowed).

    ``p_value`` is the raw p-value; ``p_adjusted`` is Holm-adjusted over every effect test of one
    analysis (both settings, all metrics). ``significant`` compares ``p_adjusted`` to ``alpha``.
    """

    statistic: float
    p_value: float
    p_adjusted: float
    groups: int
    n: int
    alpha: float

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_adjusted) and self.p_adjusted < self.alpha

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return {
            "test": "Welch one-way ANOVA across bins",
            "statistic": _finite_or_none(self.statistic),
            "p_value": _finite_or_none(self.p_value),
            "p_adjusted_holm": _finite_or_none(self.p_adjusted),
            "groups": self.groups,
            "n": self.n,
            "alpha": self.alpha,
            "significant": self.significant,
        }


def welch_anova(groups: Sequence[np.ndarray]) -> tuple[float, float]:
    """Welch's ANOVA statistic and p-value; NaNs when fewer than two groups have spread."""
    usable = [np.asarray(g, dtype=float) for g in groups if len(g) >= 2]
    if len(usable) < 2 or all(np.ptp(g) == 0 for g in usable):
        return math.nan, math.nan
    res = stats.f_oneway(*usable, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values; NaN entries stay NaN and do not count as tests."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return [float(x) for x in out]


def dunnett_vs_best(
    groups: Sequence[np.ndarray], best: int, usable: Sequence[bool], *, rng: np.random.Generator
) -> np.ndarray:
    """One-sided Dunnett p-values of every usable group against group ``best``.

    H1 for group ``i``: its mean is lower than the best group's. The p-values are adjusted for the
    number of groups compared (``scipy.stats.dunnett``, pooled variance), which makes the set of
    groups not rejected Gupta's subset selection: it holds the truly best group with probability
    at least ``1 - alpha`` despite the best having been picked by its observed mean. Entries of
    unusable groups and of ``best`` itself are NaN.
    """
    out = np.full(len(groups), math.nan)
    others = [i for i in range(len(groups)) if i != best and usable[i]]
    if not others:
        return out
    res = stats.dunnett(*[groups[i] for i in others], control=groups[best], alternative="less", rng=rng)
    out[others] = np.asarray(res.pvalue, dtype=float)
    return out


# --------------------------------------------------------------------------------------------
# Normalisation, smoothing, Pareto front


def within_prompt_zscores(
    df: pd.DataFrame, metrics: Sequence[str], *, prompt_column: str = "prompt"
) -> pd.DataFrame:
    """Within-prompt z-scores: ``(x - prompt mean) / prompt std`` (sample std, ``ddof=1``).

    Returns one column ``<metric>_z`` per metric, aligned with ``df``. A prompt with fewer than
    two finite values gives NaN; a prompt whose values are all equal gives 0.
    """
    missing = [c for c in (prompt_column, *metrics) if c not in df.columns]
    if missing:
        raise ValueError(f"cannot normalise per prompt: missing column(s) {missing}")
    values = df[list(metrics)].astype(float)
    grouped = values.groupby(df[prompt_column], sort=False)
    mean = grouped.transform("mean")
    std = grouped.transform("std")
    z = (values - mean) / std
    flat = (std == 0) & values.notna()
    z = z.mask(flat, 0.0)
    z.columns = [f"{m}_z" for m in metrics]
    return z


def lowess_curve(
    x: np.ndarray, y: np.ndarray, grid: np.ndarray, *, frac: float = 0.3
) -> np.ndarray:
    """statsmodels LOWESS fit of ``y`` on ``x`` evaluated at ``grid`` (NaN where undefined)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 10 or np.ptp(x[ok]) == 0:
        return np.full(len(grid), math.nan)
    return np.asarray(lowess(y[ok], x[ok], frac=frac, it=1, xvals=np.asarray(grid, dtype=float)), dtype=float)


def pareto_front(time: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Boolean mask of points no other point dominates (time lower is better, quality higher).

    Point ``j`` dominates ``i`` when ``time[j] <= time[i]`` and ``quality[j] >= quality[i]`` with
    at least one strict. Points with a NaN coordinate are never on the front. Exact duplicates are
    both kept.
    """
    t = np.asarray(time, dtype=float)
    q = np.asarray(quality, dtype=float)
    if t.shape != q.shape:
        raise ValueError(f"time and quality differ in length: {t.shape} vs {q.shape}")
    ok = np.isfinite(t) & np.isfinite(q)
    front = np.zeros(t.shape, dtype=bool)
    idx = np.flatnonzero(ok)
    for i in idx:
        others = idx[idx != i]
        dominated = (t[others] <= t[i]) & (q[others] >= q[i]) & ((t[others] < t[i]) | (q[others] > q[i]))
        front[i] = not dominated.any()
    return front
