import datetime as dt

import dagster as dg
import pytest

from flexyface_pipeline.definitions import defs
from flexyface_pipeline.defs.schedules import NIGHTLY_SWEEP
from flexyface_pipeline_tests.helpers import sweep_run_config, tiny_defs

EASTERN = dt.timezone(dt.timedelta(hours=-5))


@pytest.mark.parametrize(
    "when",
    [
        dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.timezone.utc),
        # The same instant seen from UTC-5, where it is still the 26th: the sweep is named after the UTC date.
        dt.datetime(2026, 11, 26, 21, 0, tzinfo=EASTERN),
    ],
)
def test_nightly_schedule_adds_a_dated_sweep_and_requests_its_run(dagster_home, when):
    schedule = defs.resolve_schedule_def("nightly_sweep")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # off until a user turns it on
    assert schedule.job_name == "sweep_job"
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone == "UTC"
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        assert not instance.has_dynamic_partition("sweeps", "nightly-2026-11-27")
        # Entered, as the daemon does: the context's exit puts back what it set for the instance.
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                       repository_def=defs.get_repository_def()) as context:
            data = schedule.evaluate_tick(context)
            assert instance.get_dynamic_partitions("sweeps") == ["nightly-2026-11-27"]
            [request] = data.run_requests
            assert request.partition_key == "nightly-2026-11-27"
            assert request.run_key == "nightly-2026-11-27"
            assert request.tags["dagster/partition"] == "nightly-2026-11-27"
            assert request.run_config["ops"]["sweep_parameters"]["config"] == NIGHTLY_SWEEP
            # evaluating the same tick again adds nothing new
            schedule.evaluate_tick(context)
            assert instance.get_dynamic_partitions("sweeps") == ["nightly-2026-11-27"]


def test_export_sensors_request_the_export_job():
    # Which run status each watches shows in the tick tests below (only the runs of that status).
    for name in ("export_after_sweep", "export_after_failed_run"):
        sensor = defs.resolve_sensor_def(name)
        assert isinstance(sensor, dg.RunStatusSensorDefinition)
        assert sensor.job_name == "export_job"
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def _materialize(tiny: dg.Definitions, instance: dg.DagsterInstance, sweep: str, *assets: str,
                 succeed: bool = True):
    """What the Assets page does: the implicit asset job on a selection of one sweep's assets."""
    if not instance.has_dynamic_partition("sweeps", sweep):
        instance.add_dynamic_partitions("sweeps", [sweep])
    result = tiny.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, partition_key=sweep, run_config=sweep_run_config(2, steps_max=4),
        asset_selection=[dg.AssetKey(a) for a in assets], raise_on_error=False)
    assert result.success == succeed
    return result


def _sensor_on(instance: dg.DagsterInstance, result, name: str = "export_after_sweep"):
    """An export sensor evaluated on the final event of one run."""
    sensor = defs.resolve_sensor_def(name)
    final = [e for e in result.all_events if e.event_type in (dg.DagsterEventType.RUN_SUCCESS,
                                                              dg.DagsterEventType.RUN_FAILURE)][-1]
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=final, dagster_instance=instance,
        dagster_run=result.dagster_run)
    return sensor(context)


def _ticks(sensor, instance, cursor, count):
    requests, cursors = [], []
    for _ in range(count):
        with dg.build_sensor_context(instance=instance, cursor=cursor) as context:
            data = sensor.evaluate_tick(context)
        requests.append([r.run_key for r in data.run_requests])
        cursor = data.cursor
        cursors.append(cursor)
    return requests, cursors


def test_export_sensor_follows_runs_that_scored_from_any_job(data_dir, tiny_models_dir, dagster_home):
    tiny = tiny_defs(data_dir, tiny_models_dir)
    sensor = defs.resolve_sensor_def("export_after_sweep")
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        # The daemon's first tick only sets the sensor's cursor.
        with dg.build_sensor_context(instance=instance) as context:
            first = sensor.evaluate_tick(context)
        assert first.run_requests == [] and first.cursor

        sampled = _materialize(tiny, instance, "s2", "sweep_parameters")
        exported = tiny.resolve_job_def("export_job").execute_in_process(instance=instance)
        assert exported.success
        scored = _materialize(tiny, instance, "s1", "sweep_parameters", "generated_images", "clip_scores")
        assert scored.dagster_run.job_name == sampled.dagster_run.job_name == "__ASSET_JOB"

        # Each run on its own: only the run that scored asks for an export.
        request = _sensor_on(instance, scored)
        assert isinstance(request, dg.RunRequest)
        assert request.run_key == f"export-after-{scored.run_id}"
        assert _sensor_on(instance, sampled) is None
        assert _sensor_on(instance, exported) is None

        # As the daemon evaluates it: runs that need nothing do not hold up the tick, so the
        # first tick looks past both of them to the run that scored.
        requests, cursors = _ticks(sensor, instance, first.cursor, 2)
        assert requests == [[f"export-after-{scored.run_id}"], []]
        assert cursors[1] == cursors[0]  # nothing left to look at


def test_a_failed_run_that_scored_gets_its_export(data_dir, tiny_models_dir, dagster_home, monkeypatch):
    from flexyface_pipeline.lib.metrics import AestheticV2Scorer

    tiny = tiny_defs(data_dir, tiny_models_dir)
    sensor = defs.resolve_sensor_def("export_after_failed_run")
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        with dg.build_sensor_context(instance=instance) as context:
            first = sensor.evaluate_tick(context)
        _materialize(tiny, instance, "f1", "sweep_parameters", "generated_images")

        def unreadable(cls, *args, **kwargs):
            raise RuntimeError("the checkpoint is truncated")

        monkeypatch.setattr(AestheticV2Scorer, "load", classmethod(unreadable))
        # Two score tables selected: clip_scores is written, aes_v2_scores fails, so does the run.
        partial = _materialize(tiny, instance, "f1", "clip_scores", "aes_v2_scores", succeed=False)
        failed = _materialize(tiny, instance, "f2", "sweep_parameters", "generated_images", "aes_v2_scores",
                              succeed=False)
        assert {e.asset_key.to_user_string() for e in partial.get_asset_materialization_events()} == {"clip_scores"}
        assert not any(e.asset_key.to_user_string().endswith("_scores")
                       for e in failed.get_asset_materialization_events())

        assert _sensor_on(instance, partial, "export_after_failed_run").run_key == f"export-after-{partial.run_id}"
        assert _sensor_on(instance, failed, "export_after_failed_run") is None
        requests, _ = _ticks(sensor, instance, first.cursor, 2)
        assert requests == [[f"export-after-{partial.run_id}"], []]
