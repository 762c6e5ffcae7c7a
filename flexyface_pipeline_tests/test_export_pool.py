"""The export steps are in the pool ``export``: with the repository's dagster.yaml, export runs take turns."""

from __future__ import annotations

import threading
import time

import dagster as dg
from dagster._core.events import DagsterEventType

from flexyface_pipeline.defs.assets.results import EXPORT_POOL
from flexyface_pipeline_tests.helpers import link_instance, tiny_defs


def _blocked_export_run(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    for run in instance.get_runs(filters=dg.RunsFilter(job_name="export_job", statuses=[dg.DagsterRunStatus.STARTED])):
        messages = [e.dagster_event.message or "" for e in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT)]
        if any("blocked by limit for pool export" in m for m in messages):
            return run
    return None


def test_an_export_run_waits_while_another_export_holds_the_pool(data_dir, tiny_models_dir, tmp_path):
    defs = tiny_defs(data_dir, tiny_models_dir)
    assert EXPORT_POOL == "export"
    for key in ("sweep_results", "sweep_analysis"):
        assert defs.resolve_assets_def(key).op.pool == "export"
    assert defs.resolve_assets_def("generated_images").op.pool == "gpu"  # the gpu pool is untouched

    home = link_instance(tmp_path / "dagster")
    exports = data_dir / "exports"
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["unscored"])
        storage = instance.event_log_storage
        # No limit is stored for the pool: the instance's default_limit (1) applies.
        assert storage.initialize_concurrency_limit_to_default("export")
        info = storage.get_concurrency_info("export")
        assert (info.limit, info.using_default_limit) == (1, True)
        # Another export run is writing.
        assert storage.claim_concurrency_slot("export", "other-export-run", "sweep_results").is_claimed

        outcome: dict = {}

        def export() -> None:
            with dg.DagsterInstance.from_config(str(home)) as own:
                outcome["result"] = defs.resolve_job_def("export_job").execute_in_process(
                    instance=own, raise_on_error=False)

        worker = threading.Thread(target=export, daemon=True)
        worker.start()
        deadline = time.monotonic() + 300  # a guard against hanging, not a measurement
        blocked = None
        while blocked is None and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
            blocked = _blocked_export_run(instance)
        assert blocked is not None, "the export run never waited for the pool"
        # While it waits it has written nothing.
        assert not (exports / "sweep_results.parquet").exists()
        assert instance.get_run_by_id(blocked.run_id).status == dg.DagsterRunStatus.STARTED

        storage.free_concurrency_slots_for_run("other-export-run")
        worker.join(timeout=300)
        assert not worker.is_alive()
        result = outcome["result"]
        assert result.success and result.run_id == blocked.run_id
        assert (exports / "sweep_results.parquet").is_file()
        assert storage.get_concurrency_info("export").claimed_slots == []
        # The export step started only after its last wait for the slot.
        kinds = [(e.dagster_event.event_type, e.step_key, e.dagster_event.message or "")
                 for e in instance.all_logs(result.run_id) if e.dagster_event is not None]
        last_wait = max(i for i, (kind, _, message) in enumerate(kinds)
                        if kind == DagsterEventType.ENGINE_EVENT and "blocked by limit for pool export" in message)
        export_start = next(i for i, (kind, step, _) in enumerate(kinds)
                            if kind == DagsterEventType.STEP_START and step == "sweep_results")
        assert export_start > last_wait
        started = [step for kind, step, _ in kinds if kind == DagsterEventType.STEP_START]
        assert set(started) == {"sweep_results", "export_checks", "sweep_analysis"}
