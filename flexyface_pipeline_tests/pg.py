"""PostgreSQL helpers for tests: a throwaway database and Dagster instances on it.

The server comes from the same variables as ``deploy/dagster-postgres.yaml``
(``FLEXYFACE_PG_HOST``/``PORT``/``USER``/``PASSWORD``, default ``postgres@127.0.0.1:5432`` with
no password); the database is always a fresh one that is dropped afterwards.

Typical use::

    settings = require_postgres()
    with postgres_dagster_home(tmp_path / "home", settings) as home:
        with open_instance(home) as instance:
            ...
        with open_instance(home) as reopened:  # a new instance object on the same storage
            ...
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
from psycopg2 import sql

REPO = Path(__file__).resolve().parents[1]
POSTGRES_INSTANCE_YAML = REPO / "deploy" / "dagster-postgres.yaml"


@dataclass(frozen=True)
class PgSettings:
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"
    password: str = ""

    @classmethod
    def from_env(cls) -> PgSettings:
        defaults = cls()
        return cls(
            host=os.environ.get("FLEXYFACE_PG_HOST", defaults.host),
            port=int(os.environ.get("FLEXYFACE_PG_PORT", defaults.port)),
            user=os.environ.get("FLEXYFACE_PG_USER", defaults.user),
            password=os.environ.get("FLEXYFACE_PG_PASSWORD", defaults.password),
        )

    def connect(self, dbname: str = "postgres"):
        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, password=self.password,
            dbname=dbname, connect_timeout=3,
        )

    def instance_env(self, dbname: str) -> dict[str, str]:
        """The variables ``deploy/dagster-postgres.yaml`` reads, pointing at ``dbname``."""
        return {
            "FLEXYFACE_PG_HOST": self.host,
            "FLEXYFACE_PG_PORT": str(self.port),
            "FLEXYFACE_PG_USER": self.user,
            "FLEXYFACE_PG_PASSWORD": self.password,
            "FLEXYFACE_PG_DB": dbname,
        }


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_postgres(settings: PgSettings | None = None) -> PgSettings:
    """Return the server settings, or skip the test when the server is unreachable.

    On CI (``CI=true``) an unreachable server fails the test instead: CI provides one.
    """
    settings = settings or PgSettings.from_env()
    try:
        settings.connect().close()
    except psycopg2.OperationalError as exc:
        message = f"PostgreSQL at {settings.host}:{settings.port} is unreachable: {exc}".strip()
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return settings


@contextlib.contextmanager
def temporary_database(settings: PgSettings, prefix: str = "flexyface_test") -> Iterator[str]:
    """Create a uniquely named database, yield its name, drop it (closing leftover connections)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = settings.connect()
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous ones."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def postgres_dagster_home(home: Path, settings: PgSettings | None = None) -> Iterator[Path]:
    """A DAGSTER_HOME whose ``dagster.yaml`` links to ``deploy/dagster-postgres.yaml``, on a fresh database.

    The connection variables (and ``DAGSTER_HOME``) are set while the block runs; the database is
    dropped on exit.
    """
    settings = settings or require_postgres()
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").symlink_to(POSTGRES_INSTANCE_YAML)
    with temporary_database(settings) as dbname:
        with environ({**settings.instance_env(dbname), "DAGSTER_HOME": str(home)}):
            yield home


@contextlib.contextmanager
def open_instance(home: Path) -> Iterator[dg.DagsterInstance]:
    """A new instance object loaded from ``home/dagster.yaml``, disposed on exit."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


@contextlib.contextmanager
def postgres_instance(home: Path, settings: PgSettings | None = None) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance on a throwaway PostgreSQL database (see ``postgres_dagster_home``)."""
    with postgres_dagster_home(home, settings) as dagster_home, open_instance(dagster_home) as instance:
        yield instance
