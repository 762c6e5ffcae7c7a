"""``sweep_analysis`` (which settings are worth it) and ``image_grid`` (steps × guidance sheets)."""

import base64
import io
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from flexyface_pipeline.lib.config import METRICS, validate_metrics
from flexyface_pipeline.lib.export import SCORE_TABLES, merge_tables
from flexyface_pipeline.defs.assets.results import EXPORT_POOL, sweep_results
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import generated_images
from flexyface_pipeline.defs.partitions import sweeps_partitions
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
    from flexyface_pipeline.lib.analysis import analysis_markdown, analyze, key_numbers, write_report

    metrics = validate_metrics(config.metrics)
    store = storage.store()
    export = pd.read_parquet(store.exports_dir / "sweep_results.parquet")
    if export.empty:
        return _nothing_to_analyse(context, store.exports_dir, "the export has no rows (no sweep is fully scored yet)")
    df = select_rows(export, config)  # never empty: a sweep or engine the rows lack is refused
    analysis = analyze(df, metrics=metrics, bootstrap=config.bootstrap, seed=config.seed)
    report, recommendations = write_report(analysis, df, store.exports_dir)
    for note in getattr(analysis, "notes", []) or []:
        context.log.info(note)
    numbers = {k: v for k, v in key_numbers(analysis).items()}
    metadata: dict = {
        "num_rows": dg.MetadataValue.int(len(df)),
        "report": dg.MetadataValue.path(str(report)),
        "recommendations": dg.MetadataValue.path(str(recommendations)),
        "summary": dg.MetadataValue.md(analysis_markdown(analysis)),
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


def _png_markdown(path, width: int = 900) -> str:
    """A markdown image of ``path`` scaled to at most ``width`` pixels wide, inlined as a data
    URL (the UI renders markdown images, not raw HTML; the scaling keeps the event log small)."""
    import io

    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, max(1, round(image.height * width / image.width))), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"![{path.stem}](data:image/png;base64,{data})"


@dg.asset(
    partitions_def=sweeps_partitions,
    deps=[generated_images, *score_assets],
    group_name="results",
    kinds={"png"},
    backfill_policy=dg.BackfillPolicy.single_run(),
    description="Steps × guidance contact sheets per prompt (one representative image per cell, labelled with its "
    "settings and scores), under data/exports/grids/<sweep>/.",
)
def image_grid(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    from flexyface_pipeline.lib.grid import write_grids

    store = storage.store()
    written = []
    for sweep in context.partition_keys:
        scores = {m: store.read_table(t, sweep) for m, (t, _) in SCORE_TABLES.items() if store.has_table(t, sweep)}
        rows = merge_tables(store.read_table("parameters", sweep), store.read_table("images", sweep), scores)
        rows["image_path"] = [str(store.absolute(p)) for p in rows["image_path"]]
        out_dir = store.exports_dir / "grids" / sweep
        for old in out_dir.glob("*.png"):
            old.unlink()
        written += write_grids(rows, out_dir)
    preview = "\n\n".join(_png_markdown(p) for p in written[:2])
    return dg.MaterializeResult(
        metadata={
            "sheets": dg.MetadataValue.int(len(written)),
            "directory": dg.MetadataValue.path(str(store.exports_dir / "grids")),
            "preview": dg.MetadataValue.md(preview or "no sheet"),
        }
    )
