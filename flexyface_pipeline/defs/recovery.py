"""Find runs whose process died (kill -9, OOM, power) and give their gpu slot back.

A run executed in process (``flexyface``, ``dagster asset materialize``) that is killed stays
"started" in the instance and keeps the ``gpu`` pool slot its step claimed, so every later GPU
step would wait for it. Its events carry the pid of the process that ran it: if that process no
longer exists on this machine, the run is marked failed and its slots are freed. Runs launched by
the daemon are watched by the daemon's run monitoring instead.
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
    """Mark started runs of this machine whose process is gone as failed; free their pool slots."""
    log = log or logger
    host = socket.gethostname()
    recovered = []
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    for run in runs:
        if run.tags.get(HOST_TAG) not in (None, host):
            continue  # started on another machine: its pid means nothing here
        pid = _run_pid(instance, run.run_id)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        message = f"the process that ran this run (pid {pid}) no longer exists: marked failed, gpu slot freed"
        instance.report_run_failed(run, message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log.warning("run %s (%s): %s", run.run_id, run.job_name, message)
        recovered.append(run.run_id)
    return recovered
