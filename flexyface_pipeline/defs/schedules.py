"""Scheduled sweeps, and the sensors that refresh the export, the analysis and the contact sheets
after images or score tables change."""

import datetime as dt
import os

import dagster as dg

from flexyface_pipeline.defs.assets.analysis import image_grid
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import SweepConfig, generated_images, resolve_spec
from flexyface_pipeline.defs.jobs import export_job, grid_job
from flexyface_pipeline.defs.resources import StorageResource
from flexyface_pipeline.defs.start import SCHEDULED_TAG, start_run_config, start_sweep_job
from flexyface_pipeline.lib.config import SweepConfigError
from flexyface_pipeline.lib.settings import (  # noqa: F401 (NIGHTLY_DEFAULTS: the defaults, shown in tests)
    NIGHTLY_DEFAULTS,
    NIGHTLY_SETTINGS,
    SettingError,
    nightly_settings,
)

# Schedules run on UTC, and a dated sweep is named after the UTC date of its tick.
SCHEDULE_TIMEZONE = "UTC"

# What a scheduled sweep samples: environment variables read when the schedule is evaluated (the
# code location reads .env), so changing them needs no code change and no reload. With the tiny
# model profile (the demo's) the defaults are the demo's small, fast sweep; otherwise a real one.
# They are checked with every other setting (lib/settings.py).
NIGHTLY_ENV = NIGHTLY_SETTINGS


def build_sweep_schedule(name: str, cron: str, prefix: str) -> dg.ScheduleDefinition:
    """A schedule that starts a dated sweep (``<prefix>-YYYY-MM-DD``) through ``start_sweep``.

    ``cron`` is read in UTC, and the date in the sweep's name is the UTC date of the tick. The
    evaluation only validates and requests a ``start_sweep`` run: a tick that is previewed in the
    UI ("Preview tick result") or skipped creates nothing; the partition is added when the start
    run executes, and ``launch_started_sweep`` then launches the sweep. A bad ``FLEXYFACE_NIGHTLY_*``
    setting skips the tick with one line naming it.

    Off until a user turns it on (UI: Automation → schedule → toggle, or
    ``dagster schedule start <name>``). The runs go through the run queue, so the sweep waits for
    the ``gpu`` pool like any other run.
    """

    @dg.schedule(name=name, cron_schedule=cron, job=start_sweep_job, execution_timezone=SCHEDULE_TIMEZONE,
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Starts a dated sweep {prefix}-YYYY-MM-DD on {cron!r} ({SCHEDULE_TIMEZONE}) with the "
                 "FLEXYFACE_NIGHTLY_IMAGES, _WIDTH, _HEIGHT, _PROMPT_FILE and _ENGINE settings (defaults: 200 "
                 "images, 512x512, portraits.txt, realvis_xl; with the tiny profile the demo's 96 images at 64x64).")
    def _schedule(context: dg.ScheduleEvaluationContext, storage: StorageResource):
        sweep = f"{prefix}-{_utc(context.scheduled_execution_time):%Y-%m-%d}"
        try:
            settings = nightly_settings(os.environ)
            resolve_spec(SweepConfig(**settings), sweep, storage.store())
        except (SettingError, SweepConfigError) as err:
            return dg.SkipReason(f"nightly sweep {sweep} not started: {err} (FLEXYFACE_NIGHTLY_* settings)")
        return dg.RunRequest(
            run_key=sweep,
            run_config=start_run_config(sweep, settings),
            tags={SCHEDULED_TAG: "true"},
        )

    return _schedule


def _utc(when: dt.datetime | None) -> dt.datetime:
    """The tick's time in UTC (a time without zone is taken as UTC; no time: now)."""
    if when is None:
        return dt.datetime.now(dt.timezone.utc)
    if when.tzinfo is None:
        return when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc)


nightly_sweep_schedule = build_sweep_schedule("nightly_sweep", "0 2 * * *", prefix="nightly")


SCORE_ASSET_KEYS = frozenset(asset.key for asset in score_assets)
# What the contact sheets show: the images and every score.
GRID_INPUT_KEYS = SCORE_ASSET_KEYS | {generated_images.key}


def _refresh_requests(context: dg.RunStatusSensorContext) -> list[dg.RunRequest] | None:
    """For a run that materialized a score table: an export run (the export and the analysis). For
    a run that changed a sweep's images or scores without redrawing its contact sheets afterwards:
    an ``image_grid_job`` run per such sweep. None for any other run.

    None, not a SkipReason: a run status sensor ends its tick at the first run for which it
    returns something, so skipping with None lets one tick look past any number of such runs."""
    run = context.dagster_run
    if run.job_name in (export_job.name, grid_job.name):
        context.log.debug("run %s is a refresh run", run.run_id)
        return None
    records = context.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    last_change: dict[str, int] = {}  # sweep -> index of the last images/score materialization
    last_grid: dict[str, int] = {}
    scored: set[dg.AssetKey] = set()
    for index, record in enumerate(records):
        event = record.dagster_event
        if event is None or event.asset_key is None:
            continue
        partition = event.partition
        if event.asset_key in SCORE_ASSET_KEYS:
            scored.add(event.asset_key)
        if event.asset_key in GRID_INPUT_KEYS and partition:
            last_change[partition] = index
        elif event.asset_key == image_grid.key and partition:
            last_grid[partition] = index
    requests = []
    if scored:
        names = ", ".join(sorted(key.to_user_string() for key in scored))
        context.log.info("run %s (%s, %s) materialized %s: refreshing the export", run.run_id, run.job_name,
                         run.status.value.lower(), names)
        requests.append(dg.RunRequest(run_key=f"export-after-{run.run_id}", job_name=export_job.name))
    for sweep in sorted(last_change):
        if last_grid.get(sweep, -1) > last_change[sweep]:
            continue  # the run redrew the sheets after the change
        context.log.info("run %s changed sweep %s: redrawing its contact sheets", run.run_id, sweep)
        requests.append(dg.RunRequest(run_key=f"grid-after-{run.run_id}-{sweep}", job_name=grid_job.name,
                                      partition_key=sweep))
    if not requests:
        context.log.debug("run %s (%s) changed no score table or image", run.run_id, run.job_name)
        return None
    return requests


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    # No monitored_jobs: every job of this code location, including the implicit asset job behind
    # materializations from the Assets page and backfills. The function picks the runs that count.
    request_jobs=[export_job, grid_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="After a successful run of this code location that materialized a score table (clip_scores, "
    "aesthetic_scores, aes_v2_scores, hps_v2_scores): merges all sweeps into data/exports/ and refreshes the "
    "analysis (export_job). After one that changed a sweep's images or scores without redrawing its contact "
    "sheets (a re-score from the Assets page): redraws them (image_grid_job).",
)
def export_after_sweep(context: dg.RunStatusSensorContext):
    return _refresh_requests(context)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.FAILURE,
    request_jobs=[export_job, grid_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="As export_after_sweep, for a failed run that materialized a score table or images before or "
    "beside the step that failed (the tables it wrote are complete and newer than the export).",
)
def export_after_failed_run(context: dg.RunStatusSensorContext):
    return _refresh_requests(context)
