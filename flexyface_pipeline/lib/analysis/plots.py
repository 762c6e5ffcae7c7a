"""Figures of an :class:`~flexyface_pipeline.lib.analysis.core.Analysis`, rendered to PNG bytes.

Figures are built on ``matplotlib.figure.Figure`` with an explicit Agg canvas: no pyplot, no
global backend switch, nothing happens at import time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.analysis.core import COMBINED, Analysis, MetricAnalysis

STEPS_LABEL = "steps"
GUIDANCE_LABEL = "guidance scale"
TIME_LABEL = "time per image (ms)"
DPI = 100

_MEAN_COLOUR = "#1f5fa8"
_FIT_COLOUR = "#d9581e"
_CHOICE_COLOUR = "#2e9e44"
_FRONT_COLOUR = "#c62d42"


@dataclass(frozen=True)
class Plot:
    key: str
    title: str
    caption: str
    png: bytes


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _z_label(metric: str) -> str:
    return f"{metric} (within-prompt z)"


def _adj_label(metric: str, other: str) -> str:
    return f"{metric}\n(within-prompt z, {other} effect removed)"


# --------------------------------------------------------------------------------------------
# Effects of steps and guidance


def _effect_panel(
    ax, table: pd.DataFrame, fit: pd.DataFrame, *, scale: str, xlabel: str, ylabel: str, min_per_bin: int
) -> None:
    if table.empty or table["n"].sum() == 0:
        _no_data(ax, "no data")
        return
    suffix = "" if scale == "raw" else "_adj"
    mean = table[f"mean{suffix}"].to_numpy(dtype=float)
    lo = table[f"ci_low{suffix}"].to_numpy(dtype=float)
    hi = table[f"ci_high{suffix}"].to_numpy(dtype=float)
    x = table["centre"].to_numpy(dtype=float)
    enough = table["enough"].to_numpy(dtype=bool)
    err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
    err = np.where(np.isfinite(err), err, 0.0)
    if enough.any():
        ax.errorbar(
            x[enough], mean[enough], yerr=err[:, enough], fmt="o", color=_MEAN_COLOUR, capsize=3,
            label="bin mean ± 95 % CI",
        )
    if (~enough).any():
        ax.errorbar(
            x[~enough], mean[~enough], yerr=err[:, ~enough], fmt="o", mfc="white", color="0.55", capsize=3,
            label=f"bin with < {min_per_bin} images",
        )
    column = "fit" if scale == "raw" else "fit_adj"
    if not fit.empty and np.isfinite(fit[column]).any():
        ax.plot(fit["x"], fit[column], color=_FIT_COLOUR, lw=1.8, label="LOWESS fit")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_effects(analysis: Analysis, metric: str) -> bytes:
    """2 × 2 panels: metric (raw and within-prompt z) against steps and against guidance."""
    ma: MetricAnalysis = analysis.per_metric[metric]
    fig = _figure(11.0, 7.2)
    axes = fig.subplots(2, 2)
    mpb = analysis.settings.min_per_bin
    for row, scale in enumerate(("raw", "adjusted")):
        _effect_panel(
            axes[row, 0], ma.steps, ma.steps_fit, scale=scale, xlabel=STEPS_LABEL,
            ylabel=metric if scale == "raw" else _adj_label(metric, "guidance"), min_per_bin=mpb,
        )
        _effect_panel(
            axes[row, 1], ma.guidance, ma.guidance_fit, scale=scale, xlabel=GUIDANCE_LABEL,
            ylabel=metric if scale == "raw" else _adj_label(metric, "steps"), min_per_bin=mpb,
        )
        if ma.min_steps is not None:
            r = ma.min_steps
            axes[row, 0].axvspan(r.bin_low - 0.5, r.bin_high + 0.5, color=_CHOICE_COLOUR, alpha=0.15)
            axes[row, 0].axvline(r.steps, color=_CHOICE_COLOUR, ls="--", lw=1.5, label=f"fewest steps: {r.steps}")
        if ma.guidance_band is not None:
            b = ma.guidance_band
            axes[row, 1].axvspan(
                b.low, b.high, color=_CHOICE_COLOUR, alpha=0.15, label=f"best band {b.low:.2f}–{b.high:.2f}"
            )
    axes[0, 0].set_title("effect of steps")
    axes[0, 1].set_title("effect of guidance scale")
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.suptitle(f"{metric}: n = {ma.n} images", fontsize=12)
    return _png(fig)


def plot_overview(analysis: Analysis) -> bytes:
    """All metrics on one scale: adjusted within-prompt z against steps and against guidance."""
    fig = _figure(12.0, 4.8)
    axes = fig.subplots(1, 2)
    colours = ["#1f5fa8", "#d9581e", "#2e9e44", "#8e44ad", "#7f6000", "#008b8b"]
    for (ax, attr, fit_attr, xlabel, other) in (
        (axes[0], "steps", "steps_fit", STEPS_LABEL, "guidance"),
        (axes[1], "guidance", "guidance_fit", GUIDANCE_LABEL, "steps"),
    ):
        drawn = False
        for k, metric in enumerate(analysis.metrics):
            ma = analysis.per_metric[metric]
            table, fit = getattr(ma, attr), getattr(ma, fit_attr)
            colour = colours[k % len(colours)]
            ok = table["enough"].to_numpy(dtype=bool)
            if not ok.any():
                continue
            ax.plot(table["centre"][ok], table["mean_adj"][ok], "o", color=colour, ms=4)
            if not fit.empty and np.isfinite(fit["fit_adj"]).any():
                ax.plot(fit["x"], fit["fit_adj"], "-", color=colour, lw=1.6, label=metric)
            else:
                ax.plot([], [], "o", color=colour, label=metric)
            drawn = True
        if not drawn:
            _no_data(ax, "not enough images in any bin")
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"within-prompt z, {other} effect removed")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_title("all metrics against steps")
    axes[1].set_title("all metrics against guidance scale")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Heatmap


def plot_heatmap(analysis: Analysis, metric: str) -> bytes:
    """Steps × guidance cells: colour = mean within-prompt z; text = raw mean and image count."""
    ma = analysis.per_metric[metric]
    s_bins, g_bins = analysis.cell_steps_bins, analysis.cell_guidance_bins
    fig = _figure(9.0, 6.4)
    ax = fig.subplots()
    cells = ma.cells
    if cells.empty or cells["n"].sum() == 0:
        _no_data(ax, "no data")
        return _png(fig)
    z = cells.pivot(index="steps_bin", columns="guidance_bin", values="mean_z").to_numpy(dtype=float)
    raw = cells.pivot(index="steps_bin", columns="guidance_bin", values="mean").to_numpy(dtype=float)
    n = cells.pivot(index="steps_bin", columns="guidance_bin", values="n").to_numpy()
    limit = np.nanmax(np.abs(z)) if np.isfinite(z).any() else 1.0
    limit = limit if limit > 0 else 1.0
    from matplotlib import colormaps

    cmap = colormaps["RdYlBu_r"].with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(z), origin="lower", aspect="auto", cmap=cmap, vmin=-limit, vmax=limit)
    fontsize = 9 if max(len(s_bins), len(g_bins)) <= 6 else 7
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            text = f"{raw[i, j]:.3g}\nn={int(n[i, j])}" if n[i, j] else "n=0"
            dark = np.isfinite(z[i, j]) and abs(z[i, j]) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    ax.set_xticks(range(len(g_bins)), g_bins.labels, rotation=30, ha="right")
    ax.set_yticks(range(len(s_bins)), s_bins.labels)
    ax.set_xlabel(GUIDANCE_LABEL)
    ax.set_ylabel(STEPS_LABEL)
    ax.set_title(f"{metric}: cell mean (text: raw mean, image count)")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(_z_label(metric))
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Quality against time


def _tradeoff_panel(ax, table: pd.DataFrame, *, ylabel: str, title: str, reason: str | None) -> None:
    usable = table["enough"].to_numpy(dtype=bool) & np.isfinite(table["time_ms"].to_numpy(dtype=float))
    if not usable.any():
        _no_data(ax, "not enough images with a time")
        ax.set_title(title)
        return
    t = table["time_ms"].to_numpy(dtype=float)
    m = table["mean_adj"].to_numpy(dtype=float)
    err = np.vstack([m - table["ci_low_adj"].to_numpy(dtype=float), table["ci_high_adj"].to_numpy(dtype=float) - m])
    err = np.where(np.isfinite(err), np.clip(err, 0, None), 0.0)
    ax.errorbar(t[usable], m[usable], yerr=err[:, usable], fmt="o", color=_MEAN_COLOUR, capsize=3, label="step bin")
    front = table["pareto"].to_numpy(dtype=bool) & usable
    if front.any():
        order = np.argsort(t[front])
        ax.plot(t[front][order], m[front][order], "-", color=_FRONT_COLOUR, lw=1.4, drawstyle="steps-post")
        ax.scatter(t[front], m[front], s=90, facecolors="none", edgecolors=_FRONT_COLOUR, lw=1.6, label="Pareto front")
    labels = table["label"].to_numpy()
    for j, k in enumerate(np.flatnonzero(front)):
        ax.annotate(
            labels[k], (t[k], m[k]), textcoords="offset points", xytext=(6, 8 if j % 2 else -14), fontsize=8,
            color="0.2",
        )
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\nno Pareto front: {reason.split(':')[0]}" if reason else ""), fontsize=10)
    ax.grid(True, alpha=0.3)


def plot_time_tradeoff(analysis: Analysis) -> bytes:
    """Mean quality of each step bin (adjusted z) against its median time, per metric and combined."""
    panels = [(m, analysis.per_metric[m].steps, analysis.per_metric[m].pareto_reason) for m in analysis.metrics]
    panels.append((COMBINED, analysis.combined_steps, analysis.combined_steps_reason))
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig = _figure(12.0, 4.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, table, reason) in zip(axes, panels):
        ylabel = _adj_label("combined score" if name == COMBINED else name, "guidance")
        if not analysis.has_time:
            _no_data(ax, "no elapsed_ms in the results")
            ax.set_title(name)
            continue
        title = f"{name} against time" + ("" if reason else " (labels: steps of the front)")
        _tradeoff_panel(ax, table, ylabel=ylabel, title=title, reason=reason)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(fontsize=8, loc="lower right")
    return _png(fig)


def plot_pareto_cells(analysis: Analysis) -> bytes:
    """Steps × guidance cells: combined score against median time, Pareto front marked."""
    cells = analysis.combined_cells
    fig = _figure(11.0, 6.0)
    ax = fig.subplots()
    usable = cells["enough"].to_numpy(dtype=bool) & np.isfinite(cells["time_ms"].to_numpy(dtype=float))
    usable &= np.isfinite(cells["mean_z"].to_numpy(dtype=float))
    if not analysis.has_time or not usable.any():
        _no_data(ax, analysis.pareto_reason or "no cell with enough images and a time")
        return _png(fig)
    g_centres = analysis.cell_guidance_bins.centres[cells["guidance_bin"].to_numpy()]
    points = ax.scatter(
        cells["time_ms"][usable], cells["mean_z"][usable], c=g_centres[usable], cmap="viridis", s=40,
        label="steps × guidance cell",
    )
    bar = fig.colorbar(points, ax=ax)
    bar.set_label(f"{GUIDANCE_LABEL} (cell centre)")
    front = cells["pareto"].to_numpy(dtype=bool)
    if front.any():
        f = cells[front].sort_values("time_ms")
        ax.plot(f["time_ms"], f["mean_z"], "-", color=_FRONT_COLOUR, lw=1.4, drawstyle="steps-post")
        ax.scatter(f["time_ms"], f["mean_z"], s=120, facecolors="none", edgecolors=_FRONT_COLOUR, lw=1.6,
                   label="Pareto front")
        for k, (_, row) in enumerate(f.iterrows()):
            ax.annotate(
                f"{row['steps_label']} st, g {row['guidance_label']}", (row["time_ms"], row["mean_z"]),
                textcoords="offset points", xytext=(6, -14 if k % 2 else 6), fontsize=7, color="0.2",
            )
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel("combined score (mean within-prompt z)")
    title = "settings cells: combined quality against time"
    if analysis.pareto_reason:
        title += "\nno Pareto front: " + analysis.pareto_reason.split(":")[0]
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Correlations


def plot_correlations(analysis: Analysis) -> bytes:
    """Pearson and Spearman correlation matrices, raw and within-prompt."""
    keys = [
        ("pearson", "Pearson, raw"),
        ("spearman", "Spearman, raw"),
        ("pearson_within_prompt", "Pearson, within-prompt z"),
        ("spearman_within_prompt", "Spearman, within-prompt z"),
    ]
    fig = _figure(11.0, 9.5)
    axes = fig.subplots(2, 2)
    image = None
    for ax, (key, title) in zip(axes.flat, keys):
        matrix = analysis.correlations[key]
        values = matrix.to_numpy(dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-1, vmax=1)
        names = list(matrix.columns)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                v = values[i, j]
                ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=9, color="white" if np.isfinite(v) and abs(v) > 0.6 else "black")
        ax.set_title(title)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.8)
        bar.set_label("correlation coefficient")
    fig.suptitle(f"correlations between metrics ({analysis.correlation_n} images with every metric)")
    return _png(fig)


# --------------------------------------------------------------------------------------------


def render_plots(analysis: Analysis, *, per_metric: bool = True) -> list[Plot]:
    """Every figure of the report, in report order; ``per_metric=False`` keeps the summary ones."""
    plots: list[Plot] = [
        Plot(
            key="overview",
            title="Overview: every metric against steps and guidance",
            caption="Bin means (dots) and LOWESS fits of within-prompt z-scores, the other setting's effect removed.",
            png=plot_overview(analysis),
        )
    ]
    for metric in analysis.metrics if per_metric else ():
        plots.append(
            Plot(
                key=f"{metric}_effects",
                title=f"{metric}: effect of steps and guidance",
                caption="Bin means with bootstrap 95 % intervals and a LOWESS fit; shaded: the recommendation.",
                png=plot_effects(analysis, metric),
            )
        )
        plots.append(
            Plot(
                key=f"{metric}_heatmap",
                title=f"{metric}: steps × guidance",
                caption="Colour: mean within-prompt z-score of the cell; text: raw mean and image count.",
                png=plot_heatmap(analysis, metric),
            )
        )
    plots.append(
        Plot(
            key="time_tradeoff",
            title="Quality against time per step bin",
            caption="Median time per image against mean quality; circled: Pareto front (faster or better).",
            png=plot_time_tradeoff(analysis),
        )
    )
    plots.append(
        Plot(
            key="pareto_cells",
            title="Settings cells on the time/quality front",
            caption="Each point is a steps × guidance cell; circled: Pareto-optimal cells of the combined score.",
            png=plot_pareto_cells(analysis),
        )
    )
    if not per_metric:
        return plots
    plots.append(
        Plot(
            key="correlations",
            title="Correlations between metrics",
            caption="Raw scores mix prompts; within-prompt z-scores show agreement on the same prompt.",
            png=plot_correlations(analysis),
        )
    )
    return plots
