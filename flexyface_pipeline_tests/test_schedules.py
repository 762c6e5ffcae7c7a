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
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                            repository_def=defs.get_repository_def())
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


def test_export_sensor_requests_the_export_job():
    sensor = defs.resolve_sensor_def("export_after_sweep")
    assert sensor.job_name == "export_job"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def _materialize(tiny: dg.Definitions, instance: dg.DagsterInstance, sweep: str, *assets: str):
    """What the Assets page does: the implicit asset job on a selection of one sweep's assets."""
    if not instance.has_dynamic_partition("sweeps", sweep):
        instance.add_dynamic_partitions("sweeps", [sweep])
    result = tiny.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, partition_key=sweep, run_config=sweep_run_config(2, steps_max=4),
        asset_selection=[dg.AssetKey(a) for a in assets])
    assert result.success
    return result


def _sensor_on(instance: dg.DagsterInstance, result):
    """The export sensor evaluated on the SUCCESS event of one run."""
    sensor = defs.resolve_sensor_def("export_after_sweep")
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_event=result.get_run_success_event(), dagster_instance=instance,
        dagster_run=result.dagster_run)
    return sensor(context)


def test_export_sensor_follows_runs_that_scored_from_any_job(data_dir, tiny_models_dir, dagster_home):
    tiny = tiny_defs(data_dir, tiny_models_dir)
    sensor = defs.resolve_sensor_def("export_after_sweep")
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        # The daemon's first tick only sets the sensor's cursor.
        first = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
        assert first.run_requests == [] and first.cursor

        scored = _materialize(tiny, instance, "s1", "sweep_parameters", "generated_images", "clip_scores")
        sampled = _materialize(tiny, instance, "s2", "sweep_parameters")
        exported = tiny.resolve_job_def("export_job").execute_in_process(instance=instance)
        assert exported.success
        assert scored.dagster_run.job_name == sampled.dagster_run.job_name == "__ASSET_JOB"

        # Each run on its own.
        request = _sensor_on(instance, scored)
        assert isinstance(request, dg.RunRequest)
        assert request.run_key == f"export-after-{scored.run_id}"
        skipped = _sensor_on(instance, sampled)
        assert isinstance(skipped, dg.SkipReason) and "materialized no score table" in skipped.skip_message
        skipped = _sensor_on(instance, exported)
        assert isinstance(skipped, dg.SkipReason) and "is an export run" in skipped.skip_message

        # As the daemon evaluates it: every successful run is looked at, whatever its job; only
        # the run that scored asks for an export.
        requests, skips, cursor = [], [], first.cursor
        for _ in range(5):  # three runs: at most one per tick
            data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor))
            requests += data.run_requests
            if data.skip_message and data.skip_message.startswith("run "):  # not "returned an empty result"
                skips.append(data.skip_message)
            cursor = data.cursor
        assert [r.run_key for r in requests] == [f"export-after-{scored.run_id}"]
        assert len(skips) == 2, skips
        assert any(sampled.run_id in s for s in skips) and any(exported.run_id in s for s in skips)
