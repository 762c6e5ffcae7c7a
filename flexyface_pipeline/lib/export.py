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
IDENTITY_COLUMNS = ["sweep", "image_id", "prompt", "engine", "width", "height", "image_path"]
# Score table name and provenance prefix for each metric.
SCORE_TABLES = {
    "clip_score": ("clip_scores", "clip"),
    "aesthetic_score": ("aesthetic_scores", "aesthetic_v1"),
    "aes_v2_score": ("aes_v2_scores", "aesthetic_v2"),
    "hps_v2_score": ("hps_v2_scores", "hps_v2"),
}
PROVENANCE_COLUMNS = [
    "engine_model",
    "engine_model_revision",
    "batch_size",
    *[c for _, (_, p) in SCORE_TABLES.items() for c in (f"{p}_model", f"{p}_model_revision")],
]
EXPORT_COLUMNS = SEED_COLUMNS + IDENTITY_COLUMNS + PROVENANCE_COLUMNS
_TEXT_COLUMNS = ["sweep", "image_id", "prompt", "engine", "image_path",
                 *[c for c in PROVENANCE_COLUMNS if c != "batch_size"]]


def merge_tables(
    parameters: pd.DataFrame, images: pd.DataFrame, scores: dict[str, pd.DataFrame]
) -> pd.DataFrame:
    """Rows of one or many sweeps: parameters ⋈ images ⋈ each score table (left joins on image_id).

    Metrics without a table yet come out as missing values. Concatenate many sweeps' tables first
    and merge once: one join over a million rows is far cheaper than thousands of small ones.
    """
    df = parameters.merge(images, on="image_id", how="left", validate="one_to_one")
    for metric, (_, prefix) in SCORE_TABLES.items():
        cols = [metric, f"{prefix}_model", f"{prefix}_model_revision"]
        table = scores.get(metric)
        if table is None:
            for c in cols:
                df[c] = pd.NA
            continue
        df = df.merge(table[["image_id", *cols]], on="image_id", how="left", validate="one_to_one")
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
    for column in _TEXT_COLUMNS:
        df[column] = df[column].astype("str")
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
