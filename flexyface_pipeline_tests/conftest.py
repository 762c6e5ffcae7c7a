import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """One directory of built tiny models shared by the whole session (built on first use)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A fresh data directory holding the repository's prompt files."""
    root = tmp_path / "data"
    shutil.copytree(REPO / "data" / "prompts", root / "prompts")
    return root


@pytest.fixture
def dagster_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
