import datetime as dt

import dagster as dg

from flexyface_pipeline.definitions import defs
from flexyface_pipeline.defs.schedules import NIGHTLY_SWEEP


def test_nightly_schedule_adds_a_dated_sweep_and_requests_its_run(dagster_home):
    schedule = defs.resolve_schedule_def("nightly_sweep")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # off until a user turns it on
    assert schedule.job_name == "sweep_job"
    when = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.timezone.utc)
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
