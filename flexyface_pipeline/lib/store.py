"""Where a sweep's files live under the data directory, and atomic table I/O.

Layout (all under ``data_dir``)::

    prompts/                       prompt files (tracked in git)
    sweeps/<sweep>/sweep.json      the validated sweep spec
    sweeps/<sweep>/<table>.parquet parameters, images, clip_scores, aesthetic_scores, aes_v2_scores, hps_v2_scores
    sweeps/<sweep>/manifest.json   SHA-256 and row count of each table, recorded when it was written
    sweeps/.locks/<sweep>.lock     the claim of the command that runs the sweep (``SweepStore.claim``)
    images/<sweep>/<image_id>.png  generated images (parameters in a PNG text chunk)
    exports/                       sweep_results.parquet / .csv, reports
    models/<profile>/<model>/      random-weight models built by the project (tiny, random_full)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


class SweepBusyError(RuntimeError):
    """Another process holds the sweep's claim (``SweepStore.claim``). The one-line message names the
    sweep, the holder (pid, host, what it runs, since when) and what to do."""

    def __init__(self, sweep: str, holder: dict | None, again: str = "run the command again"):
        self.sweep, self.holder = sweep, holder
        super().__init__(f"sweep {sweep!r} is busy: another command is running it ({describe_holder(holder)}); "
                         f"wait for it to finish, then {again}: finished images are kept")


def describe_holder(holder: dict | None) -> str:
    """``pid 123 on host h: flexyface sweep s ..., since 2024-01-01 12:00:00`` (one line)."""
    if not holder:
        return "a process that has not said what it runs yet"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    command = " ".join(str(holder.get("command", "")).split())
    if command:
        text += f": {command[:200]}{'...' if len(command) > 200 else ''}"
    if holder.get("since"):
        text += f", since {holder['since']}"
    return text


@dataclass
class _Claim:
    fd: int
    path: Path
    depth: int = 1
    discard: bool = False  # remove the lock file on release (the sweep is gone)


# Claims this process holds, by lock file. A flock belongs to an open file description, so a second
# open and flock of the same file in this process would find it taken: a nested claim reuses the first.
_HELD: dict[Path, _Claim] = {}
_HELD_LOCK = threading.Lock()
# How long a refused claimant waits for the holder to record who it is (it does so right after locking).
_HOLDER_WAIT_S = 1.0


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

    # -- claims ------------------------------------------------------------------------------
    def claim_path(self, sweep: str) -> Path:
        return self._inside(self.root / "sweeps" / ".locks" / f"{validate_sweep_name(sweep)}.lock")

    @contextlib.contextmanager
    def claim(self, sweep: str, command: str | None = None) -> Iterator[_Claim]:
        """Hold the sweep for one command: an exclusive, non-blocking ``flock`` on
        ``sweeps/.locks/<sweep>.lock``, which then records the holder (pid, host, ``command`` —
        default: this process's command line — and since when). Raises SweepBusyError at once when
        another process holds it. A claim this process already holds is reentered, not taken again.
        The kernel frees the lock when the holder exits, however it ends; a clean release empties the
        file, and ``discard`` on the yielded claim removes it (for a sweep that is deleted)."""
        path = self.claim_path(sweep)
        with _HELD_LOCK:
            held = _HELD.get(path)
            if held is not None:
                held.depth += 1
        if held is None:
            held = self._acquire(sweep, path, command)
        try:
            yield held
        finally:
            with _HELD_LOCK:
                held.depth -= 1
                last = held.depth == 0
                if last:
                    del _HELD[path]
            if last:
                _release(held)

    def claim_holder(self, sweep: str) -> dict | None:
        """Who holds the sweep's claim in another process (what ``claim`` records; an empty dict when
        the holder has not recorded itself), or None when it is free or held by this process. Only
        tests the lock: takes it for an instant at most and creates nothing."""
        path = self.claim_path(sweep)
        with _HELD_LOCK:
            if path in _HELD:
                return None
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            deadline = time.monotonic() + _HOLDER_WAIT_S
            while True:
                if _try_lock(fd):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return None
                holder = _read_holder(fd)
                if holder is not None or time.monotonic() >= deadline:
                    return holder or {}
                time.sleep(0.05)
        finally:
            os.close(fd)

    def _acquire(self, sweep: str, path: Path, command: str | None) -> _Claim:
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _HOLDER_WAIT_S
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # never truncated before it is locked
            try:
                locked = _try_lock(fd)
                if locked and _same_file(fd, path):
                    break
                if not locked:
                    holder = _read_holder(fd)
                    if holder is not None or time.monotonic() >= deadline:
                        raise SweepBusyError(sweep, holder)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not locked:  # the holder has locked the file but not yet said who it is
                time.sleep(0.05)
            # else a release removed the file meanwhile: lock the one now at the path
        claim = _Claim(fd, path)
        try:
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            # Written in place, not replaced: the lock belongs to this file.
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        except BaseException:
            _release(claim)
            raise
        with _HELD_LOCK:
            _HELD[path] = claim
        return claim


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at ``path`` (not one removed meanwhile)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def _read_holder(fd: int) -> dict | None:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _release(claim: _Claim) -> None:
    try:
        if claim.discard:
            claim.path.unlink(missing_ok=True)  # still locked: a claimant that opened it retries
        else:
            os.ftruncate(claim.fd, 0)
    finally:
        os.close(claim.fd)  # frees the lock
