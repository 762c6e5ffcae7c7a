"""Merge a sweep's tables into result rows and write the Parquet/CSV export."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from flexyface_pipeline.lib.atomic import atomic_write_with
from flexyface_pipeline.lib.config import METRICS

# The seed's CSV columns, first and in this order.
SEED_COLUMNS = ["steps", "guidance", *METRICS, "elapsed_ms", "seed"]
# ``scheduler``: the sampler a sweep chose (empty: the model's own); sweeps without a scheduler axis have none.
IDENTITY_COLUMNS = ["sweep", "image_id", "prompt", "engine", "scheduler", "width", "height", "image_path"]
# Score table name and provenance prefix for each metric.
SCORE_TABLES = {
    "clip_score": ("clip_scores", "clip"),
    "aesthetic_score": ("aesthetic_scores", "aesthetic_v1"),
    "aes_v2_score": ("aes_v2_scores", "aesthetic_v2"),
    "hps_v2_score": ("hps_v2_scores", "hps_v2"),
}
# Where and in which precision each metric ran: <prefix>_device ("cpu", "cuda", "cuda:1"),
# <prefix>_dtype (the towers' compute dtype: float32, bfloat16, float16), <prefix>_tf32.
RUNTIME_FIELDS = ("device", "dtype", "tf32")
# Per-row flags a metric records: CLIP prompts longer than its 77-token context.
ROW_FLAGS = {"clip_score": ["clip_prompt_truncated"]}
PROVENANCE_COLUMNS = [
    "engine_model",
    "engine_model_revision",
    "batch_size",
    *[c for _, (_, p) in SCORE_TABLES.items() for c in (f"{p}_model", f"{p}_model_revision")],
    *[f"{p}_{field}" for _, (_, p) in SCORE_TABLES.items() for field in RUNTIME_FIELDS],
    *[c for flags in ROW_FLAGS.values() for c in flags],
]
EXPORT_COLUMNS = SEED_COLUMNS + IDENTITY_COLUMNS + PROVENANCE_COLUMNS
_BOOL_COLUMNS = [c for c in PROVENANCE_COLUMNS if c.endswith("_tf32")] + [c for f in ROW_FLAGS.values() for c in f]
_TEXT_COLUMNS = ["sweep", "image_id", "prompt", "engine", "image_path",
                 *[c for c in PROVENANCE_COLUMNS if c != "batch_size" and c not in _BOOL_COLUMNS]]


def score_columns(metric: str) -> list[str]:
    """A score table's columns after ``image_id``: the metric, then its provenance columns."""
    prefix = SCORE_TABLES[metric][1]
    return [metric, f"{prefix}_model", f"{prefix}_model_revision",
            *[f"{prefix}_{field}" for field in RUNTIME_FIELDS], *ROW_FLAGS.get(metric, [])]


def merge_tables(
    parameters: pd.DataFrame, images: pd.DataFrame, scores: dict[str, pd.DataFrame]
) -> pd.DataFrame:
    """Rows of one or many sweeps: parameters ⋈ images ⋈ each score table (left joins on image_id).

    Metrics without a table yet come out as missing values, and so do provenance columns a table
    lacks (tables scored before the column existed). Concatenate many sweeps' tables first
    and merge once: one join over a million rows is far cheaper than thousands of small ones.
    """
    df = parameters.merge(images, on="image_id", how="left", validate="one_to_one")
    for metric in SCORE_TABLES:
        cols = score_columns(metric)
        table = scores.get(metric)
        present = [c for c in cols if table is not None and c in table.columns]
        if present:
            df = df.merge(table[["image_id", *present]], on="image_id", how="left", validate="one_to_one")
        for c in cols:
            if c not in present:
                df[c] = pd.NA
    return df


def finalize(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate sweeps, keep rows with all four scores, order columns and rows like the seed's CSV."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in EXPORT_COLUMNS})
    df = pd.concat(frames, ignore_index=True)
    df = df.dropna(subset=list(METRICS))
    for metric in METRICS:
        df[metric] = df[metric].astype("float64")
    df["elapsed_ms"] = df["elapsed_ms"].astype("float64")
    # NaN where the engine takes no guidance: written as an empty (null) cell, never a number.
    df["guidance"] = pd.to_numeric(df["guidance"], errors="coerce").astype("float64")
    scheduler = df["scheduler"] if "scheduler" in df else pd.Series(None, index=df.index, dtype="object")
    df["scheduler"] = scheduler.astype("object").where(scheduler.notna() & (scheduler.astype("str") != ""), None)
    for column in _TEXT_COLUMNS:
        df[column] = df[column].astype("str")
    for column in _BOOL_COLUMNS:
        df[column] = df[column].astype("boolean")
    df = df.sort_values(["steps", "guidance", "sweep", "image_id"], kind="mergesort", ignore_index=True)
    return df[EXPORT_COLUMNS]


def _write_csv(table: pa.Table, path: Path) -> None:
    """CSV with a plain header line and values quoted only where needed (as pandas writes it)."""
    with open(path, "wb") as f:
        f.write((",".join(table.column_names) + "\n").encode("utf-8"))
        pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, quoting_style="needed"))


def write_export(df: pd.DataFrame, exports_dir: Path, stem: str = "sweep_results") -> tuple[Path, Path]:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically."""
    exports_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    parquet = atomic_write_with(exports_dir / f"{stem}.parquet", lambda tmp: pq.write_table(table, tmp))
    csv = atomic_write_with(exports_dir / f"{stem}.csv", lambda tmp: _write_csv(table, tmp))
    return parquet, csv
