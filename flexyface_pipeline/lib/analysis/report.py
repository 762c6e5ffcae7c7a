"""Outputs of an analysis: a self-contained HTML report, a JSON of recommendations, Markdown with
embedded plots and a flat dict of key numbers (for asset metadata).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.analysis.categorical import categorical_records, categorical_tables
from flexyface_pipeline.lib.analysis.engines import (
    EngineComparison,
    comparison_dict,
    comparison_html,
    plot_comparison,
)
from flexyface_pipeline.lib.analysis.core import (
    Analysis,
    GuidanceRecommendation,
    MetricAnalysis,
    ParetoSetting,
    StepsRecommendation,
)
from flexyface_pipeline.lib.analysis.plots import Plot, render_plots
from flexyface_pipeline.lib.analysis.stats import Estimate
from flexyface_pipeline.lib.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

REPORT_NAME = "sweep_report.html"
RECOMMENDATIONS_NAME = "recommendations.json"
SCHEMA_VERSION = 1

COMPARISON_TEST = "one-sided Dunnett test against the best bin (Gupta subset selection), alpha per analysis"
EFFECT_TEST = "Welch one-way ANOVA across bins, Holm-adjusted over all effect tests"


# --------------------------------------------------------------------------------------------
# JSON


def _num(value: float | int | None) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _steps_dict(r: StepsRecommendation) -> dict:
    return {
        "steps": r.steps,
        "bin": [r.bin_low, r.bin_high],
        "estimate": r.estimate.as_dict(),
        "estimate_z": r.estimate_z.as_dict(),
        "best_bin": [r.best_bin_low, r.best_bin_high],
        "best_estimate": r.best_estimate.as_dict(),
        "best_estimate_z": r.best_estimate_z.as_dict(),
        "difference_from_best_z": r.difference_z.as_dict(),
        "p_value_vs_best": _num(r.p_value),
        "note": r.note,
    }


def _band_dict(b: GuidanceRecommendation) -> dict:
    return {
        "band": [b.low, b.high],
        "estimate": b.estimate.as_dict(),
        "estimate_z": b.estimate_z.as_dict(),
        "best_bin": [b.best_bin_low, b.best_bin_high],
        "best_estimate": b.best_estimate.as_dict(),
        "best_estimate_z": b.best_estimate_z.as_dict(),
        "note": b.note,
    }


def _pareto_dict(p: ParetoSetting) -> dict:
    return {
        "steps": [p.steps_low, p.steps_high],
        "guidance": [p.guidance_low, p.guidance_high],
        "time_ms": _num(p.time_ms),
        "quality_z": p.quality_z.as_dict(),
    }


def _table_records(table: pd.DataFrame, columns: list[str]) -> list[dict]:
    return [{c: _num(row[c]) if c != "label" else str(row[c]) for c in columns} for _, row in table.iterrows()]


def _matrix(frame: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    return {str(r): {str(c): _num(frame.loc[r, c]) for c in frame.columns} for r in frame.index}


def _pareto_bins(table: pd.DataFrame) -> list[dict]:
    front = table[table["pareto"]].sort_values("time_ms")
    return [
        {
            "steps": [int(row["low"]), int(row["high"])],
            "time_ms": _num(row["time_ms"]),
            "quality_adjusted_z": Estimate(
                row["mean_adj"], row["ci_low_adj"], row["ci_high_adj"], int(row["n"])
            ).as_dict(),
        }
        for _, row in front.iterrows()
    ]


def _metric_dict(ma: MetricAnalysis) -> dict:
    bin_columns = ["label", "low", "high", "n", "mean", "ci_low", "ci_high", "mean_z", "ci_low_z", "ci_high_z",
                   "mean_adj", "ci_low_adj", "ci_high_adj", "p_vs_best", "time_ms"]
    return {
        "n": ma.n,
        "min_steps": _steps_dict(ma.min_steps) if ma.min_steps else None,
        "min_steps_reason": ma.min_steps_reason,
        "guidance_band": _band_dict(ma.guidance_band) if ma.guidance_band else None,
        "guidance_band_reason": ma.guidance_band_reason,
        "steps_effect_test": ma.steps_test.as_dict(),
        "guidance_effect_test": ma.guidance_test.as_dict(),
        "pareto_step_bins": _pareto_bins(ma.steps),
        "pareto_step_bins_reason": ma.pareto_reason,
        "steps_bins": _table_records(ma.steps, bin_columns),
        "guidance_bins": _table_records(ma.guidance, bin_columns),
    }


def recommendations_dict(analysis: Analysis, df: pd.DataFrame | None = None) -> dict:
    """The machine-readable recommendations; every non-finite number becomes ``null``."""
    s = analysis.settings
    out = {
        "schema_version": SCHEMA_VERSION,
        "sweeps": sorted(map(str, df["sweep"].dropna().unique())) if df is not None and "sweep" in df else [],
        "n_images": analysis.n_images,
        "n_prompts": analysis.n_prompts,
        "test": {
            "effect_test": EFFECT_TEST,
            "comparison_with_best": COMPARISON_TEST,
            "scale": "within-prompt z-scores, the other setting's LOWESS effect subtracted",
            "confidence_intervals": f"percentile bootstrap 95 %, {s.bootstrap} resamples, seed {s.seed}",
            "alpha": s.alpha,
            "min_images": s.min_images,
            "min_per_bin": s.min_per_bin,
            "min_per_cell": s.min_per_cell,
            "method": analysis.method,
        },
        "metrics": {m: _metric_dict(analysis.per_metric[m]) for m in analysis.metrics},
        "combined_metrics": list(analysis.combined_metrics),
        "pareto_settings": [_pareto_dict(p) for p in analysis.pareto_settings],
        "pareto_reason": analysis.pareto_reason,
        "pareto_step_bins_combined": _pareto_bins(analysis.combined_steps),
        "pareto_step_bins_combined_reason": analysis.combined_steps_reason,
        "combined_effect_tests": {
            "steps": analysis.combined_steps_test.as_dict(),
            "cells": analysis.cells_test.as_dict(),
        },
        "correlations": {k: _matrix(v) for k, v in analysis.correlations.items()},
        "correlation_n": analysis.correlation_n,
        "insufficient_data": {
            f"{m}.{what}": reason
            for m in analysis.metrics
            for what, reason in (
                ("min_steps", analysis.per_metric[m].min_steps_reason),
                ("guidance_band", analysis.per_metric[m].guidance_band_reason),
            )
            if reason
        }
        | ({"pareto_settings": analysis.pareto_reason} if analysis.pareto_reason else {}),
        "notes": list(analysis.notes),
    }
    if df is not None:  # engine / scheduler / size: effect per value with intervals
        out["categorical_effects"] = categorical_records(df, analysis.metrics, n_resamples=s.bootstrap, seed=s.seed)
    return out


# --------------------------------------------------------------------------------------------
# Key numbers and Markdown


def key_numbers(analysis: Analysis) -> dict[str, float | int | str]:
    """Flat numbers for asset metadata. Keys without a recommendation carry a ``*_reason`` string."""
    out: dict[str, float | int | str] = {
        "n_images": int(analysis.n_images),
        "n_prompts": int(analysis.n_prompts),
        "pareto_settings": len(analysis.pareto_settings),
    }
    for m in analysis.metrics:
        ma = analysis.per_metric[m]
        out[f"{m}.n"] = int(ma.n)
        if ma.min_steps:
            r = ma.min_steps
            out[f"{m}.min_steps"] = int(r.steps)
            out[f"{m}.min_steps_mean"] = float(r.estimate.mean)
            out[f"{m}.min_steps_n"] = int(r.estimate.n)
        else:
            out[f"{m}.min_steps_reason"] = str(ma.min_steps_reason)
        if ma.guidance_band:
            b = ma.guidance_band
            out[f"{m}.guidance_low"] = float(b.low)
            out[f"{m}.guidance_high"] = float(b.high)
            out[f"{m}.guidance_mean"] = float(b.estimate.mean)
            out[f"{m}.guidance_n"] = int(b.estimate.n)
        else:
            out[f"{m}.guidance_band_reason"] = str(ma.guidance_band_reason)
        for name, test in (("steps", ma.steps_test), ("guidance", ma.guidance_test)):
            if math.isfinite(test.p_adjusted):
                out[f"{m}.{name}_p_adjusted"] = float(test.p_adjusted)
    if analysis.pareto_settings:
        fastest = analysis.pareto_settings[0]
        out["pareto_fastest_time_ms"] = float(fastest.time_ms)
        out["pareto_fastest_steps"] = f"{fastest.steps_low}-{fastest.steps_high}"
    return out


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _ci(e: Estimate, digits: int = 3) -> str:
    if not math.isfinite(e.mean):
        return "–"
    if not (math.isfinite(e.ci_low) and math.isfinite(e.ci_high)):
        return f"{e.mean:.{digits}g} (n={e.n})"
    return f"{e.mean:.{digits}g} [{e.ci_low:.{digits}g}, {e.ci_high:.{digits}g}] (n={e.n})"


def _steps_text(ma: MetricAnalysis) -> str:
    r = ma.min_steps
    if r is None:
        return f"none: {ma.min_steps_reason}"
    text = (
        f"{r.steps} steps (bin {r.bin_low}–{r.bin_high}): {_ci(r.estimate)}; "
        f"best bin {r.best_bin_low}–{r.best_bin_high}: {_ci(r.best_estimate)}; "
        f"loss vs best (z): {_ci(r.difference_z, 2)}"
    )
    return text + (f". Note: {r.note}" if r.note else "")


def _band_text(ma: MetricAnalysis) -> str:
    b = ma.guidance_band
    if b is None:
        return f"none: {ma.guidance_band_reason}"
    text = (
        f"{b.low:.2f}–{b.high:.2f}: {_ci(b.estimate)}; best bin {b.best_bin_low:.2f}–{b.best_bin_high:.2f}: "
        f"{_ci(b.best_estimate)}"
    )
    return text + (f". Note: {b.note}" if b.note else "")


def analysis_markdown(analysis: Analysis, *, plots: list[Plot] | None = None) -> str:
    """Markdown summary with the plots embedded as base64 PNG (for ``MetadataValue.md``).

    Only the summary figures (overview, time trade-off, Pareto cells) are embedded, to keep the
    metadata small; the HTML report has the per-metric ones.
    """
    plots = plots if plots is not None else render_plots(analysis, per_metric=False)
    lines = [
        f"**{analysis.n_images} images, {analysis.n_prompts} prompts.**",
        "",
        "| metric | fewest steps | best guidance band |",
        "|---|---|---|",
    ]
    for m in analysis.metrics:
        ma = analysis.per_metric[m]
        lines.append(f"| {m} | {_md_cell(_steps_text(ma))} | {_md_cell(_band_text(ma))} |")
    lines.append("")
    for p in plots:
        lines += [f"### {p.title}", "", f"![{p.key}]({_data_uri(p.png)})", "", p.caption, ""]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1300px;
       color: #222; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 1.7em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 16px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
.none { color: #8a3b00; } .method { background: #f7f7f2; padding: 10px 14px; border-left: 4px solid #bbb; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "–"
        return f"{value:.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"
    return _esc(value)


def _p(value: float) -> str:
    if not math.isfinite(value):
        return "–"
    return "< 0.0001" if value < 1e-4 else f"{value:.2g}"


def _html_table(frame: pd.DataFrame, *, index: bool = False) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in ([frame.index.name or ""] if index else []) + list(frame.columns))
    body = []
    for idx, row in frame.iterrows():
        cells = [f"<th>{_esc(idx)}</th>"] if index else []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float, np.integer, np.floating)) else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(plot: Plot) -> str:
    return (
        f'<figure id="{_esc(plot.key)}"><img alt="{_esc(plot.title)}" src="{_data_uri(plot.png)}">'
        f"<figcaption>{_esc(plot.title)}. {_esc(plot.caption)}</figcaption></figure>"
    )


def _recommendation_rows(analysis: Analysis) -> str:
    rows = []
    for m in analysis.metrics:
        ma = analysis.per_metric[m]
        steps_cls = ' class="none"' if ma.min_steps is None else ""
        band_cls = ' class="none"' if ma.guidance_band is None else ""
        rows.append(
            f"<tr><th>{_esc(m)}</th><td class='num'>{ma.n}</td>"
            f"<td{steps_cls}>{_esc(_steps_text(ma))}</td><td{band_cls}>{_esc(_band_text(ma))}</td>"
            f"<td class='num'>{_p(ma.steps_test.p_adjusted)}</td>"
            f"<td class='num'>{_p(ma.guidance_test.p_adjusted)}</td></tr>"
        )
    return (
        "<table><thead><tr><th>metric</th><th>images</th><th>fewest steps as good as the best</th>"
        "<th>best guidance band</th><th>steps effect p (Holm)</th><th>guidance effect p (Holm)</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _pareto_html(analysis: Analysis) -> str:
    if not analysis.pareto_settings:
        return f"<p class='none'>No Pareto settings: {_esc(analysis.pareto_reason)}</p>"
    frame = pd.DataFrame(
        [
            {
                "steps": f"{p.steps_low}–{p.steps_high}",
                "guidance scale": f"{p.guidance_low:.2f}–{p.guidance_high:.2f}",
                "time per image (ms)": p.time_ms,
                "combined score (z) [95 % CI]": _ci(p.quality_z, 3),
            }
            for p in analysis.pareto_settings
        ]
    )
    return _html_table(frame)


def _provenance(df: pd.DataFrame) -> str:
    columns = [c for c in df.columns if c.endswith(("_model", "_revision")) or c in ("engine", "sweep")]
    if not columns:
        return ""
    rows = []
    for c in columns:
        values = df[c].dropna().astype(str).unique()
        shown = ", ".join(values[:5]) + (f" … ({len(values)} values)" if len(values) > 5 else "")
        rows.append(f"<tr><th>{_esc(c)}</th><td>{_esc(shown)}</td></tr>")
    return f"<h2>Provenance</h2><table><tbody>{''.join(rows)}</tbody></table>"


def _engines_html(engines: EngineComparison | None, per_engine: dict[str, Analysis], plot: Plot | None) -> str:
    """The cross-engine section (its plot: the caller's ``engines`` plot, else drawn here), and
    each engine's own recommendations."""
    if engines is None:
        return ""
    parts = [comparison_html(engines, _data_uri(plot.png if plot is not None else plot_comparison(engines)))]
    for engine, own in per_engine.items():
        parts += [f"<h3>Recommendations for {_esc(engine)} alone ({own.n_images} images)</h3>",
                  _recommendation_rows(own)]
    return "\n".join(parts)


def render_html(analysis: Analysis, df: pd.DataFrame, plots: list[Plot], *,
                engines: EngineComparison | None = None, per_engine: dict[str, Analysis] | None = None) -> str:
    by_key = {p.key: p for p in plots}
    sweeps = ", ".join(sorted(map(str, df["sweep"].dropna().unique()))) if "sweep" in df else ""
    steps = df["steps"].dropna()
    guidance = df["guidance"].dropna()
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Sweep report {_esc(sweeps)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Sweep report{': ' + _esc(sweeps) if sweeps else ''}</h1>",
        f"<p>{analysis.n_images} images, {analysis.n_prompts} prompts; steps {_fmt(steps.min())}–"
        f"{_fmt(steps.max())}, guidance scale {_fmt(guidance.min())}–{_fmt(guidance.max())}.</p>",
        "<h2>Which settings are worth it</h2>",
        _recommendation_rows(analysis),
        "<p>Estimates are means with bootstrap 95 % intervals and the number of images; 'loss vs best' is "
        "in within-prompt z units (0.1 = a tenth of a prompt's image-to-image spread).</p>",
        "<h3>Pareto-optimal settings (combined score against time)</h3>",
        _pareto_html(analysis),
        f"<h3>Test used</h3><p class='method'>{_esc(analysis.method)}</p>",
        _figure_html(by_key["overview"]),
    ]
    if analysis.notes:
        parts.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in analysis.notes) + "</ul>")
    for m in analysis.metrics:
        ma = analysis.per_metric[m]
        parts.append(f"<h2 id='metric-{_esc(m)}'>{_esc(m)}</h2>")
        for key in (f"{m}_effects", f"{m}_heatmap"):
            if key in by_key:
                parts.append(_figure_html(by_key[key]))
        table = ma.steps[["label", "n", "mean", "ci_low", "ci_high", "mean_z", "p_vs_best", "time_ms"]].rename(
            columns={"label": "steps", "p_vs_best": "p vs best (Dunnett)", "time_ms": "time per image (ms)"}
        )
        parts.append("<details><summary>step bins</summary>" + _html_table(table) + "</details>")
        table = ma.guidance[["label", "n", "mean", "ci_low", "ci_high", "mean_z", "p_vs_best"]].rename(
            columns={"label": "guidance scale", "p_vs_best": "p vs best (Dunnett)"}
        )
        parts.append("<details><summary>guidance bins</summary>" + _html_table(table) + "</details>")
    parts.append("<h2>Quality against time</h2>")
    for key in ("time_tradeoff", "pareto_cells"):
        parts.append(_figure_html(by_key[key]))
    parts.append("<h2>Correlations between metrics</h2>")
    parts.append(_figure_html(by_key["correlations"]))
    for key, title in (("pearson", "Pearson, raw"), ("spearman", "Spearman, raw")):
        frame = analysis.correlations[key].copy()
        frame.index.name = title
        parts.append(_html_table(frame, index=True))
    categorical = categorical_tables(df, analysis.metrics, n_resamples=analysis.settings.bootstrap,
                                     seed=analysis.settings.seed)
    if categorical:
        parts.append("<h2>Categorical axes</h2><p>Per engine, scheduler or size: mean score and mean within-prompt "
                     "z-score with its bootstrap 95 % interval.</p>")
        parts += [_html_table(table) for table in categorical]
    parts.append(_engines_html(engines, per_engine or {}, by_key.get("engines")))
    parts.append(_provenance(df))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    analysis: Analysis, df: pd.DataFrame, out_dir: Path, *, plots: list[Plot] | None = None,
    engines: EngineComparison | None = None, per_engine: dict[str, Analysis] | None = None,
) -> tuple[Path, Path]:
    """Write ``sweep_report.html`` (plots embedded) and ``recommendations.json`` atomically.

    ``plots``: the figures of :func:`render_plots` when the caller already has them. With several
    engines, ``engines`` (``compare_engines``) and ``per_engine`` (``analyze`` of each engine's
    rows) add the cross-engine section and each engine's own recommendations."""
    out_dir = Path(out_dir)
    plots = render_plots(analysis) if plots is None else plots
    html = render_html(analysis, df, plots, engines=engines, per_engine=per_engine)
    html_path = atomic_write_bytes(out_dir / REPORT_NAME, html.encode("utf-8"))
    recommendations = recommendations_dict(analysis, df)
    if engines is not None:
        recommendations["engines_compared"] = comparison_dict(engines)
        recommendations["per_engine"] = {e: recommendations_dict(a) for e, a in (per_engine or {}).items()}
    payload = json.dumps(recommendations, indent=2, allow_nan=False, ensure_ascii=False)
    json_path = atomic_write_bytes(out_dir / RECOMMENDATIONS_NAME, payload.encode("utf-8"))
    logger.info("wrote %s and %s", html_path, json_path)
    return html_path, json_path
