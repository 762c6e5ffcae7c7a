"""Scheduled sweeps, and the sensor that refreshes the export after sweeps finish."""


import dagster as dg

from flexyface_pipeline.defs.jobs import export_job, sweep_job
from flexyface_pipeline.defs.partitions import sweeps_partitions

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

    Off until a user turns it on (UI: Automation → schedule → toggle, or
    ``dagster schedule start <name>``). The run goes through the run queue, so it waits for the
    ``gpu`` pool like any other run.
    """

    @dg.schedule(name=name, cron_schedule=cron, job=sweep_job, default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Adds and runs a dated sweep ({sweep_config['num_images']} images) on {cron!r}.")
    def _schedule(context: dg.ScheduleEvaluationContext):
        when = context.scheduled_execution_time
        sweep = f"{prefix}-{when:%Y-%m-%d}"
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


nightly_sweep_schedule = build_sweep_schedule("nightly_sweep", "0 2 * * *", NIGHTLY_SWEEP, prefix="nightly")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[sweep_job],
    request_job=export_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Merges all sweeps into data/exports/ after a sweep run succeeds.",
)
def export_after_sweep(context: dg.RunStatusSensorContext):
    return dg.RunRequest(run_key=f"export-after-{context.dagster_run.run_id}")
