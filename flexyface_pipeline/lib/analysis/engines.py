"""Engines compared: which engine, with which settings, gives the best images per second.

Quality is made comparable across prompts and engines by z-scoring every metric within each
prompt over the rows of *all* engines (``within_prompt_zscores``); the combined score is the mean
of those z-scores over the metrics. Then:

* per engine: images, mean combined z with a bootstrap 95 % interval, median ``elapsed_ms``;
* cells (engine, steps bin, guidance bin): mean combined z and median time per cell; the cells no
  other cell beats on both (higher quality, lower time) form the Pareto front;
* paired differences: a multi-engine sweep gives every engine the same prompts and seeds, so row
  k of one engine and row k of another differ only by the engine. Rows are paired by
  (prompt, seed, occurrence of that pair in design order); per pair of engines the mean
  difference of the combined z with a paired bootstrap interval, and the same per prompt.

Guidance-free engines have no guidance value: their cells span all guidance ("—").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.analysis.stats import (
    Estimate,
    auto_bin_count,
    bootstrap_mean,
    child_rng,
    make_bins,
    pareto_front,
    within_prompt_zscores,
)

MIN_PER_CELL = 5  # images a cell needs to be on the front
MAX_STEP_BINS = 4
MAX_GUIDANCE_BINS = 3
NO_GUIDANCE = "—"


@dataclass(frozen=True)
class EngineComparison:
    engines: pd.DataFrame  # engine, n, combined (mean, ci_low, ci_high), median_ms, per-metric z means
    cells: pd.DataFrame  # engine, steps, guidance, n, combined, median_ms, on_front
    paired: pd.DataFrame  # engine_a, engine_b, pairs, diff, ci_low, ci_high, better
    paired_by_prompt: pd.DataFrame  # engine_a, engine_b, prompt, pairs, diff, ci_low, ci_high
    metrics: tuple[str, ...]

    @property
    def best_engine(self) -> str:
        """The engine with the highest mean combined z."""
        return str(self.engines.sort_values("combined", ascending=False)["engine"].iloc[0])


def combined_z(df: pd.DataFrame, metrics: tuple[str, ...]) -> np.ndarray:
    """Mean over ``metrics`` of the within-prompt z-score (all engines' rows pooled per prompt)."""
    z = within_prompt_zscores(df, list(metrics))
    return z.mean(axis=1, skipna=True).to_numpy(dtype=float)


def _pair_keys(df: pd.DataFrame) -> pd.Series:
    order = df.sort_values(["engine", "index"] if "index" in df else ["engine"], kind="mergesort")
    occurrence = order.groupby(["engine", "prompt", "seed"], sort=False).cumcount()
    keys = order["prompt"].astype(str) + "\x1f" + order["seed"].astype(str) + "\x1f" + occurrence.astype(str)
    return keys.reindex(df.index)


def _labels(values: pd.Series, max_bins: int, *, integer: bool) -> pd.Series:
    """Bin labels of ``values``; NaN values (an engine without guidance) get "—"."""
    out = pd.Series(NO_GUIDANCE, index=values.index, dtype=object)
    ok = values.notna()
    if not ok.any():
        return out
    v = values[ok].to_numpy(dtype=float)
    bins = make_bins(v, auto_bin_count(len(v), len(np.unique(v)), min_per_bin=MIN_PER_CELL, max_bins=max_bins),
                     integer=integer)
    out[ok] = [bins.label(c) for c in bins.assign(v)]
    return out


def _paired_estimate(diffs: np.ndarray, n_resamples: int, rng: np.random.Generator) -> Estimate:
    return bootstrap_mean(diffs, n_resamples=n_resamples, rng=rng)


def compare_engines(df: pd.DataFrame, metrics: tuple[str, ...], *, bootstrap: int = 1000,
                    seed: int = 0) -> EngineComparison | None:
    """The comparison of the engines in ``df`` (the export's rows); None with fewer than two."""
    if "engine" not in df or df["engine"].nunique() < 2:
        return None
    metrics = tuple(m for m in metrics if m in df)
    if not metrics:
        raise ValueError("no metric to compare the engines by")
    df = df.reset_index(drop=True).copy()
    df["combined_z"] = combined_z(df, metrics)
    z = within_prompt_zscores(df, list(metrics))
    engines = []
    for engine, rows in df.groupby("engine", sort=True):
        est = bootstrap_mean(rows["combined_z"].to_numpy(), n_resamples=bootstrap, rng=child_rng(seed, "engine", engine))
        record = {"engine": engine, "n": est.n, "combined": est.mean, "ci_low": est.ci_low, "ci_high": est.ci_high,
                  "median_ms": float(rows["elapsed_ms"].median()) if "elapsed_ms" in rows else math.nan}
        for metric in metrics:
            record[f"{metric}_z"] = float(z.loc[rows.index, f"{metric}_z"].mean())
        engines.append(record)
    engines_df = pd.DataFrame(engines)

    cell_rows = []
    for engine, rows in df.groupby("engine", sort=True):
        steps = _labels(rows["steps"], MAX_STEP_BINS, integer=True)
        guidance = _labels(rows["guidance"], MAX_GUIDANCE_BINS, integer=False)
        for (s, g), cell in rows.groupby([steps, guidance], sort=True):
            cell_rows.append({"engine": engine, "steps": s, "guidance": g, "n": len(cell),
                              "combined": float(cell["combined_z"].mean()),
                              "median_ms": float(cell["elapsed_ms"].median()) if "elapsed_ms" in cell else math.nan})
    cells = pd.DataFrame(cell_rows, columns=["engine", "steps", "guidance", "n", "combined", "median_ms"])
    eligible = cells["n"] >= MIN_PER_CELL
    front = np.zeros(len(cells), dtype=bool)
    if eligible.any():
        front[eligible.to_numpy()] = pareto_front(cells.loc[eligible, "median_ms"], cells.loc[eligible, "combined"])
    cells["on_front"] = front

    df["pair"] = _pair_keys(df)
    wide = df.pivot_table(index="pair", columns="engine", values="combined_z", aggfunc="first")
    prompt_of = df.drop_duplicates("pair").set_index("pair")["prompt"]
    paired, by_prompt = [], []
    for a, b in combinations(sorted(df["engine"].unique()), 2):
        both = wide[[a, b]].dropna()
        diffs = (both[a] - both[b]).to_numpy(dtype=float)
        est = _paired_estimate(diffs, bootstrap, child_rng(seed, "paired", a, b))
        better = ""
        if math.isfinite(est.ci_low) and est.ci_low > 0:
            better = a
        elif math.isfinite(est.ci_high) and est.ci_high < 0:
            better = b
        paired.append({"engine_a": a, "engine_b": b, "pairs": est.n, "diff": est.mean, "ci_low": est.ci_low,
                       "ci_high": est.ci_high, "better": better})
        prompts = prompt_of.reindex(both.index)
        for prompt, group in both.groupby(prompts, sort=True):
            d = (group[a] - group[b]).to_numpy(dtype=float)
            e = _paired_estimate(d, bootstrap, child_rng(seed, "paired", a, b, str(prompt)))
            by_prompt.append({"engine_a": a, "engine_b": b, "prompt": prompt, "pairs": e.n, "diff": e.mean,
                              "ci_low": e.ci_low, "ci_high": e.ci_high})
    return EngineComparison(
        engines=engines_df,
        cells=cells,
        paired=pd.DataFrame(paired, columns=["engine_a", "engine_b", "pairs", "diff", "ci_low", "ci_high", "better"]),
        paired_by_prompt=pd.DataFrame(by_prompt, columns=["engine_a", "engine_b", "prompt", "pairs", "diff",
                                                          "ci_low", "ci_high"]),
        metrics=metrics,
    )


NO_GUIDANCE_REASON = "the engine takes no guidance value"


def analyze_engine(rows: pd.DataFrame, metrics: tuple[str, ...], *, bootstrap: int = 1000, seed: int = 0):
    """``analyze`` of one engine's rows. An engine without guidance (every guidance cell empty)
    is analysed over steps alone: its guidance band is refused with that reason."""
    from flexyface_pipeline.lib.analysis.core import analyze

    if rows["guidance"].notna().any():
        return analyze(rows, metrics=metrics, bootstrap=bootstrap, seed=seed)
    analysis = analyze(rows.assign(guidance=0.0), metrics=metrics, bootstrap=bootstrap, seed=seed)
    per_metric = {m: replace(ma, guidance_band=None, guidance_band_reason=NO_GUIDANCE_REASON)
                  for m, ma in analysis.per_metric.items()}
    return replace(analysis, per_metric=per_metric)


def _clean(value: object) -> object:
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def comparison_dict(cmp: EngineComparison) -> dict:
    """For recommendations.json."""
    def records(frame: pd.DataFrame) -> list[dict]:
        return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict("records")]

    return {
        "quality": "mean within-prompt z over " + ", ".join(cmp.metrics) + " (all engines pooled per prompt)",
        "best_engine": cmp.best_engine,
        "engines": records(cmp.engines),
        "pareto_cells": records(cmp.cells[cmp.cells["on_front"]]),
        "cells": records(cmp.cells),
        "paired_differences": records(cmp.paired),
        "paired_differences_by_prompt": records(cmp.paired_by_prompt),
    }


def _ci(mean: float, lo: float, hi: float) -> str:
    if not math.isfinite(mean):
        return "—"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:+.3f}"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def comparison_markdown(cmp: EngineComparison) -> str:
    lines = [f"**Engines compared** (quality: mean within-prompt z of {', '.join(cmp.metrics)}; best: "
             f"`{cmp.best_engine}`)", "",
             "| engine | images | quality (95 % CI) | median ms/image |", "|---|---:|---|---:|"]
    for r in cmp.engines.sort_values("combined", ascending=False).itertuples():
        lines.append(f"| {r.engine} | {r.n} | {_ci(r.combined, r.ci_low, r.ci_high)} | {r.median_ms:.0f} |")
    front = cmp.cells[cmp.cells["on_front"]].sort_values("median_ms")
    if len(front):
        lines += ["", "Pareto cells (no other cell is both better and faster):", "",
                  "| engine | steps | guidance | images | quality | median ms/image |", "|---|---|---|---:|---:|---:|"]
        for r in front.itertuples():
            lines.append(f"| {r.engine} | {r.steps} | {r.guidance} | {r.n} | {r.combined:+.3f} | {r.median_ms:.0f} |")
    if len(cmp.paired):
        lines += ["", "Paired differences (same prompts and seeds):", "",
                  "| A − B | pairs | quality difference (95 % CI) | better |", "|---|---:|---|---|"]
        for r in cmp.paired.itertuples():
            lines.append(f"| {r.engine_a} − {r.engine_b} | {r.pairs} | {_ci(r.diff, r.ci_low, r.ci_high)} | "
                         f"{r.better or 'no significant difference'} |")
    return "\n".join(lines)


def comparison_html(cmp: EngineComparison, plot_uri: str | None = None) -> str:
    """A report section: the markdown tables as HTML, and the quality-vs-time plot."""
    import html

    def table(frame: pd.DataFrame, columns: list[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = []
        for row in frame[columns].itertuples(index=False):
            cells = []
            for v in row:
                v = _clean(v)
                cells.append(f"<td>{'—' if v is None else (f'{v:.3f}' if isinstance(v, float) else html.escape(str(v)))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    parts = ["<h2>Engines compared</h2>",
             f"<p>Quality is the mean within-prompt z-score of {html.escape(', '.join(cmp.metrics))}, with every "
             "engine's images pooled per prompt; intervals are bootstrap 95 %. Best engine: "
             f"<b>{html.escape(cmp.best_engine)}</b>.</p>",
             table(cmp.engines.sort_values("combined", ascending=False),
                   ["engine", "n", "combined", "ci_low", "ci_high", "median_ms"])]
    if plot_uri:
        parts.append(f'<figure><img src="{plot_uri}" alt="engines: quality against time"></figure>')
    parts += ["<h3>Pareto cells (engine, steps, guidance)</h3>",
              table(cmp.cells[cmp.cells["on_front"]].sort_values("median_ms"),
                    ["engine", "steps", "guidance", "n", "combined", "median_ms"]),
              "<h3>Paired differences (same prompts and seeds)</h3>",
              table(cmp.paired, ["engine_a", "engine_b", "pairs", "diff", "ci_low", "ci_high", "better"]),
              "<h3>Paired differences per prompt</h3>",
              table(cmp.paired_by_prompt, ["engine_a", "engine_b", "prompt", "pairs", "diff", "ci_low", "ci_high"])]
    return "\n".join(parts)


def plot_comparison(cmp: EngineComparison) -> bytes:
    """Quality (combined z) against median time per image: one point per cell, per engine a
    colour; the Pareto cells ringed; each engine's mean with its interval."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 5.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = dict(zip(sorted(cmp.engines["engine"]), ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                                        "#8c564b", "#e377c2"], strict=False))
    for engine, cells in cmp.cells.groupby("engine"):
        ax.scatter(cells["median_ms"], cells["combined"], s=12 + 4 * cells["n"], alpha=0.6,
                   color=colours.get(engine, "0.4"), label=engine)
    front = cmp.cells[cmp.cells["on_front"]].sort_values("median_ms")
    if len(front):
        ax.plot(front["median_ms"], front["combined"], color="#c62d42", lw=1.2, ls="--", label="Pareto front")
        ax.scatter(front["median_ms"], front["combined"], s=90, facecolors="none", edgecolors="#c62d42")
    for r in cmp.engines.itertuples():
        if math.isfinite(r.ci_low) and math.isfinite(r.ci_high):
            ax.errorbar([r.median_ms], [r.combined], yerr=[[r.combined - r.ci_low], [r.ci_high - r.combined]],
                        fmt="D", color=colours.get(r.engine, "0.4"), capsize=4, markeredgecolor="black")
    ax.set_xscale("log" if cmp.cells["median_ms"].min() > 0 else "linear")
    ax.set_xlabel("median time per image (ms)")
    ax.set_ylabel("quality (mean within-prompt z)")
    ax.set_title("Engines: quality against time (cells: engine × steps × guidance; ◆ engine mean ± 95 % CI)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
