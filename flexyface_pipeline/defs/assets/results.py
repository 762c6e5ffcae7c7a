"""``sweep_results``: every sweep's rows with all four scores, as Parquet and CSV."""


import dagster as dg
import pandas as pd
from pydantic import Field

from flexyface_pipeline.lib.config import SweepConfigError, validate_sweep_name
from flexyface_pipeline.lib.export import SCORE_TABLES, export_lock, finalize, merge_tables, write_export
from flexyface_pipeline.lib.store import DamagedTableError
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import generated_images, sweep_parameters
from flexyface_pipeline.defs.partitions import sweeps_partitions
from flexyface_pipeline.defs.resources import StorageResource


# The export and what is computed from it are in the pool "export" (limit 1: the instance's
# `concurrency.pools.default_limit`), so overlapping export runs (the export_after_sweep sensor,
# `flexyface export`, the UI) take turns: each step reads the sweeps as they are when it starts, and
# no older export can be written after a newer one.
EXPORT_POOL = "export"


class ExportConfig(dg.Config):
    """How the export treats a sweep whose tables are damaged."""

    strict: bool = Field(default=False, description="Fail the step when a sweep is damaged (the export of the "
                         "healthy sweeps is still written); by default damaged sweeps are named and left out.")


class DamagedSweepsError(Exception):
    """Strict export: at least one sweep's tables are damaged."""


@dg.asset(
    deps=[sweep_parameters, generated_images, *score_assets],
    group_name="results",
    kinds={"pandas", "parquet", "csv"},
    pool=EXPORT_POOL,
    description="All sweeps merged: the seed's columns first (steps, guidance, four scores, elapsed_ms, seed), "
    "then identity and provenance; only fully scored rows, ordered by steps then guidance. "
    "Written to data/exports/sweep_results.parquet and .csv.",
)
def sweep_results(context: dg.AssetExecutionContext, config: ExportConfig, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    # From the first table read to the files written, under the export lock: a sweep redefined
    # meanwhile (sweep_parameters) removes its rows and drops its tables before or after, never between.
    with export_lock(store.exports_dir, on_wait=lambda: context.log.info(
            "waiting for a sweep's redefinition to finish removing its rows from the export")):
        parameters, images, incomplete, damaged = [], [], {}, {}
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
            try:  # one damaged sweep is named and left out; the healthy ones are exported
                tables = {name: store.read_table(name, sweep)
                          for name in ("parameters", "images", *(t for t, _ in SCORE_TABLES.values()))}
            except DamagedTableError as err:
                damaged[sweep] = str(err)
                continue
            parameters.append(tables["parameters"])
            images.append(tables["images"])
            for metric, (table, _) in SCORE_TABLES.items():
                scores[metric].append(tables[table])
        if parameters:
            merged = [merge_tables(pd.concat(parameters, ignore_index=True), pd.concat(images, ignore_index=True),
                                   {m: pd.concat(t, ignore_index=True) for m, t in scores.items()})]
        else:
            merged = []
        df = finalize(merged)
        parquet, csv = write_export(df, store.exports_dir)
    for sweep, why in incomplete.items():
        context.log.warning("sweep %s is not complete (%s): its unscored rows are left out", sweep, why)
    for sweep, why in damaged.items():
        context.log.error("sweep %s is left out of the export: %s", sweep, why)
    if damaged and config.strict:
        raise DamagedSweepsError(
            f"{len(damaged)} damaged sweep(s) ({', '.join(sorted(damaged))}); the export was written without them: "
            + "; ".join(damaged[s] for s in sorted(damaged)))
    context.log.info("exported %d rows to %s and %s", len(df), parquet, csv)
    return dg.MaterializeResult(
        metadata={
            "num_rows": dg.MetadataValue.int(len(df)),
            "dagster/row_count": dg.MetadataValue.int(len(df)),
            "sweeps": dg.MetadataValue.text(", ".join(sorted(df["sweep"].unique())) if len(df) else ""),
            "incomplete_sweeps": dg.MetadataValue.json(incomplete),
            "damaged_sweeps": dg.MetadataValue.json(damaged),
            "parquet": dg.MetadataValue.path(str(parquet)),
            "csv": dg.MetadataValue.path(str(csv)),
            "dagster/column_schema": dg.MetadataValue.table_schema(export_schema(df)),
            "preview": export_preview(df),
        }
    )


_PREFIX_TITLES = {prefix: metric for metric, (_, prefix) in SCORE_TABLES.items()} | {"engine": "the generation engine"}
COLUMN_DESCRIPTIONS = {
    "steps": "Inference steps.",
    "guidance": "Classifier-free guidance scale.",
    "clip_score": "CLIP ViT-L/14 cosine similarity of image and prompt, clipped at 0 (0–1).",
    "aesthetic_score": "LAION aesthetic predictor v1 (about 1–10).",
    "aes_v2_score": "Aesthetics predictor v2, sac+logos+ava1 linear MSE head (about 1–10).",
    "hps_v2_score": "Human Preference Score v2.1; compare only images of the same prompt.",
    "elapsed_ms": "Wall time of the diffusers call that made the image's batch, divided by the batch size.",
    "seed": "Seed of the image's generator.",
    "sweep": "Sweep name (the partition).",
    "image_id": "Image id, unique within its sweep.",
    "prompt": "Prompt text.",
    "engine": "Generation engine.",
    "width": "Image width in pixels.",
    "height": "Image height in pixels.",
    "image_path": "PNG path relative to the data directory.",
    "batch_size": "Images generated together with this one.",
    "scheduler": "Scheduler (sampler) the image was generated with; empty: the model's own.",
}
PREVIEW_COLUMNS = ["sweep", "image_id", "steps", "guidance", *SCORE_TABLES, "elapsed_ms", "prompt"]


def _column_description(name: str) -> str:
    if name in COLUMN_DESCRIPTIONS:
        return COLUMN_DESCRIPTIONS[name]
    prefix = next((p for p in sorted(_PREFIX_TITLES, key=len, reverse=True) if name.startswith(p + "_")), None)
    if prefix is not None:
        return f"Provenance of {_PREFIX_TITLES[prefix]}: {name[len(prefix) + 1:].replace('_', ' ')}."
    return "Provenance."


def _column_type(dtype) -> str:
    kind = getattr(dtype, "kind", "O")
    return {"i": "int", "u": "int", "f": "float", "b": "bool"}.get(kind, "string")


def export_schema(df: pd.DataFrame) -> dg.TableSchema:
    """The export's columns with their types and meaning (the asset page's *Columns* section)."""
    return dg.TableSchema(columns=[dg.TableColumn(name=str(c), type=_column_type(df[c].dtype),
                                                  description=_column_description(str(c))) for c in df.columns])


def export_preview(df: pd.DataFrame, rows: int = 10) -> dg.TableMetadataValue:
    """The first rows of the export (key columns), shown inline on the asset page."""
    columns = [c for c in PREVIEW_COLUMNS if c in df.columns]
    head = df[columns].head(rows)
    schema = dg.TableSchema(columns=[dg.TableColumn(c, _column_type(head[c].dtype)) for c in columns])

    def value(v):
        if hasattr(v, "item"):  # a numpy scalar
            v = v.item()
        if v is None or (not isinstance(v, str) and pd.isna(v)):
            return None
        if isinstance(v, float):
            return round(v, 4)
        return v if isinstance(v, bool | int) else str(v)

    records = [dg.TableRecord({c: value(v) for c, v in zip(columns, row)}) for row in head.itertuples(index=False)]
    return dg.MetadataValue.table(records, schema=schema)
