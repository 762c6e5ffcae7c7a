"""``recover_dead_runs``: only runs that ``flexyface`` started on this machine are recovered.

Each run is left in the instance as a killed run leaves it: status STARTED, a RUN_START event
carrying the pid of the process that ran it, and the ``gpu`` slot its step claimed.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import dagster as dg
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.utils import make_new_run_id

from flexyface_pipeline.defs.recovery import HOST_TAG, recover_dead_runs


@pytest.fixture
def instance(dagster_home) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        yield instance


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _started_run(instance: dg.DagsterInstance, pid: int, tags: dict[str, str], step: str = "generated_images") -> str:
    """A run whose process ``pid`` started it and whose step ``step`` holds the gpu slot."""
    run = instance.add_run(dg.DagsterRun(job_name="sweep_job", run_id=make_new_run_id(), tags=tags,
                                         status=dg.DagsterRunStatus.NOT_STARTED))
    start = DagsterEvent(event_type_value=DagsterEventType.RUN_START.value, job_name="sweep_job", pid=pid)
    instance.report_dagster_event(start, run.run_id)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
    return run.run_id


def _status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    return instance.get_run_by_id(run_id).status


def _slot_holders(instance: dg.DagsterInstance) -> set[str]:
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}


def test_dead_run_of_this_host_is_failed_and_its_slot_freed(instance, dead_pid):
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    run_id = _started_run(instance, dead_pid, {HOST_TAG: socket.gethostname()})
    assert storage.claim_concurrency_slot("gpu", run_id, "generated_images").is_claimed

    assert recover_dead_runs(instance) == [run_id]
    assert _status(instance, run_id) == dg.DagsterRunStatus.FAILURE
    assert _slot_holders(instance) == set()
    [failure] = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    assert f"pid {dead_pid}" in failure.dagster_event.message
    # The next GPU step gets the slot.
    assert storage.claim_concurrency_slot("gpu", "next-run", "clip_scores").is_claimed
    # Nothing left to recover.
    assert recover_dead_runs(instance) == []


def test_runs_not_started_by_flexyface_on_this_host_are_left_alone(instance, dead_pid, live_pid):
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 3)
    host = socket.gethostname()
    # Launched by the daemon, the UI or `dagster asset materialize`: no host tag; its process may
    # be alive in another container, whatever this machine's process table says.
    untagged = _started_run(instance, dead_pid, {"dagster/partition": "s1"})
    # `flexyface` on another machine sharing the instance.
    elsewhere = _started_run(instance, dead_pid, {HOST_TAG: f"not-{host}"}, step="clip_scores")
    # `flexyface` on this machine, still running.
    alive = _started_run(instance, live_pid, {HOST_TAG: host}, step="hps_v2_scores")
    for run_id, step in ((untagged, "generated_images"), (elsewhere, "clip_scores"), (alive, "hps_v2_scores")):
        assert storage.claim_concurrency_slot("gpu", run_id, step).is_claimed

    assert recover_dead_runs(instance) == []
    for run_id in (untagged, elsewhere, alive):
        assert _status(instance, run_id) == dg.DagsterRunStatus.STARTED
        assert not instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    assert _slot_holders(instance) == {untagged, elsewhere, alive}
