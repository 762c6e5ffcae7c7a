import datetime as dt

import dagster as dg
import pytest

from flexyface_pipeline.definitions import defs
from flexyface_pipeline.defs.resources import StorageResource
from flexyface_pipeline.defs.schedules import NIGHTLY_DEFAULTS, NIGHTLY_ENV
from flexyface_pipeline.defs.start import start_run_config
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
def test_nightly_schedule_requests_a_start_run_and_adds_no_partition(dagster_home, data_dir, when, monkeypatch):
    for variable in NIGHTLY_ENV.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("FLEXYFACE_MODEL_PROFILE", "real")
    schedule = defs.resolve_schedule_def("nightly_sweep")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # off until a user turns it on
    assert schedule.job_name == "start_sweep"
    assert schedule.cron_schedule == "0 2 * * *"
    assert schedule.execution_timezone == "UTC"
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        # Entered, as the daemon does (and as "Preview tick result" evaluates it).
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                       repository_def=defs.get_repository_def(),
                                       resources={"storage": StorageResource(data_dir=str(data_dir))}) as context:
            data = schedule.evaluate_tick(context)
            [request] = data.run_requests
            assert request.run_key == "nightly-2026-11-27"
            assert request.partition_key is None  # the start job is not partitioned
            config = request.run_config["ops"]["prepare_sweep"]["config"]
            assert config == {"sweep": "nightly-2026-11-27", **NIGHTLY_DEFAULTS}
            assert request.tags["flexyface/scheduled"] == "true"
            # An evaluation (a preview) creates nothing: the partition comes with the start run.
            assert instance.get_dynamic_partitions("sweeps") == []


def test_nightly_settings_come_from_the_environment_at_evaluation(dagster_home, data_dir, monkeypatch):
    schedule = defs.resolve_schedule_def("nightly_sweep")
    when = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.timezone.utc)

    def evaluate(**environ):
        for variable in NIGHTLY_ENV.values():
            monkeypatch.delenv(variable, raising=False)
        for variable, value in environ.items():
            monkeypatch.setenv(variable, value)
        with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
            with dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                           resources={"storage": StorageResource(data_dir=str(data_dir))}) as ctx:
                data = schedule.evaluate_tick(ctx)
            assert instance.get_dynamic_partitions("sweeps") == []
        return data

    # The tiny profile (the demo's) gets the demo's small sweep, not 200 images at 512x512.
    data = evaluate(FLEXYFACE_MODEL_PROFILE="tiny")
    config = data.run_requests[0].run_config["ops"]["prepare_sweep"]["config"]
    assert (config["num_images"], config["width"], config["height"]) == (96, 64, 64)
    assert config["prompt_files"] == ["demo.txt"]

    data = evaluate(FLEXYFACE_MODEL_PROFILE="real", FLEXYFACE_NIGHTLY_IMAGES="40", FLEXYFACE_NIGHTLY_WIDTH="768",
                    FLEXYFACE_NIGHTLY_HEIGHT="1024", FLEXYFACE_NIGHTLY_PROMPT_FILE="demo.txt, portraits.txt",
                    FLEXYFACE_NIGHTLY_ENGINE="realvis_xl")
    config = data.run_requests[0].run_config["ops"]["prepare_sweep"]["config"]
    assert (config["num_images"], config["width"], config["height"]) == (40, 768, 1024)
    assert config["prompt_files"] == ["demo.txt", "portraits.txt"]

    # A bad setting skips the tick with one line naming it; nothing is requested or created.
    for variable, value, named in (("FLEXYFACE_NIGHTLY_IMAGES", "lots", "FLEXYFACE_NIGHTLY_IMAGES"),
                                   ("FLEXYFACE_NIGHTLY_WIDTH", "500", "width"),
                                   ("FLEXYFACE_NIGHTLY_PROMPT_FILE", "missing.txt", "prompt_files"),
                                   ("FLEXYFACE_NIGHTLY_ENGINE", "nope", "engine")):
        data = evaluate(FLEXYFACE_MODEL_PROFILE="real", **{variable: value})
        assert data.run_requests == []
        assert named in data.skip_message and "\n" not in data.skip_message, data.skip_message


def test_start_sweep_with_bad_settings_fails_and_leaves_nothing(data_dir, tiny_models_dir, dagster_home):
    tiny = tiny_defs(data_dir, tiny_models_dir)
    job = tiny.resolve_job_def("start_sweep")
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        for sweep, settings, named in (("bad-steps", {"num_images": 4, "steps_min": 2}, "steps"),
                                       ("bad-size", {"num_images": 4, "width": 60}, "width"),
                                       ("bad/name", {"num_images": 4}, "sweep"),
                                       ("not-defined", {}, "num_images")):
            result = job.execute_in_process(instance=instance, run_config=start_run_config(sweep, settings),
                                            raise_on_error=False)
            assert not result.success
            [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
            message = failure.step_failure_data.error.message
            assert named in message and len(message.strip().splitlines()) == 1, message
        assert instance.get_dynamic_partitions("sweeps") == []
        assert not (data_dir / "sweeps").exists() or not any((data_dir / "sweeps").iterdir())


def test_start_sweep_adds_the_partition_and_the_sensor_launches_the_sweep(data_dir, tiny_models_dir, dagster_home):
    tiny = tiny_defs(data_dir, tiny_models_dir)
    settings = sweep_run_config(3)["ops"]["sweep_parameters"]["config"]
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        result = tiny.resolve_job_def("start_sweep").execute_in_process(
            instance=instance, run_config=start_run_config("ui-1", settings))
        assert result.success
        assert instance.get_dynamic_partitions("sweeps") == ["ui-1"]
        request = _sensor_on(instance, result, "launch_started_sweep")
        assert isinstance(request, dg.RunRequest)
        assert request.partition_key == "ui-1"
        assert request.run_key == f"sweep-after-{result.run_id}"
        assert request.tags["flexyface/started_by"] == result.run_id
        assert request.run_config == {"ops": {"sweep_parameters": {"config": settings}}}
        sensor = defs.resolve_sensor_def("launch_started_sweep")
        assert sensor.job_name == "sweep_job" and sensor.default_status == dg.DefaultSensorStatus.RUNNING
        # What the sensor requests is a valid sweep_job run: it makes the sweep and its contact sheets.
        run = tiny.resolve_job_def("sweep_job").execute_in_process(
            instance=instance, partition_key=request.partition_key, run_config=request.run_config)
        assert run.success
        assert {"image_grid", "hps_v2_scores"} <= {e.asset_key.to_user_string()
                                                   for e in run.get_asset_materialization_events()}


def test_export_sensors_request_the_export_job():
    # Which run status each watches shows in the tick tests below (only the runs of that status).
    for name in ("export_after_sweep", "export_after_failed_run"):
        sensor = defs.resolve_sensor_def(name)
        assert isinstance(sensor, dg.RunStatusSensorDefinition)
        assert {job.name for job in sensor.jobs} == {"export_job", "image_grid_job"}
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
        # As the daemon does: partitioned run requests are checked against the instance's partitions.
        with dg.partition_loading_context(dynamic_partitions_store=instance), \
                dg.build_sensor_context(instance=instance, cursor=cursor,
                                        repository_def=defs.get_repository_def()) as context:
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
        # The export (and analysis) for the score table, and s1's contact sheets, which the run
        # changed without redrawing them.
        export, grid = _sensor_on(instance, scored)
        assert (export.run_key, export.job_name) == (f"export-after-{scored.run_id}", "export_job")
        assert (grid.run_key, grid.job_name) == (f"grid-after-{scored.run_id}-s1", "image_grid_job")
        assert grid.partition_key == "s1"
        assert _sensor_on(instance, sampled) is None
        assert _sensor_on(instance, exported) is None

        # As the daemon evaluates it: runs that need nothing do not hold up the tick, so the
        # first tick looks past both of them to the run that scored.
        requests, cursors = _ticks(sensor, instance, first.cursor, 2)
        assert requests == [[f"export-after-{scored.run_id}", f"grid-after-{scored.run_id}-s1"], []]
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

        assert [r.run_key for r in _sensor_on(instance, partial, "export_after_failed_run")] == [
            f"export-after-{partial.run_id}", f"grid-after-{partial.run_id}-f1"]
        # No score table: no export; its new images still get their contact sheets.
        assert [r.run_key for r in _sensor_on(instance, failed, "export_after_failed_run")] == [
            f"grid-after-{failed.run_id}-f2"]
        requests, _ = _ticks(sensor, instance, first.cursor, 2)
        assert requests == [[f"export-after-{partial.run_id}", f"grid-after-{partial.run_id}-f1"],
                            [f"grid-after-{failed.run_id}-f2"]]
