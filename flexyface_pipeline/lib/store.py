"""Where a sweep's files live under the data directory, and atomic table I/O.

Layout (all under ``data_dir``)::

    prompts/                       prompt files (tracked in git)
    sweeps/<sweep>/sweep.json      the validated sweep spec
    sweeps/<sweep>/<table>.parquet parameters, images, clip_scores, aesthetic_scores, aes_v2_scores, hps_v2_scores
    sweeps/<sweep>/manifest.json   SHA-256 and row count of each table, recorded when it was written
    images/<sweep>/<image_id>.png  generated images (parameters in a PNG text chunk)
    exports/                       sweep_results.parquet / .csv, reports
    models/<profile>/<model>/      random-weight models built by the project (tiny, random_full)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from flexyface_pipeline.lib.atomic import atomic_write_bytes, atomic_write_with
from flexyface_pipeline.lib.config import SweepSpec, validate_sweep_name

TABLES = ("parameters", "images", "clip_scores", "aesthetic_scores", "aes_v2_scores", "hps_v2_scores")
DERIVED_TABLES = TABLES[1:]  # made from the parameters: stale once the parameters change
MANIFEST = "manifest.json"
# The metric each score table holds: the command that repairs a damaged one re-scores it.
_SCORE_TABLE_METRICS = {"clip_scores": "clip_score", "aesthetic_scores": "aesthetic_score",
                        "aes_v2_scores": "aes_v2_score", "hps_v2_scores": "hps_v2_score"}


class DamagedTableError(OSError):
    """A table that cannot be read, or whose bytes differ from those recorded when it was written.
    The message names the file and the command that makes it again."""


def repair_command(table: str, sweep: str) -> str:
    """The command that writes ``table`` of ``sweep`` again."""
    if table in _SCORE_TABLE_METRICS:
        return f"flexyface rescore {_SCORE_TABLE_METRICS[table]} --sweep {sweep}"
    return f"flexyface sweep {sweep}"  # the stored settings; finished images are verified and kept


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class SweepStore:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir).expanduser().resolve()

    # -- directories -------------------------------------------------------------------------
    @property
    def prompts_dir(self) -> Path:
        return self.root / "prompts"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def sweep_dir(self, sweep: str) -> Path:
        return self._inside(self.root / "sweeps" / validate_sweep_name(sweep))

    def images_dir(self, sweep: str) -> Path:
        return self._inside(self.root / "images" / validate_sweep_name(sweep))

    def image_path(self, sweep: str, image_id: str) -> Path:
        return self._inside(self.images_dir(sweep) / f"{validate_sweep_name(image_id)}.png")

    def relative(self, path: Path) -> str:
        """A path as stored in tables: relative to the data directory, POSIX separators."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def absolute(self, stored: str) -> Path:
        return self._inside(self.root / stored)

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ValueError(f"refusing to use {path}: it lies outside the data directory {self.root}")
        return resolved

    # -- sweep spec --------------------------------------------------------------------------
    def spec_path(self, sweep: str) -> Path:
        return self.sweep_dir(sweep) / "sweep.json"

    def write_spec(self, spec: SweepSpec) -> Path:
        """Write ``sweep.json``, and keep a copy in the manifest from which a damaged definition
        is restored (``flexyface doctor``)."""
        return self.restore_spec(spec.to_dict())

    def restore_spec(self, spec: dict) -> Path:
        sweep = spec["sweep"]
        with self._manifest_lock(sweep):
            path = atomic_write_bytes(self.spec_path(sweep), json.dumps(spec, indent=2, sort_keys=True).encode("utf-8"))
            manifest = self.read_manifest(sweep)
            manifest["spec"] = spec
            self._write_manifest(sweep, manifest)
        return path

    def read_spec_dict(self, sweep: str) -> dict | None:
        path = self.spec_path(sweep)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise DamagedTableError(
                f"{path} is damaged ({type(err).__name__}); repair: flexyface doctor {sweep}") from err
        if not isinstance(data, dict):
            raise DamagedTableError(f"{path} is not a sweep definition; repair: flexyface doctor {sweep}")
        return data

    # -- tables ------------------------------------------------------------------------------
    def table_path(self, table: str, sweep: str) -> Path:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; known: {list(TABLES)}")
        return self.sweep_dir(sweep) / f"{table}.parquet"

    def write_table(self, table: str, sweep: str, df: pd.DataFrame) -> Path:
        """Write the table atomically, then record its checksum and row count in the sweep's
        manifest (also atomically), under a lock so concurrent writers of one sweep keep each
        other's entries."""
        path = self.table_path(table, sweep)
        with self._manifest_lock(sweep):
            atomic_write_with(path, lambda tmp: df.to_parquet(tmp, index=False))
            manifest = self.read_manifest(sweep)
            manifest[table] = {"sha256": _sha256(path), "rows": int(len(df))}
            self._write_manifest(sweep, manifest)
        return path

    def drop_tables(self, sweep: str, tables: tuple[str, ...]) -> list[str]:
        """Remove these tables of a sweep; returns the names of those that existed."""
        dropped = []
        with self._manifest_lock(sweep):
            manifest = self.read_manifest(sweep)
            for table in tables:
                path = self.table_path(table, sweep)
                if path.exists():
                    path.unlink()
                    dropped.append(table)
                manifest.pop(table, None)
            if self.manifest_path(sweep).exists():
                self._write_manifest(sweep, manifest)
        return dropped

    def has_table(self, table: str, sweep: str) -> bool:
        return self.table_path(table, sweep).is_file()

    def read_table(self, table: str, sweep: str) -> pd.DataFrame:
        """The table, after checking it against the checksum recorded when it was written.
        Raises FileNotFoundError when it was never written and DamagedTableError (naming the file
        and the command that repairs it) when it is unreadable or was changed since."""
        path = self.table_path(table, sweep)
        if not path.is_file():
            raise FileNotFoundError(f"sweep {sweep!r} has no {table} table yet ({path}); materialize it first")
        self.verify_table(table, sweep)
        try:
            return pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DamagedTableError(
                f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                f"repair: {repair_command(table, sweep)}"
            ) from err

    def verify_table(self, table: str, sweep: str) -> None:
        """Raise DamagedTableError if the table's bytes differ from the recorded checksum."""
        path = self.table_path(table, sweep)
        recorded = self.read_manifest(sweep).get(table)
        if recorded and _sha256(path) != recorded.get("sha256"):
            raise DamagedTableError(
                f"{path} is damaged: its SHA-256 differs from the one recorded when it was written; "
                f"repair: {repair_command(table, sweep)}"
            )

    # -- manifest ----------------------------------------------------------------------------
    def manifest_path(self, sweep: str) -> Path:
        return self.sweep_dir(sweep) / MANIFEST

    def read_manifest(self, sweep: str) -> dict:
        """Recorded checksums by table; empty when none were recorded (tables written before the
        manifest existed are read unchecked) or the manifest itself is unreadable."""
        path = self.manifest_path(sweep)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_manifest(self, sweep: str, manifest: dict) -> None:
        atomic_write_bytes(self.manifest_path(sweep), json.dumps(manifest, indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def _manifest_lock(self, sweep: str) -> Iterator[None]:
        directory = self.sweep_dir(sweep)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".manifest.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
