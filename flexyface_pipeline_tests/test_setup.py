"""`make setup` keeps an existing .env and adds the settings it lacks."""

from __future__ import annotations

import os
import shutil
import subprocess

from flexyface_pipeline_tests.conftest import REPO


def _settings(path) -> dict[str, str]:
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#") and "=" in ln]
    return dict(ln.split("=", 1) for ln in lines)


def test_an_older_env_keeps_its_values_and_gains_the_new_settings(tmp_path) -> None:
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO / ".env.example", tmp_path / ".env.example")
    (tmp_path / ".env").write_text("DAGSTER_HOME=/srv/instance\nFLEXYFACE_DEVICE=cuda:1\n")
    old = os.stat(tmp_path / ".env.example").st_mtime - 60
    os.utime(tmp_path / ".env", (old, old))  # older than .env.example: make updates it
    done = subprocess.run(["make", "-s", ".env", "REPO=/opt/flexyface"], cwd=tmp_path, capture_output=True,
                          text=True, check=True)
    env, example = _settings(tmp_path / ".env"), _settings(tmp_path / ".env.example")
    assert env["DAGSTER_HOME"] == "/srv/instance" and env["FLEXYFACE_DEVICE"] == "cuda:1"
    assert set(env) == set(example)
    assert env["FLEXYFACE_DATA_DIR"] == "/opt/flexyface/data"
    assert "added the new settings" in done.stdout and "FLEXYFACE_MODEL_PROFILE" in done.stdout
    again = subprocess.run(["make", "-s", ".env", "REPO=/opt/flexyface"], cwd=tmp_path, capture_output=True,
                           text=True, check=True)
    assert "added" not in again.stdout and _settings(tmp_path / ".env") == env


def test_make_instance_refuses_a_bad_setting_in_one_line_before_dagster_stores_anything(tmp_path) -> None:
    """`make setup` (through `make instance`) runs `flexyface check` on .env before `dagster instance
    concurrency set`: a bad value stops it with the check's one line."""
    for name in ("Makefile", ".env.example", "dagster.yaml", "requirements.txt", "requirements-nodeps.txt",
                 "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
        old = os.stat(REPO / ".venv" / ".installed").st_mtime - 60
        os.utime(tmp_path / name, (old, old))  # older than the installed stamp: nothing to install
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXYFACE_", "DAGSTER_"))}
    subprocess.run(["make", "-s", ".env"], cwd=tmp_path, capture_output=True, text=True, check=True, env=env)
    with open(tmp_path / ".env", "a") as f:
        f.write("FLEXYFACE_DEVICE=gpu\n")
    done = subprocess.run(["make", "instance"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("make")]
    assert len(errors) == 1 and "FLEXYFACE_DEVICE='gpu': expected auto, cpu, cuda or cuda:N" in errors[0], done.stderr
    assert "concurrency" not in done.stdout.split("flexyface check")[-1]
    assert sorted(p.name for p in (tmp_path / "data" / "dagster").iterdir()) == ["dagster.yaml"]
