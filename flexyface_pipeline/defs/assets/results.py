"""``sweep_results``: every sweep's rows with all four scores, as Parquet and CSV."""


import dagster as dg

import pandas as pd

from flexyface_pipeline.lib.config import SweepConfigError, validate_sweep_name
from flexyface_pipeline.lib.export import SCORE_TABLES, finalize, merge_tables, write_export
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import generated_images, sweep_parameters
from flexyface_pipeline.defs.partitions import sweeps_partitions
from flexyface_pipeline.defs.resources import StorageResource


# The export and what is computed from it are in the pool "export" (limit 1: the instance's
# `concurrency.pools.default_limit`), so overlapping export runs (the export_after_sweep sensor,
# `flexyface export`, the UI) take turns: each step reads the sweeps as they are when it starts, and
# no older export can be written after a newer one.
EXPORT_POOL = "export"


@dg.asset(
    deps=[sweep_parameters, generated_images, *score_assets],
    group_name="results",
    kinds={"pandas", "parquet", "csv"},
    pool=EXPORT_POOL,
    description="All sweeps merged: the seed's columns first (steps, guidance, four scores, elapsed_ms, seed), "
    "then identity and provenance; only fully scored rows, ordered by steps then guidance. "
    "Written to data/exports/sweep_results.parquet and .csv.",
)
def sweep_results(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    parameters, images, incomplete = [], [], {}
    scores: dict[str, list[pd.DataFrame]] = {metric: [] for metric in SCORE_TABLES}
    for sweep in sorted(context.instance.get_dynamic_partitions(sweeps_partitions.name)):
        try:
            validate_sweep_name(sweep)
        except SweepConfigError as err:  # a partition added by hand with a name no sweep can have
            incomplete[sweep] = f"invalid sweep name: {err}"
            continue
        if not store.has_table("parameters", sweep) or not store.has_table("images", sweep):
            incomplete[sweep] = "not generated"
            continue
        missing = [m for m, (table, _) in SCORE_TABLES.items() if not store.has_table(table, sweep)]
        if missing:
            incomplete[sweep] = "missing " + ", ".join(missing)
            continue  # rows without all four scores are not exported
        parameters.append(store.read_table("parameters", sweep))
        images.append(store.read_table("images", sweep))
        for metric, (table, _) in SCORE_TABLES.items():
            scores[metric].append(store.read_table(table, sweep))
    if parameters:
        merged = [merge_tables(pd.concat(parameters, ignore_index=True), pd.concat(images, ignore_index=True),
                               {m: pd.concat(t, ignore_index=True) for m, t in scores.items()})]
    else:
        merged = []
    df = finalize(merged)
    parquet, csv = write_export(df, store.exports_dir)
    for sweep, why in incomplete.items():
        context.log.warning("sweep %s is not complete (%s): its unscored rows are left out", sweep, why)
    context.log.info("exported %d rows to %s and %s", len(df), parquet, csv)
    return dg.MaterializeResult(
        metadata={
            "num_rows": dg.MetadataValue.int(len(df)),
            "dagster/row_count": dg.MetadataValue.int(len(df)),
            "sweeps": dg.MetadataValue.text(", ".join(sorted(df["sweep"].unique())) if len(df) else ""),
            "incomplete_sweeps": dg.MetadataValue.json(incomplete),
            "parquet": dg.MetadataValue.path(str(parquet)),
            "csv": dg.MetadataValue.path(str(csv)),
        }
    )
