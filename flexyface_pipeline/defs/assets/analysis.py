"""``sweep_analysis`` (which settings are worth it) and ``image_grid`` (steps × guidance sheets)."""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from flexyface_pipeline.lib.config import METRICS, validate_metrics
from flexyface_pipeline.lib.export import SCORE_TABLES, merge_tables
from flexyface_pipeline.defs.assets.results import EXPORT_POOL, sweep_results
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import generated_images
from flexyface_pipeline.defs.figures import Figure, figures_metadata
from flexyface_pipeline.defs.partitions import require_tables, sweep_keys, sweeps_partitions
from flexyface_pipeline.defs.previews import png_markdown as _png_markdown
from flexyface_pipeline.defs.resources import StorageResource


class AnalysisConfig(dg.Config):
    """Which rows of the export to analyse (empty lists: all)."""

    sweeps: list[str] = Field(default=[], description="Only these sweeps.")
    engines: list[str] = Field(default=[], description="Only these engines.")
    metrics: list[str] = Field(default=list(METRICS), description="Metrics to analyse.")
    bootstrap: int = Field(default=1000, description="Bootstrap resamples for confidence intervals.")
    seed: int = Field(default=0, description="Seed of the bootstrap.")


def select_rows(df: pd.DataFrame, config: AnalysisConfig) -> pd.DataFrame:
    for column, wanted in (("sweep", config.sweeps), ("engine", config.engines)):
        if wanted:
            unknown = sorted(set(wanted) - set(df[column]))
            if unknown:
                raise ValueError(f"{column}s: {unknown} not in the export (has {sorted(df[column].unique())})")
            df = df[df[column].isin(wanted)]
    return df.reset_index(drop=True)


def _nothing_to_analyse(context: dg.AssetExecutionContext, exports_dir: Path, why: str) -> dg.MaterializeResult:
    """No report: a report left by an earlier analysis describes rows the export no longer has, so it goes."""
    from flexyface_pipeline.lib.analysis import RECOMMENDATIONS_NAME, REPORT_NAME

    removed = []
    for name in (REPORT_NAME, RECOMMENDATIONS_NAME):
        path = exports_dir / name
        if path.is_file():
            path.unlink()
            removed.append(str(path))
    context.log.info("nothing to analyse: %s", why)
    for path in removed:
        context.log.info("removed %s: it described an earlier export", path)
    return dg.MaterializeResult(
        metadata={
            "num_rows": dg.MetadataValue.int(0),
            "summary": dg.MetadataValue.md(f"Nothing to analyse: {why}. No report was written."),
            "removed_reports": dg.MetadataValue.json(removed),
        }
    )


@dg.asset(
    deps=[sweep_results],
    group_name="results",
    kinds={"pandas", "html", "json"},
    pool=EXPORT_POOL,  # reads the export while no export step rewrites it (results.py)
    description="Effects of steps and guidance on each metric (bootstrap CIs, LOWESS), per-prompt z-scores, metric "
    "correlations, quality vs time with its Pareto front, and recommended settings with their evidence. Writes "
    "data/exports/sweep_report.html and recommendations.json.",
)
def sweep_analysis(context: dg.AssetExecutionContext, config: AnalysisConfig, storage: StorageResource) -> dg.MaterializeResult:
    from flexyface_pipeline.lib.analysis import analyze, key_numbers, write_report
    from flexyface_pipeline.lib.analysis.engines import (
        analyze_engine,
        compare_engines,
        comparison_markdown,
        plot_comparison,
    )
    from flexyface_pipeline.lib.analysis.plots import Plot, render_plots

    metrics = validate_metrics(config.metrics)
    store = storage.store()
    export = pd.read_parquet(store.exports_dir / "sweep_results.parquet")
    if export.empty:
        return _nothing_to_analyse(context, store.exports_dir, "the export has no rows (no sweep is fully scored yet)")
    df = select_rows(export, config)  # never empty: a sweep or engine the rows lack is refused
    analysis = analyze(df, metrics=metrics, bootstrap=config.bootstrap, seed=config.seed)
    plots = render_plots(analysis)
    # Several engines: compared with each other, and each analysed alone.
    engines = compare_engines(df, metrics, bootstrap=config.bootstrap, seed=config.seed)
    per_engine = {} if engines is None else {
        str(e): analyze_engine(rows, metrics, bootstrap=config.bootstrap, seed=config.seed)
        for e, rows in df.groupby("engine", sort=True)}
    if engines is not None:
        plots = [*plots, Plot("engines", "Engines: quality against time",
                              f"Best engine: {engines.best_engine}. Cells: engine × steps × guidance; the Pareto "
                              "front ringed; ◆ each engine's mean with its 95 % interval.", plot_comparison(engines))]
    report, recommendations = write_report(analysis, df, store.exports_dir, plots=plots, engines=engines,
                                           per_engine=per_engine)
    for note in getattr(analysis, "notes", []) or []:
        context.log.info(note)
    numbers = {k: v for k, v in key_numbers(analysis).items()}
    metadata: dict = {
        # The plots, on the asset's Overview page (figures.py says why they are a column schema).
        **figures_metadata(Figure(p.key, p.title, p.caption, p.png) for p in plots),
        **recommendation_entries(analysis),
        **{k: v for engine, own in per_engine.items()
           for k, v in recommendation_entries(own, prefix=f"recommended.{engine}.").items()},
        **({} if engines is None else {
            "best_engine": dg.MetadataValue.text(engines.best_engine),
            "engines_compared": dg.MetadataValue.md(comparison_markdown(engines))}),
        "summary": dg.MetadataValue.md(
            f"**{analysis.n_images} images, {analysis.n_prompts} prompts, sweeps: "
            f"{', '.join(sorted(map(str, df['sweep'].unique())))[:300]}.** The plots are under *Columns* above; "
            f"the full report (tables, method) is `{report.name}` under data/exports/."),
        "num_rows": dg.MetadataValue.int(len(df)),
        "report": dg.MetadataValue.path(str(report)),
        "recommendations": dg.MetadataValue.path(str(recommendations)),
    }
    for key, value in numbers.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            metadata[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            metadata[key] = dg.MetadataValue.float(value)
        else:
            metadata[key] = dg.MetadataValue.text(str(value))
    return dg.MaterializeResult(metadata=metadata)


def recommendation_entries(analysis, prefix: str = "recommended.") -> dict[str, dg.MarkdownMetadataValue]:
    """Per metric, its recommendations or the stated reason for making none. Each entry stays under
    the 1,000 characters up to which the UI shows Markdown inline in the metadata table."""
    entries = {}
    for metric in analysis.metrics:
        ma = analysis.per_metric[metric]
        steps = (f"**{ma.min_steps.steps}** (bin {ma.min_steps.bin_low}–{ma.min_steps.bin_high})" if ma.min_steps
                 else f"none — {_short(ma.min_steps_reason)}")
        band = (f"**{ma.guidance_band.low:.2f}–{ma.guidance_band.high:.2f}**" if ma.guidance_band
                else f"none — {_short(ma.guidance_band_reason)}")
        text = f"{ma.n} images. Fewest steps: {steps}. Guidance band: {band}."
        entries[f"{prefix}{metric}"] = dg.MetadataValue.md(text[:990])
    return entries


def _short(reason: str | None) -> str:
    text = " ".join(str(reason or "no reason recorded").split())
    return text.replace("<", "\\<").replace("*", "\\*").replace("_", "\\_")[:420]


@dg.asset(
    partitions_def=sweeps_partitions,
    deps=[generated_images, *score_assets],
    group_name="results",
    kinds={"png"},
    backfill_policy=dg.BackfillPolicy.single_run(),
    description="Per sweep: steps × guidance contact sheets per engine, scheduler and prompt (one representative "
    "image per cell, labelled with its settings and scores), under `data/exports/grids/SWEEP/`, and the sweep's own "
    "analysis plots (effects, heatmaps, time trade-off; all sweeps together: `sweep_analysis`). The latest "
    "materialized sweep's sheets and plots are shown under *Columns* on this page; a sweep's own are in its "
    "partition's `contact_sheets` entry and materialization.",
)
def image_grid(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    from flexyface_pipeline.lib.designs import axis_bins
    from flexyface_pipeline.lib.grid import write_grids

    sweeps = sweep_keys(context)
    store = storage.store()
    require_tables(store, sweeps, ("parameters", "images"), "image_grid")
    written = []
    sweep_rows: dict[str, pd.DataFrame] = {}
    for sweep in sweeps:
        scores = {m: store.read_table(t, sweep) for m, (t, _) in SCORE_TABLES.items() if store.has_table(t, sweep)}
        rows = merge_tables(store.read_table("parameters", sweep), store.read_table("images", sweep), scores)
        rows["image_path"] = [str(store.absolute(p)) for p in rows["image_path"]]
        sweep_rows[sweep] = rows
        out_dir = store.exports_dir / "grids" / sweep
        for old in out_dir.glob("*.png"):
            old.unlink()
        sheets = write_grids(rows, out_dir, **axis_bins(store.read_spec_dict(sweep)))  # a grid: one bin per value
        prompts = {path.stem: prompt for prompt, path in _sheet_prompts(rows, sheets)}
        written += [(sweep, prompt, out_dir / f"{stem}.png") for stem, prompt in prompts.items()]
    figures = [Figure(f"{sweep}/{path.stem}", f"{sweep}: {prompt}", "rows: steps (most on top), columns: guidance "
                      "scale; each cell: the image closest to its centre, with its settings and scores",
                      path.read_bytes())
               for sweep, prompt, path in written]
    analysed = {}
    for sweep in sweeps:
        plots, why = sweep_plots(sweep, sweep_rows[sweep])
        figures += plots
        analysed[sweep] = why or f"{len(plots)} plots"
        if why:
            context.log.info("sweep %s: no analysis plots: %s", sweep, why)
    sheets = "\n\n".join(f"**{sweep}: {path.stem}**\n\n{_png_markdown(path, 640)}" for sweep, _, path in written)
    return dg.MaterializeResult(
        metadata={
            **figures_metadata(figures),  # every sheet, on the asset's Overview page (figures.py)
            "sheets": dg.MetadataValue.int(len(written)),
            "directory": dg.MetadataValue.path(str(store.exports_dir / "grids")),
            "contact_sheets": dg.MetadataValue.md(sheets or "no sheet"),
            "analysis": dg.MetadataValue.json(analysed),
        }
    )


# The plots of one sweep are a view, not the report: fewer bootstrap resamples than sweep_analysis;
# a sweep with fewer images than the analysis needs to estimate an effect gets no empty frames.
SWEEP_PLOT_BOOTSTRAP = 200
SWEEP_PLOT_MIN_IMAGES = 60


def sweep_plots(sweep: str, rows: pd.DataFrame) -> tuple[list[Figure], str]:
    """The analysis plots of one sweep's fully scored rows (an engine without guidance over steps
    alone), or none and why."""
    from flexyface_pipeline.lib.analysis.engines import analyze_engine
    from flexyface_pipeline.lib.analysis.plots import render_plots

    complete = rows.dropna(subset=list(METRICS))
    if len(complete) < SWEEP_PLOT_MIN_IMAGES:
        return [], (f"{len(complete)} fully scored images, fewer than the {SWEEP_PLOT_MIN_IMAGES} the analysis needs "
                    "to estimate an effect; all sweeps together: sweep_analysis")
    try:
        analysis = analyze_engine(complete, METRICS, bootstrap=SWEEP_PLOT_BOOTSTRAP, seed=0)
    except ValueError as err:
        return [], str(err)
    return [Figure(f"{sweep}/analysis/{p.key}", f"{sweep}: {p.title}", p.caption, p.png)
            for p in render_plots(analysis)], ""


def _sheet_prompts(rows: pd.DataFrame, paths: list[Path]) -> list[tuple[str, Path]]:
    """Each sheet with its prompt (sheets are numbered by the prompt's first appearance)."""
    prompts = list(dict.fromkeys(rows["prompt"].dropna().astype(str)))
    out = []
    for path in paths:
        number = path.stem.split("_", 1)[0]
        prompt = prompts[int(number)] if number.isdigit() and int(number) < len(prompts) else path.stem
        out.append((prompt, path))
    return out
