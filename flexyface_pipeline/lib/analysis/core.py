"""Which sweep settings are worth it: effects of steps and guidance, sweet spots, time trade-off.

:func:`analyze` turns the merged results table (one row per image) into an :class:`Analysis`.
The statistical method is spelled out in :data:`METHOD`, which the report repeats verbatim.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.analysis.stats import (
    Bins,
    EffectTest,
    Estimate,
    auto_bin_count,
    bootstrap_difference,
    bootstrap_mean,
    child_rng,
    holm_adjust,
    lowess_curve,
    make_bins,
    dunnett_vs_best,
    pareto_front,
    welch_anova,
    within_prompt_zscores,
)
from flexyface_pipeline.lib.config import METRICS

logger = logging.getLogger(__name__)

COMBINED = "combined"

METHOD = (
    "Scores are compared as within-prompt z-scores (each image's score minus its prompt's mean, "
    "divided by its prompt's standard deviation), because HPS only ranks images of one prompt and "
    "prompt offsets would otherwise swamp the settings' effects; raw means are reported alongside. "
    "Steps and guidance are cut into equal-width bins. The sweep samples steps, guidance and "
    "prompt independently, so each setting's binned means average over the other setting alike in "
    "every bin. For the tests, the other setting's effect (a LOWESS fit of the z-scores on it) is "
    "first subtracted, one backfitting step of an additive model: this removes its variation from "
    "the comparison without biasing it ('adjusted z', column mean_adj). "
    "Effect test: Welch's one-way ANOVA of the adjusted z-scores across the bins that hold at "
    "least {min_per_bin} images; its p-value is Holm-adjusted over all effect tests of the "
    "analysis (steps and guidance for every metric, plus the combined score across step bins and "
    "across steps × guidance cells) and compared with alpha = {alpha}. Without a significant "
    "effect nothing is recommended for that setting, and no Pareto front is drawn. "
    "Indistinguishable from the best: multiple comparisons with the best bin (the one with the "
    "highest adjusted mean), by one-sided Dunnett tests (scipy.stats.dunnett; H1: the bin scores "
    "lower than the best bin) at alpha = {alpha}. Dunnett's adjustment for the number of bins "
    "compared makes the bins not rejected Gupta's subset selection, which holds the truly best bin "
    "with probability at least 1 - alpha although the best was picked by its observed mean "
    "(uncorrected tests against an observed maximum reject equal bins far more often than alpha). "
    "Fewest steps: the step bin with the fewest steps in that subset (bins with fewer than "
    "{min_per_bin} images never qualify); the recommendation is its centre, rounded up, and its "
    "range is given with it. Several bins tied "
    "on a plateau make a chance rejection of one of them likely, so the subset is not required to "
    "be contiguous. Guidance band: from the lowest to the highest guidance bin of the subset; bins "
    "inside the band that were rejected are named in a note. 'Not significantly worse' is not "
    "proof of equivalence: the difference from the best bin is reported with its bootstrap 95 % "
    "interval, showing how large a loss the data cannot rule out. "
    "Intervals: percentile bootstrap 95 % intervals of the mean (scipy.stats.bootstrap, "
    "{bootstrap} resamples, seed {seed}). Smooth curves: statsmodels LOWESS (frac 0.3). "
    "Time: median elapsed_ms per bin or cell; the Pareto front keeps the bins/cells that no other "
    "one beats on both lower median time and higher mean quality (adjusted z for step bins, "
    "plain within-prompt z for steps × guidance cells; cells need at least "
    "{min_per_cell} images). The combined score is the mean of the metrics' within-prompt "
    "z-scores."
)

SETTINGS_COLUMNS = ("steps", "guidance", "prompt")


@dataclass(frozen=True)
class AnalysisSettings:
    bootstrap: int
    seed: int
    alpha: float
    min_images: int
    min_per_bin: int
    min_per_cell: int

    def method(self) -> str:
        return METHOD.format(
            min_per_bin=self.min_per_bin,
            alpha=self.alpha,
            bootstrap=self.bootstrap,
            seed=self.seed,
            min_per_cell=self.min_per_cell,
        )


@dataclass(frozen=True)
class StepsRecommendation:
    """The fewest steps not significantly worse than the best step bin.

    ``steps`` is the centre of that bin rounded up; ``bin_low``/``bin_high`` its range. Estimates
    are of the images in the bin (``estimate`` in metric units, ``estimate_z`` within-prompt
    z-scores); ``difference_z`` is best bin minus this bin in adjusted z-scores; ``p_value`` the
    one-sided Dunnett p-value of that comparison (NaN when this bin is the best one).
    """

    steps: int
    bin_low: int
    bin_high: int
    estimate: Estimate
    estimate_z: Estimate
    best_bin_low: int
    best_bin_high: int
    best_estimate: Estimate
    best_estimate_z: Estimate
    difference_z: Estimate
    p_value: float
    note: str | None = None


@dataclass(frozen=True)
class GuidanceRecommendation:
    """The contiguous guidance band whose bins are not significantly worse than the best bin."""

    low: float
    high: float
    estimate: Estimate
    estimate_z: Estimate
    best_bin_low: float
    best_bin_high: float
    best_estimate: Estimate
    best_estimate_z: Estimate
    note: str | None = None


@dataclass(frozen=True)
class ParetoSetting:
    """A steps × guidance cell on the time/quality Pareto front of the combined score."""

    steps_low: int
    steps_high: int
    guidance_low: float
    guidance_high: float
    time_ms: float
    quality_z: Estimate


@dataclass(frozen=True)
class MetricAnalysis:
    metric: str
    n: int
    steps: pd.DataFrame
    guidance: pd.DataFrame
    steps_fit: pd.DataFrame
    guidance_fit: pd.DataFrame
    cells: pd.DataFrame
    steps_test: EffectTest
    guidance_test: EffectTest
    min_steps: StepsRecommendation | None
    min_steps_reason: str | None
    guidance_band: GuidanceRecommendation | None
    guidance_band_reason: str | None
    pareto_reason: str | None = None


@dataclass(frozen=True)
class Analysis:
    """Everything :func:`analyze` found. Tables are pandas DataFrames, one row per bin or cell."""

    metrics: tuple[str, ...]
    n_images: int
    n_prompts: int
    settings: AnalysisSettings
    steps_bins: Bins
    guidance_bins: Bins
    cell_steps_bins: Bins
    cell_guidance_bins: Bins
    per_metric: dict[str, MetricAnalysis]
    correlations: dict[str, pd.DataFrame]
    correlation_n: int
    combined_metrics: tuple[str, ...]
    combined_steps: pd.DataFrame
    combined_steps_test: EffectTest
    combined_steps_reason: str | None
    combined_cells: pd.DataFrame
    cells_test: EffectTest
    pareto_settings: tuple[ParetoSetting, ...]
    pareto_reason: str | None
    has_time: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def method(self) -> str:
        return self.settings.method()


# --------------------------------------------------------------------------------------------
# Input checks


def _validate(
    df: pd.DataFrame,
    metrics: Sequence[str],
    bootstrap: int,
    min_images: int,
    min_per_bin: int,
    alpha: float,
) -> tuple[str, ...]:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"analyze needs a pandas DataFrame, got {type(df).__name__}")
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of column names, not the string {metrics!r}")
    metrics = tuple(dict.fromkeys(metrics))
    if not metrics:
        raise ValueError("no metric to analyse: metrics is empty")
    missing = [c for c in (*SETTINGS_COLUMNS, *metrics) if c not in df.columns]
    if missing:
        raise ValueError(f"the results table lacks column(s) {missing}; it has {list(df.columns)}")
    for col in ("steps", "guidance", *metrics):
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise ValueError(f"column {col!r} must be numeric, got dtype {df[col].dtype}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    if min_images < 2 or min_per_bin < 2:
        raise ValueError(f"min_images and min_per_bin must be at least 2, got {min_images} and {min_per_bin}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return metrics


# --------------------------------------------------------------------------------------------
# Tables


def _median_time(times: np.ndarray | None, mask: np.ndarray) -> float:
    if times is None:
        return math.nan
    t = times[mask]
    t = t[np.isfinite(t)]
    return float(np.median(t)) if t.size else math.nan


def _bin_table(
    bins: Bins,
    codes: np.ndarray,
    raw: np.ndarray,
    z: np.ndarray,
    adj: np.ndarray,
    times: np.ndarray | None,
    *,
    bootstrap: int,
    rng: np.random.Generator,
    min_per_bin: int,
) -> pd.DataFrame:
    rows = []
    for i in range(len(bins)):
        mask = codes == i
        est = bootstrap_mean(raw[mask], n_resamples=bootstrap, rng=rng)
        est_z = bootstrap_mean(z[mask], n_resamples=bootstrap, rng=rng)
        est_adj = bootstrap_mean(adj[mask], n_resamples=bootstrap, rng=rng)
        rows.append(
            {
                "bin": i,
                "label": bins.label(i),
                "low": bins.lows[i],
                "high": bins.highs[i],
                "centre": float(bins.centres[i]),
                "n": est.n,
                "mean": est.mean,
                "ci_low": est.ci_low,
                "ci_high": est.ci_high,
                "mean_z": est_z.mean,
                "ci_low_z": est_z.ci_low,
                "ci_high_z": est_z.ci_high,
                "mean_adj": est_adj.mean,
                "ci_low_adj": est_adj.ci_low,
                "ci_high_adj": est_adj.ci_high,
                "enough": est.n >= min_per_bin,
                "time_ms": _median_time(times, mask),
            }
        )
    table = pd.DataFrame(rows)
    table["p_vs_best"] = math.nan
    table["pareto"] = False
    if times is not None:
        eligible = table["enough"].to_numpy() & np.isfinite(table["time_ms"].to_numpy())
        front = pareto_front(
            np.where(eligible, table["time_ms"], np.nan), np.where(eligible, table["mean_adj"], np.nan)
        )
        table["pareto"] = front
    return table


def _fit_table(x: np.ndarray, raw: np.ndarray, adj: np.ndarray, *, enough: bool) -> pd.DataFrame:
    """LOWESS curves of the raw scores (``fit``) and adjusted z-scores (``fit_adj``) on ``x``."""
    finite = x[np.isfinite(x)]
    if not enough or finite.size == 0 or np.ptp(finite) == 0:
        return pd.DataFrame({"x": [], "fit": [], "fit_adj": []}, dtype=float)
    grid = np.linspace(finite.min(), finite.max(), 60)
    return pd.DataFrame({"x": grid, "fit": lowess_curve(x, raw, grid), "fit_adj": lowess_curve(x, adj, grid)})


def _cell_table(
    s_codes: np.ndarray,
    g_codes: np.ndarray,
    s_bins: Bins,
    g_bins: Bins,
    raw: np.ndarray,
    z: np.ndarray,
    times: np.ndarray | None,
) -> pd.DataFrame:
    rows = []
    for i in range(len(s_bins)):
        for j in range(len(g_bins)):
            mask = (s_codes == i) & (g_codes == j) & np.isfinite(raw)
            n = int(mask.sum())
            rows.append(
                {
                    "steps_bin": i,
                    "guidance_bin": j,
                    "steps_label": s_bins.label(i),
                    "guidance_label": g_bins.label(j),
                    "n": n,
                    "mean": float(raw[mask].mean()) if n else math.nan,
                    "mean_z": float(np.nanmean(z[mask])) if n and np.isfinite(z[mask]).any() else math.nan,
                    "time_ms": _median_time(times, mask),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Recommendations


@dataclass(frozen=True)
class _Groups:
    """Per-bin value arrays of one metric: raw scores, z-scores, adjusted z-scores."""

    raw: list[np.ndarray]
    z: list[np.ndarray]
    adj: list[np.ndarray]


def _adjust_for(other: np.ndarray, z: np.ndarray, *, enough: bool) -> np.ndarray:
    """``z`` minus the centred LOWESS effect of the other setting (one backfitting step)."""
    if not enough:
        return z.copy()
    ok = np.isfinite(other) & np.isfinite(z)
    grid = np.linspace(np.nanmin(other), np.nanmax(other), 100)
    curve = lowess_curve(other[ok], z[ok], grid)
    if not np.isfinite(curve).all():
        return z.copy()
    effect = np.interp(other, grid, curve)
    return z - (effect - np.nanmean(effect[ok]))


def _groups(codes: np.ndarray, values: np.ndarray, n_bins: int) -> list[np.ndarray]:
    return [values[(codes == i) & np.isfinite(values)] for i in range(n_bins)]


def _compare_with_best(table: pd.DataFrame, adj_groups: list[np.ndarray], rng: np.random.Generator) -> int:
    """Pick the best usable bin by adjusted mean and fill ``p_vs_best`` (one-sided Dunnett)."""
    enough = table["enough"].to_numpy()
    means = np.where(enough, table["mean_adj"].to_numpy(), -np.inf)
    best = int(np.argmax(means))
    table["p_vs_best"] = dunnett_vs_best(adj_groups, best, enough, rng=rng)
    return best


def _subset(table: pd.DataFrame, best: int, alpha: float) -> np.ndarray:
    """Indices of the usable bins not significantly worse than the best one (Gupta's subset)."""
    p = table["p_vs_best"].to_numpy()
    keep = table["enough"].to_numpy() & (p >= alpha)
    keep[best] = True
    return np.flatnonzero(keep)


def _steps_recommendation(
    metric: str,
    table: pd.DataFrame,
    groups: _Groups,
    test: EffectTest,
    *,
    n: int,
    settings: AnalysisSettings,
    rng: np.random.Generator,
) -> tuple[StepsRecommendation | None, str | None]:
    reason = _refusal(metric, "steps", table, test, n=n, settings=settings)
    if reason:
        return None, reason
    best = _compare_with_best(table, groups.adj, rng)
    subset = _subset(table, best, settings.alpha)
    chosen = int(subset.min())
    boot = settings.bootstrap
    note = None
    if best == len(table) - 1 and chosen == best:
        note = (
            f"{metric} still improves up to the largest step bin ({table.loc[best, 'label']} steps): "
            "a plateau, if any, lies beyond the swept range"
        )
    rec = StepsRecommendation(
        steps=int(math.ceil(table.loc[chosen, "centre"])),
        bin_low=int(table.loc[chosen, "low"]),
        bin_high=int(table.loc[chosen, "high"]),
        estimate=bootstrap_mean(groups.raw[chosen], n_resamples=boot, rng=rng),
        estimate_z=bootstrap_mean(groups.z[chosen], n_resamples=boot, rng=rng),
        best_bin_low=int(table.loc[best, "low"]),
        best_bin_high=int(table.loc[best, "high"]),
        best_estimate=bootstrap_mean(groups.raw[best], n_resamples=boot, rng=rng),
        best_estimate_z=bootstrap_mean(groups.z[best], n_resamples=boot, rng=rng),
        difference_z=(
            bootstrap_difference(groups.adj[best], groups.adj[chosen], n_resamples=boot, rng=rng)
            if chosen != best
            else Estimate(0.0, 0.0, 0.0, int(groups.adj[best].size))
        ),
        p_value=float(table.loc[chosen, "p_vs_best"]) if chosen != best else math.nan,
        note=note,
    )
    return rec, None


def _guidance_recommendation(
    metric: str,
    table: pd.DataFrame,
    groups: _Groups,
    test: EffectTest,
    *,
    n: int,
    settings: AnalysisSettings,
    rng: np.random.Generator,
) -> tuple[GuidanceRecommendation | None, str | None]:
    reason = _refusal(metric, "guidance", table, test, n=n, settings=settings)
    if reason:
        return None, reason
    best = _compare_with_best(table, groups.adj, rng)
    subset = _subset(table, best, settings.alpha)
    left, right = int(subset.min()), int(subset.max())
    boot = settings.bootstrap
    band = slice(left, right + 1)
    notes = []
    if best in (0, len(table) - 1):
        edge = "smallest" if best == 0 else "largest"
        notes.append(f"the best {metric} is at the {edge} guidance swept; the optimum may lie outside the range")
    gaps = [table.loc[i, "label"] for i in range(left, right + 1) if i not in subset]
    if gaps:
        notes.append(f"inside the band, guidance bin(s) {gaps} scored significantly lower than the best bin")
    note = "; ".join(notes) or None
    rec = GuidanceRecommendation(
        low=float(table.loc[left, "low"]),
        high=float(table.loc[right, "high"]),
        estimate=bootstrap_mean(np.concatenate(groups.raw[band]), n_resamples=boot, rng=rng),
        estimate_z=bootstrap_mean(np.concatenate(groups.z[band]), n_resamples=boot, rng=rng),
        best_bin_low=float(table.loc[best, "low"]),
        best_bin_high=float(table.loc[best, "high"]),
        best_estimate=bootstrap_mean(groups.raw[best], n_resamples=boot, rng=rng),
        best_estimate_z=bootstrap_mean(groups.z[best], n_resamples=boot, rng=rng),
        note=note,
    )
    return rec, None


def _refusal(
    metric: str, setting: str, table: pd.DataFrame, test: EffectTest, *, n: int, settings: AnalysisSettings
) -> str | None:
    if n < settings.min_images:
        return (
            f"insufficient data: {n} images with a finite {metric} in prompts with at least two images; "
            f"at least {settings.min_images} are needed"
        )
    usable = int(table["enough"].sum())
    if usable < 2:
        return (
            f"insufficient data: {usable} {setting} bin(s) hold at least {settings.min_per_bin} images; "
            "at least two are needed to compare"
        )
    if not math.isfinite(test.p_adjusted):
        return f"no test possible: {metric} does not vary within the {setting} bins"
    if not test.significant:
        return (
            f"no significant effect of {setting} on {metric}: Welch ANOVA p = {test.p_value:.3g} "
            f"(Holm-adjusted {test.p_adjusted:.3g} >= alpha {settings.alpha}); any {setting} in the "
            "swept range scores alike within what these data can resolve"
        )
    return None


# --------------------------------------------------------------------------------------------
# Entry point


def truncated_prompt_count(df: pd.DataFrame) -> int:
    """Rows whose prompt CLIP score truncated to 77 tokens (``clip_prompt_truncated``; 0 without it)."""
    if "clip_prompt_truncated" not in df.columns:
        return 0
    return int(df["clip_prompt_truncated"].astype("boolean").fillna(False).sum())


def analyze(
    df: pd.DataFrame,
    *,
    metrics: Sequence[str] = METRICS,
    bootstrap: int = 1000,
    seed: int = 0,
    min_images: int = 60,
    min_per_bin: int = 20,
    alpha: float = 0.05,
    steps_bins: int | None = None,
    guidance_bins: int | None = None,
    max_bins: int = 12,
    heatmap_bins: tuple[int, int] = (6, 6),
) -> Analysis:
    """Analyse a merged results table (one row per image); :data:`METHOD` has the full text.

    Tests, in short (all on within-prompt z-scores, the other setting's LOWESS effect removed):

    * effect of a setting: Welch one-way ANOVA across its bins, Holm-adjusted over every effect
      test of the analysis, at ``alpha``; not significant -> no recommendation;
    * fewest steps: the smallest step bin not significantly worse than the best bin by one-sided
      Dunnett tests at ``alpha`` (multiple comparisons with the best: Dunnett's adjustment makes
      the kept bins Gupta's subset, which contains the truly best bin with probability
      >= 1 - alpha); reported with bootstrap 95 % intervals and image counts;
    * guidance band: the span of the guidance bins in that subset;
    * Pareto front (median time, mean quality) over step bins and steps × guidance cells, drawn
      only when the matching effect test is significant.

    ``steps_bins``/``guidance_bins`` default to about ``3 * min_per_bin`` images per bin, at most
    ``max_bins``. ``heatmap_bins`` sets the (steps, guidance) grid of the heatmaps and of the
    Pareto cells. A metric with fewer than ``min_images`` usable images, a setting with fewer than
    two bins of ``min_per_bin`` images, or no significant effect gets ``None`` and a ``*_reason``
    string instead of a recommendation. Intervals are seeded by ``seed``.
    Raises ``ValueError`` for a table without the needed columns or bad arguments.
    """
    metrics = _validate(df, metrics, bootstrap, min_images, min_per_bin, alpha)
    settings = AnalysisSettings(
        bootstrap=int(bootstrap),
        seed=int(seed),
        alpha=float(alpha),
        min_images=int(min_images),
        min_per_bin=int(min_per_bin),
        min_per_cell=max(5, int(min_per_bin) // 2),
    )
    notes: list[str] = []
    usable = df["steps"].notna() & df["guidance"].notna() & df["prompt"].notna()
    if (~usable).any():
        notes.append(f"{int((~usable).sum())} row(s) without steps, guidance or prompt were left out")
    data = df.loc[usable].reset_index(drop=True)
    if data.empty:
        raise ValueError("the results table holds no row with steps, guidance and prompt")

    steps = data["steps"].to_numpy(dtype=float)
    guidance = data["guidance"].to_numpy(dtype=float)
    has_time = "elapsed_ms" in data.columns and bool(np.isfinite(data["elapsed_ms"].to_numpy(dtype=float)).any())
    times = data["elapsed_ms"].to_numpy(dtype=float) if has_time else None
    if not has_time:
        notes.append("no elapsed_ms values: the quality/time trade-off is left out")
    truncated = truncated_prompt_count(data)
    if truncated:
        notes.append(f"{truncated} images had prompts longer than 77 CLIP tokens (truncated to BOS + 75 + EOS)")

    n_rows = len(data)
    s_bins = make_bins(
        steps,
        steps_bins
        or auto_bin_count(n_rows, len(np.unique(steps)), min_per_bin=min_per_bin, max_bins=max_bins),
        integer=True,
    )
    g_bins = make_bins(
        guidance,
        guidance_bins
        or auto_bin_count(n_rows, len(np.unique(guidance)), min_per_bin=min_per_bin, max_bins=max_bins),
        integer=False,
    )
    cs_bins = make_bins(steps, heatmap_bins[0], integer=True)
    cg_bins = make_bins(guidance, heatmap_bins[1], integer=False)
    s_codes, g_codes = s_bins.assign(steps), g_bins.assign(guidance)
    cs_codes, cg_codes = cs_bins.assign(steps), cg_bins.assign(guidance)

    z_all = within_prompt_zscores(data, metrics)

    # Pass 1: tables and raw effect-test p-values.
    partial: dict[str, dict] = {}
    for metric in metrics:
        raw = data[metric].to_numpy(dtype=float)
        z = z_all[f"{metric}_z"].to_numpy(dtype=float)
        valid = np.isfinite(raw) & np.isfinite(z)
        raw = np.where(valid, raw, np.nan)
        z = np.where(valid, z, np.nan)
        n = int(valid.sum())
        enough = n >= min_images
        adj_s = _adjust_for(guidance, z, enough=enough)
        adj_g = _adjust_for(steps, z, enough=enough)
        rng = child_rng(seed, metric, "bins")
        st = _bin_table(
            s_bins, s_codes, raw, z, adj_s, times, bootstrap=bootstrap, rng=rng, min_per_bin=min_per_bin
        )
        gt = _bin_table(
            g_bins, g_codes, raw, z, adj_g, times, bootstrap=bootstrap, rng=rng, min_per_bin=min_per_bin
        )
        s_groups = _Groups(
            _groups(s_codes, raw, len(s_bins)), _groups(s_codes, z, len(s_bins)), _groups(s_codes, adj_s, len(s_bins))
        )
        g_groups = _Groups(
            _groups(g_codes, raw, len(g_bins)), _groups(g_codes, z, len(g_bins)), _groups(g_codes, adj_g, len(g_bins))
        )
        tests = {}
        for key, table, groups in (("steps", st, s_groups), ("guidance", gt, g_groups)):
            usable_groups = [g for g, ok in zip(groups.adj, table["enough"]) if ok]
            stat, p_value = welch_anova(usable_groups) if enough else (math.nan, math.nan)
            tests[key] = (stat, p_value, len(usable_groups), n)
        partial[metric] = {
            "raw": raw, "z": z, "adj_s": adj_s, "adj_g": adj_g, "n": n, "steps": st, "guidance": gt,
            "s_groups": s_groups, "g_groups": g_groups, "tests": tests,
        }

    # Combined score: built before the multiplicity adjustment, so its tests join the family.
    combined_metrics = tuple(m for m in metrics if partial[m]["n"] >= min_images)
    zcols = [f"{m}_z" for m in combined_metrics]
    combined = z_all[zcols].mean(axis=1, skipna=False).to_numpy(dtype=float) if zcols else np.full(n_rows, np.nan)
    rng = child_rng(seed, COMBINED)
    combined_adj = _adjust_for(guidance, combined, enough=bool(zcols))
    combined_steps = _bin_table(
        s_bins, s_codes, combined, combined, combined_adj, times, bootstrap=bootstrap, rng=rng, min_per_bin=min_per_bin
    )
    combined_cells = _combined_cells(cs_codes, cg_codes, cs_bins, cg_bins, combined, times, settings=settings)
    raw_tests: dict[tuple[str, str], tuple[float, float, int, int]] = {
        (m, k): partial[m]["tests"][k] for m in metrics for k in ("steps", "guidance")
    }
    n_combined = int(np.isfinite(combined).sum())
    step_groups = [g for g, ok in zip(_groups(s_codes, combined_adj, len(s_bins)), combined_steps["enough"]) if ok]
    cell_groups = [
        combined[(cs_codes == row.steps_bin) & (cg_codes == row.guidance_bin) & np.isfinite(combined)]
        for row in combined_cells.itertuples()
        if row.enough
    ]
    raw_tests[(COMBINED, "steps")] = (*(welch_anova(step_groups) if zcols else (math.nan,) * 2), len(step_groups),
                                      n_combined)
    raw_tests[(COMBINED, "cells")] = (*(welch_anova(cell_groups) if zcols and has_time else (math.nan,) * 2),
                                      len(cell_groups), n_combined)
    keys = list(raw_tests)
    adjusted = dict(zip(keys, holm_adjust([raw_tests[k][1] for k in keys])))
    tests = {
        k: EffectTest(statistic=v[0], p_value=v[1], p_adjusted=adjusted[k], groups=v[2], n=v[3], alpha=alpha)
        for k, v in raw_tests.items()
    }

    # Pass 2: recommendations.
    per_metric: dict[str, MetricAnalysis] = {}
    for metric in metrics:
        p = partial[metric]
        rng = child_rng(seed, metric, "recommendations")
        min_steps, min_steps_reason = _steps_recommendation(
            metric, p["steps"], p["s_groups"], tests[(metric, "steps")], n=p["n"], settings=settings, rng=rng
        )
        band, band_reason = _guidance_recommendation(
            metric, p["guidance"], p["g_groups"], tests[(metric, "guidance")], n=p["n"], settings=settings, rng=rng
        )
        front_reason = _front_reason(metric, p["steps"], tests[(metric, "steps")], n=p["n"], settings=settings,
                                     has_time=has_time)
        if front_reason:
            p["steps"]["pareto"] = False
        enough = p["n"] >= min_images
        per_metric[metric] = MetricAnalysis(
            metric=metric,
            n=p["n"],
            steps=p["steps"],
            guidance=p["guidance"],
            steps_fit=_fit_table(steps, p["raw"], p["adj_s"], enough=enough),
            guidance_fit=_fit_table(guidance, p["raw"], p["adj_g"], enough=enough),
            cells=_cell_table(cs_codes, cg_codes, cs_bins, cg_bins, p["raw"], p["z"], times),
            steps_test=tests[(metric, "steps")],
            guidance_test=tests[(metric, "guidance")],
            min_steps=min_steps,
            min_steps_reason=min_steps_reason,
            guidance_band=band,
            guidance_band_reason=band_reason,
            pareto_reason=front_reason,
        )
        logger.info(
            "%s: n=%d, min steps %s, guidance band %s",
            metric,
            p["n"],
            min_steps.steps if min_steps else f"none ({min_steps_reason})",
            f"{band.low:.2f}-{band.high:.2f}" if band else f"none ({band_reason})",
        )

    combined_steps_reason = _front_reason(
        COMBINED, combined_steps, tests[(COMBINED, "steps")], n=n_combined, settings=settings, has_time=has_time
    )
    if combined_steps_reason:
        combined_steps["pareto"] = False
    pareto_settings, pareto_reason = _pareto_settings(
        combined_cells, tests[(COMBINED, "cells")], cs_codes, cg_codes, cs_bins, cg_bins, combined,
        settings=settings, rng=rng, has_time=has_time, n=n_combined,
    )
    correlations, corr_n = _correlations(data, z_all, metrics)
    if len(combined_metrics) < len(metrics):
        left_out = [m for m in metrics if m not in combined_metrics]
        notes.append(f"combined score leaves out {left_out}: fewer than {min_images} usable images")

    return Analysis(
        metrics=metrics,
        n_images=n_rows,
        n_prompts=int(data["prompt"].nunique()),
        settings=settings,
        steps_bins=s_bins,
        guidance_bins=g_bins,
        cell_steps_bins=cs_bins,
        cell_guidance_bins=cg_bins,
        per_metric=per_metric,
        correlations=correlations,
        correlation_n=corr_n,
        combined_metrics=combined_metrics,
        combined_steps=combined_steps,
        combined_steps_test=tests[(COMBINED, "steps")],
        combined_steps_reason=combined_steps_reason,
        combined_cells=combined_cells,
        cells_test=tests[(COMBINED, "cells")],
        pareto_settings=pareto_settings,
        pareto_reason=pareto_reason,
        has_time=has_time,
        notes=tuple(notes),
    )


def _front_reason(
    name: str, table: pd.DataFrame, test: EffectTest, *, n: int, settings: AnalysisSettings, has_time: bool
) -> str | None:
    """Why the step-bin Pareto front of ``name`` is not reported (None when it is)."""
    if not has_time:
        return "no elapsed_ms values: the time/quality front cannot be drawn"
    return _refusal(name, "steps", table, test, n=n, settings=settings)


def _combined_cells(
    s_codes: np.ndarray,
    g_codes: np.ndarray,
    s_bins: Bins,
    g_bins: Bins,
    combined: np.ndarray,
    times: np.ndarray | None,
    *,
    settings: AnalysisSettings,
) -> pd.DataFrame:
    cells = _cell_table(s_codes, g_codes, s_bins, g_bins, combined, combined, times)
    cells = cells.drop(columns=["mean_z"]).rename(columns={"mean": "mean_z"})
    cells["ci_low_z"] = math.nan
    cells["ci_high_z"] = math.nan
    cells["enough"] = (cells["n"] >= settings.min_per_cell) & np.isfinite(cells["time_ms"])
    cells["pareto"] = False
    return cells


def _pareto_settings(
    cells: pd.DataFrame,
    test: EffectTest,
    s_codes: np.ndarray,
    g_codes: np.ndarray,
    s_bins: Bins,
    g_bins: Bins,
    combined: np.ndarray,
    *,
    settings: AnalysisSettings,
    rng: np.random.Generator,
    has_time: bool,
    n: int,
) -> tuple[tuple[ParetoSetting, ...], str | None]:
    """Mark the Pareto cells in ``cells`` and describe them; or say why there are none."""
    if n < settings.min_images:
        return (), (
            f"insufficient data: {n} images have every metric's within-prompt z-score, "
            f"at least {settings.min_images} are needed for the combined score"
        )
    if not has_time:
        return (), "no elapsed_ms values: the time/quality front cannot be drawn"
    eligible = cells["enough"].to_numpy()
    if eligible.sum() < 2:
        return (), (
            f"insufficient data: {int(eligible.sum())} steps × guidance cell(s) hold at least "
            f"{settings.min_per_cell} images with a time; at least two are needed"
        )
    if not math.isfinite(test.p_value):
        return (), "no test possible: the combined score does not vary between steps × guidance cells"
    if not test.significant:
        return (), (
            f"no significant quality difference between steps × guidance cells: Welch ANOVA of the combined "
            f"score p = {test.p_value:.3g} (Holm-adjusted {test.p_adjusted:.3g} >= alpha {settings.alpha}); "
            "no setting is better than the fastest one beyond noise"
        )
    front = pareto_front(np.where(eligible, cells["time_ms"], np.nan), np.where(eligible, cells["mean_z"], np.nan))
    cells["pareto"] = front
    chosen = []
    for i in np.flatnonzero(front):
        row = cells.loc[i]
        mask = (s_codes == row["steps_bin"]) & (g_codes == row["guidance_bin"])
        est = bootstrap_mean(combined[mask], n_resamples=settings.bootstrap, rng=rng)
        cells.loc[i, "ci_low_z"] = est.ci_low
        cells.loc[i, "ci_high_z"] = est.ci_high
        chosen.append(
            ParetoSetting(
                steps_low=int(s_bins.lows[row["steps_bin"]]),
                steps_high=int(s_bins.highs[row["steps_bin"]]),
                guidance_low=float(g_bins.lows[row["guidance_bin"]]),
                guidance_high=float(g_bins.highs[row["guidance_bin"]]),
                time_ms=float(row["time_ms"]),
                quality_z=est,
            )
        )
    chosen.sort(key=lambda p: p.time_ms)
    return tuple(chosen), None


def _correlations(
    data: pd.DataFrame, z_all: pd.DataFrame, metrics: tuple[str, ...]
) -> tuple[dict[str, pd.DataFrame], int]:
    raw = data[list(metrics)].astype(float)
    z = z_all.copy()
    z.columns = list(metrics)
    complete = int((raw.notna().all(axis=1)).sum())
    out = {
        "pearson": raw.corr(method="pearson", min_periods=3),
        "spearman": raw.corr(method="spearman", min_periods=3),
        "pearson_within_prompt": z.corr(method="pearson", min_periods=3),
        "spearman_within_prompt": z.corr(method="spearman", min_periods=3),
    }
    return out, complete
