"""Merge a sweep's tables into result rows and write the Parquet/CSV export; remove a sweep's
rows from it when the sweep is redefined."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from flexyface_pipeline.lib.atomic import atomic_write_bytes, atomic_write_with
from flexyface_pipeline.lib.config import METRICS, validate_sweep_name

EXPORT_STEM = "sweep_results"
GRIDS_DIR = "grids"  # exports/grids/<sweep>/: the sweep's contact sheets
# Beside the exports directory (taking it creates nothing under exports/).
EXPORT_LOCK_NAME = ".exports.lock"

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


def write_export(df: pd.DataFrame, exports_dir: Path, stem: str = EXPORT_STEM) -> tuple[Path, Path]:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` atomically."""
    exports_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    parquet = atomic_write_with(exports_dir / f"{stem}.parquet", lambda tmp: pq.write_table(table, tmp))
    csv = atomic_write_with(exports_dir / f"{stem}.csv", lambda tmp: _write_csv(table, tmp))
    return parquet, csv


class DamagedExportError(OSError):
    """An export file that cannot be read, so a sweep's rows cannot be removed from it. The message
    names the file and the fix."""


@contextlib.contextmanager
def export_lock(exports_dir: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the export for one writer: the step that merges every sweep into the export (from
    reading the tables to writing the files) and the step that redefines a sweep (removing its rows
    and dropping its tables) take turns, so no export can be written from a sweep's superseded
    tables after its rows were removed. An exclusive ``flock`` on ``<data>/.exports.lock``;
    ``on_wait`` is called once if another process holds it."""
    path = Path(exports_dir).parent / EXPORT_LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class DroppedExports:
    """What :func:`drop_sweep_exports` removed."""

    parquet_rows: int = 0  # rows of the sweep removed from <stem>.parquet
    csv_rows: int = 0  # and from <stem>.csv (the same rows, unless one of the files is older)
    rewritten: list[Path] = field(default_factory=list)  # export files written again without them
    sheets: list[Path] = field(default_factory=list)  # contact sheets removed

    @property
    def rows(self) -> int:
        return max(self.parquet_rows, self.csv_rows)


def _damaged(path: Path, sweep: str, err: Exception) -> DamagedExportError:
    why = " ".join(str(err).split())[:160]
    return DamagedExportError(
        f"{path} cannot be read ({type(err).__name__}: {why}), so the rows of sweep {sweep} it may hold cannot "
        f"be removed: delete it (`flexyface export` writes it again), then run again")


def _parquet_without(path: Path, sweep: str) -> tuple[int, pa.Table]:
    """The Parquet export without the sweep's rows, and how many it had; the other rows, their
    order and the file's schema (with its pandas metadata) are kept."""
    try:
        table = pq.read_table(path)
        column = table.column("sweep")
    except Exception as err:  # pyarrow raises several types for a damaged file; KeyError without the column
        raise _damaged(path, sweep, err) from err
    keep = pc.invert(pc.fill_null(pc.equal(column, pa.scalar(sweep, column.type)), False))
    kept = table.filter(keep)
    return len(table) - len(kept), kept


def _csv_without(path: Path, sweep: str) -> tuple[int, bytes]:
    """The CSV export without the sweep's records, and how many it had; every other byte is kept
    (the records are copied as they are, not formatted again)."""
    try:
        text = path.read_bytes().decode("utf-8")
        pieces = text.split("\n")
        lines = [piece + "\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
        reader = csv.reader(lines)
        header = next(reader)
        index = header.index("sweep")
        kept, start, dropped = lines[:reader.line_num], reader.line_num, 0
        for record in reader:
            end = reader.line_num
            if len(record) > index and record[index] == sweep:
                dropped += 1
            else:
                kept += lines[start:end]
            start = end
    except (OSError, UnicodeDecodeError, csv.Error, StopIteration, ValueError) as err:
        raise _damaged(path, sweep, err) from err
    return dropped, "".join(kept).encode("utf-8")


def drop_sweep_exports(exports_dir: Path, sweep: str, stem: str = EXPORT_STEM) -> DroppedExports:
    """Remove what the exports hold of ``sweep``'s rows, for a sweep whose rows are superseded (it
    was redefined): its rows of ``<stem>.parquet`` and ``<stem>.csv`` (each written again
    atomically, and only if it holds any) and its contact sheets (``grids/<sweep>/``). The other
    sweeps' rows stay as they were. Missing files are nothing to do; nothing is created.

    The analysis report (``sweep_report.html``, ``recommendations.json``) covers every sweep
    together and is not edited: it describes the export as it was when it was last analysed, until
    the next analysis (``sweep_analysis``, which follows every export). Take :func:`export_lock`
    around this and the dropping of the sweep's tables. Raises :class:`DamagedExportError`, before
    anything is changed, when an export file cannot be read.
    """
    validate_sweep_name(sweep)
    exports_dir = Path(exports_dir)
    parquet, csv_path = exports_dir / f"{stem}.parquet", exports_dir / f"{stem}.csv"
    for path in (parquet, csv_path):
        if path.exists() and not path.is_file():
            raise _damaged(path, sweep, IsADirectoryError("not a regular file"))
    # Both files are read before either is written: a damaged one changes nothing.
    parquet_rows, parquet_kept = _parquet_without(parquet, sweep) if parquet.is_file() else (0, None)
    csv_rows, csv_kept = _csv_without(csv_path, sweep) if csv_path.is_file() else (0, b"")
    rewritten = []
    if parquet_rows:
        rewritten.append(atomic_write_with(parquet, lambda tmp: pq.write_table(parquet_kept, tmp)))
    if csv_rows:
        rewritten.append(atomic_write_bytes(csv_path, csv_kept))
    grids = exports_dir / GRIDS_DIR / sweep
    sheets = sorted(grids.glob("*.png")) if grids.is_dir() else []
    if grids.is_dir():
        shutil.rmtree(grids)
    return DroppedExports(parquet_rows=parquet_rows, csv_rows=csv_rows, rewritten=rewritten, sheets=sheets)
