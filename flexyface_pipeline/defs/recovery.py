"""Find runs of this machine whose process died (kill -9, OOM, power) and give their gpu slot back.

A run executed in process by ``flexyface`` that is killed stays "started" in the instance and keeps
the ``gpu`` pool slot its step claimed, so every later GPU step would wait for it. ``flexyface``
tags its runs with the host that runs them (``HOST_TAG``) and their events carry the pid of the
process that ran them: if a run tagged with this host names a process that no longer exists here,
the run is marked failed and its slots are freed.

Runs without that tag (launched from the UI, by a schedule, sensor or backfill, or by
``dagster asset materialize``) and runs tagged with another host are never touched: their process
may be alive on another machine or container that shares the instance, and a pid means nothing
outside the machine that issued it. Nothing recovers those automatically: the default run launcher
has no health check, so the daemon's run monitoring does not notice that a started run's process
died. Such a run stays "started" until it is terminated by hand (UI: Terminate, force); the daemon
frees the pool slots of a finished run ``run_monitoring.free_slots_after_run_end_seconds`` after
its end (deploy/README.md).
"""

import logging
import os
import socket

import dagster as dg

logger = logging.getLogger(__name__)

HOST_TAG = "flexyface/host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)
    for record in records:
        if record.dagster_event is not None and record.dagster_event.pid:
            return int(record.dagster_event.pid)
        if record.pid:
            return int(record.pid)
    return None


def recover_dead_runs(instance: dg.DagsterInstance, log: logging.Logger | None = None) -> list[str]:
    """Mark started runs tagged with this host whose process is gone as failed; free their pool slots.

    Returns the ids of the runs marked failed.
    """
    log = log or logger
    host = socket.gethostname()
    recovered = []
    # Only runs `flexyface` started on this machine: any other run's pid means nothing here.
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={HOST_TAG: host}))
    for run in runs:
        pid = _run_pid(instance, run.run_id)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        message = f"the process that ran this run (pid {pid}) no longer exists: marked failed, gpu slot freed"
        instance.report_run_failed(run, message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log.warning("run %s (%s): %s", run.run_id, run.job_name, message)
        recovered.append(run.run_id)
    return recovered
