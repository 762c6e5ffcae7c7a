"""Where a sweep's files live under the data directory, and atomic table I/O.

Layout (all under ``data_dir``)::

    prompts/                       prompt files (tracked in git)
    sweeps/<sweep>/sweep.json      the validated sweep spec
    sweeps/<sweep>/<table>.parquet parameters, images, clip_scores, aesthetic_scores, aes_v2_scores, hps_v2_scores
    images/<sweep>/<image_id>.png  generated images (parameters in a PNG text chunk)
    exports/                       sweep_results.parquet / .csv, reports
    models/<profile>/<model>/      random-weight models built by the project (tiny, random_full)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from flexyface_pipeline.lib.atomic import atomic_write_bytes, atomic_write_with
from flexyface_pipeline.lib.config import SweepSpec, validate_sweep_name

TABLES = ("parameters", "images", "clip_scores", "aesthetic_scores", "aes_v2_scores", "hps_v2_scores")
DERIVED_TABLES = TABLES[1:]  # made from the parameters: stale once the parameters change


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
        data = json.dumps(spec.to_dict(), indent=2, sort_keys=True).encode("utf-8")
        return atomic_write_bytes(self.spec_path(spec.sweep), data)

    def read_spec_dict(self, sweep: str) -> dict | None:
        path = self.spec_path(sweep)
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    # -- tables ------------------------------------------------------------------------------
    def table_path(self, table: str, sweep: str) -> Path:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; known: {list(TABLES)}")
        return self.sweep_dir(sweep) / f"{table}.parquet"

    def write_table(self, table: str, sweep: str, df: pd.DataFrame) -> Path:
        return atomic_write_with(self.table_path(table, sweep), lambda tmp: df.to_parquet(tmp, index=False))

    def drop_tables(self, sweep: str, tables: tuple[str, ...]) -> list[str]:
        """Remove these tables of a sweep; returns the names of those that existed."""
        dropped = []
        for table in tables:
            path = self.table_path(table, sweep)
            if path.exists():
                path.unlink()
                dropped.append(table)
        return dropped

    def has_table(self, table: str, sweep: str) -> bool:
        return self.table_path(table, sweep).is_file()

    def read_table(self, table: str, sweep: str) -> pd.DataFrame:
        path = self.table_path(table, sweep)
        if not path.is_file():
            raise FileNotFoundError(f"sweep {sweep!r} has no {table} table yet ({path}); materialize it first")
        return pd.read_parquet(path)
