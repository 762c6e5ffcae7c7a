"""Scheduled sweeps, and the sensor that refreshes the export after score tables change."""

import datetime as dt

import dagster as dg

from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.jobs import export_job, sweep_job
from flexyface_pipeline.defs.partitions import sweeps_partitions

# Schedules run on UTC, and a dated sweep is named after the UTC date of its tick.
SCHEDULE_TIMEZONE = "UTC"

# The sweep a scheduled run samples (the `sweep_parameters` config); the seed of each dated sweep
# differs because its name does.
NIGHTLY_SWEEP = {
    "num_images": 200,
    "steps_min": 8,
    "steps_max": 48,
    "guidance_min": 1.0,
    "guidance_max": 8.0,
    "width": 512,
    "height": 512,
    "prompt_files": ["portraits.txt"],
    "prompts": [],
    "base_seed": 0,
    "engine": "realvis_xl",
}


def build_sweep_schedule(name: str, cron: str, sweep_config: dict, prefix: str) -> dg.ScheduleDefinition:
    """A schedule that adds a dated sweep partition (``<prefix>-YYYY-MM-DD``) and launches it.

    ``cron`` is read in UTC, and the date in the sweep's name is the UTC date of the tick.

    Off until a user turns it on (UI: Automation → schedule → toggle, or
    ``dagster schedule start <name>``). The run goes through the run queue, so it waits for the
    ``gpu`` pool like any other run.
    """

    @dg.schedule(name=name, cron_schedule=cron, job=sweep_job, execution_timezone=SCHEDULE_TIMEZONE,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Adds and runs a dated sweep ({sweep_config['num_images']} images) on {cron!r} "
                 f"({SCHEDULE_TIMEZONE}).")
    def _schedule(context: dg.ScheduleEvaluationContext):
        sweep = f"{prefix}-{_utc(context.scheduled_execution_time):%Y-%m-%d}"
        if not context.instance.has_dynamic_partition(sweeps_partitions.name, sweep):
            context.instance.add_dynamic_partitions(sweeps_partitions.name, [sweep])
            context.log.info("added sweep partition %s", sweep)
        return dg.RunRequest(
            run_key=sweep,
            partition_key=sweep,
            run_config={"ops": {"sweep_parameters": {"config": dict(sweep_config)}}},
            tags={"flexyface/scheduled": "true"},
        )

    return _schedule


def _utc(when: dt.datetime | None) -> dt.datetime:
    """The tick's time in UTC (a time without zone is taken as UTC; no time: now)."""
    if when is None:
        return dt.datetime.now(dt.timezone.utc)
    if when.tzinfo is None:
        return when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc)


nightly_sweep_schedule = build_sweep_schedule("nightly_sweep", "0 2 * * *", NIGHTLY_SWEEP, prefix="nightly")


SCORE_ASSET_KEYS = frozenset(asset.key for asset in score_assets)


def _export_request(context: dg.RunStatusSensorContext) -> dg.RunRequest | None:
    """An export run for a run that materialized a score table; None for any other run.

    None, not a SkipReason: a run status sensor ends its tick at the first run for which it
    returns something, so skipping with None lets one tick look past any number of such runs."""
    run = context.dagster_run
    if run.job_name == export_job.name:
        context.log.debug("run %s is an export run", run.run_id)
        return None
    records = context.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    keys = {r.dagster_event.asset_key for r in records if r.dagster_event is not None} & SCORE_ASSET_KEYS
    if not keys:
        context.log.debug("run %s (%s) materialized no score table", run.run_id, run.job_name)
        return None
    scored = ", ".join(sorted(key.to_user_string() for key in keys))
    context.log.info("run %s (%s, %s) materialized %s: refreshing the export", run.run_id, run.job_name,
                     run.status.value.lower(), scored)
    return dg.RunRequest(run_key=f"export-after-{run.run_id}")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    # No monitored_jobs: every job of this code location, including the implicit asset job behind
    # materializations from the Assets page and backfills. The function picks the runs that count.
    request_job=export_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Merges all sweeps into data/exports/ (and refreshes the analysis) after a successful run of "
    "this code location that materialized a score table (clip_scores, aesthetic_scores, aes_v2_scores, "
    "hps_v2_scores): sweep_job, the Assets page, backfills.",
)
def export_after_sweep(context: dg.RunStatusSensorContext):
    return _export_request(context)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.FAILURE,
    request_job=export_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="As export_after_sweep, for a failed run that materialized a score table before or beside "
    "the step that failed (the tables it wrote are complete and newer than the export).",
)
def export_after_failed_run(context: dg.RunStatusSensorContext):
    return _export_request(context)
