"""The UI walkthrough (ui_walkthrough.py) in headless Chromium against ``dagster dev`` on a temporary
instance that holds a small sweep made through the project's own jobs.

Skipped when no Chromium is installed, except under CI (CI=true), where it fails instead.
Screenshots go to ``$FLEXYFACE_UI_SHOTS`` if set, else to the test's temporary directory.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from flexyface_pipeline_tests.conftest import in_ci
from flexyface_pipeline_tests.helpers import BIN, REPO, project_env, run_sweep, tiny_defs, torch_threads
from flexyface_pipeline_tests.ui_walkthrough import find_browser, readme_start_yaml, walk

pytestmark = pytest.mark.slow
README = REPO / "README.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dagster dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/server_info", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"dagster dev did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the webserver, daemon and code servers
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_readme_start_yaml_is_what_the_walkthrough_sends():
    readme = README.read_text(encoding="utf-8")
    config = readme_start_yaml(readme)
    import yaml

    settings = yaml.safe_load(config)["ops"]["prepare_sweep"]["config"]
    assert settings["sweep"] and settings["num_images"] > 0
    # The sweep is valid for the start job's config class: no field the job does not know.
    from flexyface_pipeline.defs.start import StartSweepConfig

    StartSweepConfig(**settings)


def test_ui_walkthrough(tmp_path, data_dir, tiny_models_dir):
    browser = find_browser()
    if browser is None:
        if in_ci():
            pytest.fail("no Chromium installed: CI must install it (apt-get install -y chromium)")
        pytest.skip("no Chromium installed (apt-get install -y chromium)")
    shots = Path(os.environ.get("FLEXYFACE_UI_SHOTS") or tmp_path / "shots")
    start_yaml = readme_start_yaml(README.read_text(encoding="utf-8"))

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = project_env(home, data_dir, tiny_models_dir)
    # A small scored sweep and its export, as `make demo` leaves them (fewer images).
    defs = tiny_defs(data_dir, tiny_models_dir)
    with dg.instance_for_test(temp_dir=str(home)) as instance, torch_threads(1):
        assert run_sweep(defs, instance, "demo", 8).success
        assert defs.resolve_job_def("export_job").execute_in_process(instance=instance).success

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = tmp_path / "work"  # no .env here: the environment above is the whole configuration
    workdir.mkdir()
    log = tmp_path / "dagster-dev.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-m", "flexyface_pipeline.definitions"],
            env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_up(url, process, log)
        seen = walk(url, shots, start_yaml, browser, timeout=300)
    finally:
        _stop(process)
    assert seen["analysis_images"] >= 5  # overview, per-metric effects and heatmaps, trade-off, correlations
    assert seen["grid_images"] >= 1 and seen["grid_sweep_shown"]
    for asset in ("sweep_results", "sweep_analysis", "image_grid"):
        assert seen[f"{asset}_refreshed_ms"] > 0
    for path in seen["screenshots"]:
        assert path.stat().st_size > 10_000
    sweep = seen["sweep"]
    assert sorted((data_dir / "exports" / "grids" / sweep).glob("*.png"))
