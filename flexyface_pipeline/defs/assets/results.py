"""``sweep_results``: every sweep's rows with all four scores, as Parquet and CSV."""

from __future__ import annotations

import dagster as dg

from flexyface_pipeline.lib.export import SCORE_TABLES, finalize, merge_sweep, write_export
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import generated_images, sweep_parameters
from flexyface_pipeline.defs.partitions import sweeps_partitions
from flexyface_pipeline.defs.resources import StorageResource


@dg.asset(
    deps=[sweep_parameters, generated_images, *score_assets],
    group_name="results",
    kinds={"pandas", "parquet", "csv"},
    description="All sweeps merged: the seed's columns first (steps, guidance, four scores, elapsed_ms, seed), "
    "then identity and provenance; only fully scored rows, ordered by steps then guidance. "
    "Written to data/exports/sweep_results.parquet and .csv.",
)
def sweep_results(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    frames, incomplete = [], {}
    for sweep in sorted(context.instance.get_dynamic_partitions(sweeps_partitions.name)):
        if not store.has_table("parameters", sweep) or not store.has_table("images", sweep):
            incomplete[sweep] = "not generated"
            continue
        scores = {
            metric: store.read_table(table, sweep)
            for metric, (table, _) in SCORE_TABLES.items()
            if store.has_table(table, sweep)
        }
        missing = [m for m in SCORE_TABLES if m not in scores]
        if missing:
            incomplete[sweep] = "missing " + ", ".join(missing)
        frames.append(merge_sweep(store.read_table("parameters", sweep), store.read_table("images", sweep), scores))
    df = finalize(frames)
    parquet, csv = write_export(df, store.exports_dir)
    for sweep, why in incomplete.items():
        context.log.warning("sweep %s is not complete (%s): its unscored rows are left out", sweep, why)
    context.log.info("exported %d rows to %s and %s", len(df), parquet, csv)
    return dg.MaterializeResult(
        metadata={
            "num_rows": dg.MetadataValue.int(len(df)),
            "sweeps": dg.MetadataValue.text(", ".join(sorted(df["sweep"].unique())) if len(df) else ""),
            "incomplete_sweeps": dg.MetadataValue.json(incomplete),
            "parquet": dg.MetadataValue.path(str(parquet)),
            "csv": dg.MetadataValue.path(str(csv)),
        }
    )
