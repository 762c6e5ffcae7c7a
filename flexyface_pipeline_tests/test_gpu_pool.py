"""The gpu pool of the repository's dagster.yaml: GPU steps of different runs never overlap.

These tests run the real code location (``flexyface_pipeline.definitions``, configured from the
environment as in ``.env``) on tiny models, with a temporary DAGSTER_HOME whose dagster.yaml is a
link to the repository's file, as ``make instance`` lays it out. Every asset that holds a model
(generated_images and the four score tables) declares ``pool="gpu"`` and releases its model before
its step ends, so "no two gpu steps at once" is "no two models loaded at once".

The proof comes from the runs' own event logs: a gpu step runs between its STEP_START and
STEP_SUCCESS events, and a step that waited for the pool logged "Step blocked by limit for pool
gpu" first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType

from flexyface_pipeline_tests.helpers import (
    BIN,
    REPO,
    link_instance,
    project_env,
    sweep_run_config,
    tiny_defs,
    torch_threads,
)

MODULE = "flexyface_pipeline.definitions"
GPU_ASSETS = frozenset({"generated_images", "clip_scores", "aesthetic_scores", "aes_v2_scores", "hps_v2_scores"})
BLOCKED = "blocked by limit for pool gpu"  # "Step blocked ...", "Step still blocked ..."
STEP_EVENTS = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}


@dataclass(frozen=True)
class Project:
    home: Path
    data_dir: Path
    env: dict[str, str]
    workdir: Path  # where processes start: no .env there

    def instance(self) -> contextlib.AbstractContextManager[dg.DagsterInstance]:
        return dg.DagsterInstance.from_config(str(self.home))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models_dir) -> Project:
    """An instance holding the sweep ``base`` (4 images) with its parameters and images materialized."""
    root = tmp_path_factory.mktemp("gpu_pool")
    data_dir = root / "data"
    shutil.copytree(REPO / "data" / "prompts", data_dir / "prompts")
    home = link_instance(root / "dagster")
    workdir = root / "work"
    workdir.mkdir()
    defs = tiny_defs(data_dir, tiny_models_dir)
    with dg.DagsterInstance.from_config(str(home)) as instance, torch_threads(1):
        instance.add_dynamic_partitions("sweeps", ["base"])
        result = defs.resolve_job_def("sweep_job").execute_in_process(
            instance=instance, partition_key="base", run_config=sweep_run_config(4, steps_max=6),
            asset_selection=[dg.AssetKey("sweep_parameters"), dg.AssetKey("generated_images")],
        )
        assert result.success
        # What `make instance` does (`dagster instance concurrency set gpu 1`).
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
    return Project(home, data_dir, project_env(home, data_dir, tiny_models_dir), workdir)


# -- reading the event log ---------------------------------------------------------------------

@dataclass(frozen=True)
class StepWindow:
    run_id: str
    step: str
    start: float
    end: float


def step_windows(instance: dg.DagsterInstance, run_id: str) -> dict[str, StepWindow]:
    """Each finished step of a run, from its STEP_START to its STEP_SUCCESS/STEP_FAILURE event."""
    starts: dict[str, float] = {}
    windows: dict[str, StepWindow] = {}
    for entry in instance.all_logs(run_id, of_type=STEP_EVENTS):
        event = entry.dagster_event
        if event.event_type == DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        else:
            windows[entry.step_key] = StepWindow(run_id, entry.step_key, starts[entry.step_key], entry.timestamp)
    return windows


def blocked_times(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[float]]:
    """When each step of a run reported that it waited for the gpu pool."""
    times: dict[str, list[float]] = {}
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        if entry.step_key and BLOCKED in entry.message:
            times.setdefault(entry.step_key, []).append(entry.timestamp)
    return times


def gpu_windows(instance: dg.DagsterInstance, run_ids: list[str]) -> list[StepWindow]:
    return sorted(
        (w for run_id in run_ids for w in step_windows(instance, run_id).values() if w.step in GPU_ASSETS),
        key=lambda w: w.start,
    )


def assert_no_overlap(windows: list[StepWindow]) -> None:
    for a, b in combinations(windows, 2):
        assert a.end <= b.start or b.end <= a.start, f"gpu steps overlap: {a} and {b}"


def wait_for_runs(instance: dg.DagsterInstance, run_ids: list[str], timeout: float) -> list[dg.DagsterRun]:
    deadline = time.monotonic() + timeout
    while True:
        runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
        if all(run is not None and run.is_finished for run in runs):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"runs not finished after {timeout} s: {[(r.run_id, r.status) if r else None for r in runs]}")
        time.sleep(1)


@contextlib.contextmanager
def running_daemon(project: Project, log: Path) -> Iterator[subprocess.Popen]:
    """``dagster-daemon run`` on the code location, stopped with SIGTERM at the end.

    Started as `setsid env --default-signal=INT,TERM ...`: a new session (its process group is its
    pid) with SIGINT and SIGTERM handled, so it stops cleanly and takes its code server with it.
    """
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            ["setsid", "env", "--default-signal=INT,TERM", str(BIN / "dagster-daemon"), "run", "-m", MODULE],
            env=project.env, cwd=project.workdir, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
            raise AssertionError(f"dagster-daemon ignored SIGTERM; log: {log}") from None
    # Nothing of the daemon's process group (code server, run workers) outlives it for long.
    deadline = time.monotonic() + 30
    while (left := live_group_members(daemon.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the daemon's group still running: {left}"


def live_group_members(pgid: int) -> list[str]:
    """The processes of a process group that still run (zombies waiting to be reaped excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, group = text[text.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(text[: text.rindex(")") + 1])
    return members


def _dagster(*args: str) -> list[str]:
    return [str(BIN / "dagster"), *args]


# -- runs launched through the queue and started by the daemon ----------------------------------

def test_launched_sweep_and_rescore_never_hold_gpu_models_together(project, tmp_path):
    """A new sweep and a re-score of an existing one, launched together and started by the daemon.

    Both runs are queued before the daemon starts, so that its first pass starts both: they run
    side by side, and only their gpu steps take turns.
    """
    sweep_run, rescore_run = str(uuid.uuid4()), str(uuid.uuid4())
    with project.instance() as instance:
        instance.add_dynamic_partitions("sweeps", ["fresh"])
    commands = [
        _dagster("job", "launch", "-m", MODULE, "-j", "sweep_job", "--run-id", sweep_run,
                 "--tags", json.dumps({"dagster/partition": "fresh"}),
                 "--config-json", json.dumps(sweep_run_config(2, steps_max=6, base_seed=11))),
        # What "Materialize" of two score tables in the UI launches for the existing sweep.
        _dagster("job", "launch", "-m", MODULE, "-j", "sweep_job", "--run-id", rescore_run,
                 "-o", "hps_v2_scores,clip_scores", "--tags", json.dumps({"dagster/partition": "base"})),
        # The export sensors would add a third (CPU-only) run after the sweep: not needed here.
        _dagster("sensor", "stop", "export_after_sweep", "-m", MODULE),
        _dagster("sensor", "stop", "export_after_failed_run", "-m", MODULE),
    ]
    processes = [
        subprocess.Popen(command, env=project.env, cwd=project.workdir,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command in commands
    ]
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output

    with project.instance() as instance:
        assert [instance.get_run_by_id(r).status for r in (sweep_run, rescore_run)] == [dg.DagsterRunStatus.QUEUED] * 2
        with running_daemon(project, tmp_path / "daemon.log"):
            runs = wait_for_runs(instance, [sweep_run, rescore_run], timeout=180)
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2, tmp_path / "daemon.log"

        sweep_steps = step_windows(instance, sweep_run)
        rescore_steps = step_windows(instance, rescore_run)
        assert set(sweep_steps) == GPU_ASSETS | {"sweep_parameters", "image_grid"}
        assert set(rescore_steps) == {"hps_v2_scores", "clip_scores"}
        windows = gpu_windows(instance, [sweep_run, rescore_run])
        assert len(windows) == 7
        assert_no_overlap(windows)

        # ... although the runs ran at the same time: each started before the other ended ...
        records = {r.dagster_run.run_id: r for r in instance.get_run_records(dg.RunsFilter(run_ids=[sweep_run, rescore_run]))}
        assert max(r.start_time for r in records.values()) < min(r.end_time for r in records.values())
        # ... and a gpu step of one run waited while a gpu step of the other held the pool.
        waited = [
            (run_id, step, t)
            for run_id in (sweep_run, rescore_run)
            for step, times in blocked_times(instance, run_id).items()
            for t in times
        ]
        assert waited, "no gpu step had to wait: the runs never met at the pool"
        assert all(step in GPU_ASSETS for _, step, _ in waited)
        assert any(
            w.run_id != run_id and w.start <= t <= w.end for run_id, _, t in waited for w in windows
        ), (waited, windows)

        # The re-score run wrote the score tables of the existing sweep; the sweep run its own.
        for asset in ("hps_v2_scores", "clip_scores"):
            latest = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert latest is not None
            by_run = {
                m.run_id: m.partition_key
                for m in instance.fetch_materializations(dg.AssetKey(asset), limit=10).records
            }
            assert by_run[rescore_run] == "base" and by_run[sweep_run] == "fresh"
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []


# -- in-process executions (`dagster asset materialize`, `flexyface`) -----------------------------

def test_in_process_executions_take_turns_on_the_gpu(project):
    """Two `dagster asset materialize` processes (each executes its run in its own process, no
    queue, no daemon) re-score the same sweep at once; their gpu steps do not overlap.

    A stand-in for a third run's gpu step holds the slot while both start, so that both certainly
    reach the pool while it is taken; once it is freed they take turns.
    """
    command = _dagster("asset", "materialize", "-m", MODULE, "--select", "hps_v2_scores", "--partition", "base")
    with project.instance() as instance:
        storage = instance.event_log_storage
        assert storage.claim_concurrency_slot("gpu", "holder", "holder").is_claimed
        known = {run.run_id for run in instance.get_runs()}
        processes = [
            subprocess.Popen(command, env=project.env, cwd=project.workdir,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)
        ]
        try:
            # Both runs exist and both wait for the pool.
            deadline = time.monotonic() + 120
            while True:
                run_ids = [run.run_id for run in instance.get_runs() if run.run_id not in known]
                blocked = {run_id: blocked_times(instance, run_id).get("hps_v2_scores") for run_id in run_ids}
                if len(blocked) == 2 and all(blocked.values()):
                    break
                exited = [p.poll() for p in processes if p.poll() is not None]
                assert not exited and time.monotonic() < deadline, (exited, blocked)
                time.sleep(0.5)
            # Neither step has started.
            assert not [e for r in run_ids for e in instance.all_logs(r, of_type=DagsterEventType.STEP_START)]
        finally:
            storage.free_concurrency_slots_for_run("holder")
        for process in processes:
            output, _ = process.communicate(timeout=120)
            assert process.returncode == 0, output

        runs = [instance.get_run_by_id(run_id) for run_id in run_ids]
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
        first, second = gpu_windows(instance, run_ids)
        assert (first.step, second.step) == ("hps_v2_scores", "hps_v2_scores")
        assert first.run_id != second.run_id
        assert_no_overlap([first, second])
        # Both waited together before either ran; the second kept waiting while the first ran.
        assert max(min(times) for times in blocked.values()) < first.start
        assert second.start >= first.end
        assert storage.get_concurrency_info("gpu").claimed_slots == []
