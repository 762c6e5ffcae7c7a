"""``start_sweep``: start a sweep from the UI or a schedule with nothing to guess and nothing left behind.

``start_sweep`` is an unpartitioned job whose config is the sweep's name plus every setting of
``sweep_parameters`` (the launchpad lists them with their defaults). Its run validates the
settings — a bad one fails the run with one line naming it, before anything is written — then adds
the sweep's partition (refused in one line while a ``flexyface`` command is running that sweep). The
sensor ``launch_started_sweep`` then requests ``sweep_job`` on that partition with the same settings.
Nothing is created when a launch is only previewed, when the launchpad refuses a config, or when the
settings are invalid: the partition exists only once a valid start run has executed.
"""

import dagster as dg
from pydantic import Field

from flexyface_pipeline.defs.assets.sweep import SweepConfig, resolve_spec
from flexyface_pipeline.defs.jobs import sweep_job
from flexyface_pipeline.defs.partitions import sweeps_partitions
from flexyface_pipeline.defs.resources import ModelResource, StorageResource
from flexyface_pipeline.lib.config import SweepConfigError, validate_sweep_name
from flexyface_pipeline.lib.settings import SettingError
from flexyface_pipeline.lib.store import SweepBusyError

START_OP = "prepare_sweep"
STARTED_BY_TAG = "flexyface/started_by"
SCHEDULED_TAG = "flexyface/scheduled"


class StartSweepConfig(SweepConfig):
    """A sweep's name and the settings of ``sweep_parameters`` (leave ``num_images`` unset to run an
    existing sweep again with its stored settings)."""

    sweep: str = Field(description="Sweep name (the partition key): letters, digits, '.', '_' and '-'.")


def sweep_settings(config: dict) -> dict:
    """The ``sweep_parameters`` config inside a ``start_sweep`` config (everything but the name)."""
    return {key: value for key, value in config.items() if key != "sweep"}


def start_run_config(sweep: str, settings: dict) -> dict:
    """The run config of ``start_sweep`` for ``sweep`` with ``sweep_parameters`` settings ``settings``."""
    return {"ops": {START_OP: {"config": {"sweep": sweep, **settings}}}}


@dg.op(name=START_OP, description="Validates the sweep's settings, then adds its partition; the sensor "
       "launch_started_sweep launches sweep_job on it.")
def start_sweep_op(context: dg.OpExecutionContext, config: StartSweepConfig, storage: StorageResource,
                   models: ModelResource) -> None:
    store = storage.store()
    try:
        validate_sweep_name(config.sweep)
        settings = SweepConfig(**sweep_settings(config.model_dump()))
        spec = resolve_spec(settings, config.sweep, store)
        models.check_available(spec.engines)  # the models' settings were checked when the run started
    except (SweepConfigError, SettingError) as err:
        # One line naming the setting; nothing has been written.
        raise dg.Failure(description=f"invalid sweep {config.sweep!r}: {err}", allow_retries=False) from None
    # A `flexyface` command running the sweep holds its claim: refused in one line, nothing added.
    holder = store.claim_holder(config.sweep)
    if holder is not None:
        raise dg.Failure(description=str(SweepBusyError(config.sweep, holder, again="launch start_sweep again")),
                         allow_retries=False)
    if context.instance.has_dynamic_partition(sweeps_partitions.name, config.sweep):
        context.log.info("sweep %s exists: it runs again with %s", config.sweep,
                         "new settings (it is redefined)" if settings.defines_sweep() else "its stored settings")
    else:
        context.instance.add_dynamic_partitions(sweeps_partitions.name, [config.sweep])
        context.log.info("added sweep partition %s", config.sweep)
    context.log.info("sweep %s: %d images; launch_started_sweep starts sweep_job on it", config.sweep,
                     spec.num_images)


def _launchpad_defaults() -> dict:
    """What the launchpad opens with: the two settings a new sweep needs, to be filled in (an empty
    name is refused when the run starts, before anything is written), then every setting that has a
    default, with it (the settings whose default is "unset" are listed in the launchpad's schema)."""
    settings: dict = {"sweep": "", "num_images": 24}
    for name, field in SweepConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if name not in settings and default is not None:
            settings[name] = default
    return {"ops": {START_OP: {"config": settings}}}


LAUNCHPAD_DEFAULTS = _launchpad_defaults()


@dg.job(name="start_sweep", config=LAUNCHPAD_DEFAULTS, description="Start a sweep: validates the settings, adds the sweep's partition, "
        "then the sensor launch_started_sweep runs sweep_job on it (generate, score, contact sheets; the export "
        "follows). Set `sweep` and `num_images`; every other setting shows its default.")
def start_sweep_job():
    start_sweep_op()


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[start_sweep_job],
    request_job=sweep_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=5,
    description="Launches sweep_job on the sweep that a successful start_sweep run added, with its settings.",
)
def launch_started_sweep(context: dg.RunStatusSensorContext):
    run = context.dagster_run
    config = run.run_config.get("ops", {}).get(START_OP, {}).get("config", {})
    sweep = config.get("sweep")
    if not sweep:
        context.log.warning("run %s of start_sweep has no sweep name in its config", run.run_id)
        return None
    tags = {STARTED_BY_TAG: run.run_id}
    if SCHEDULED_TAG in run.tags:
        tags[SCHEDULED_TAG] = run.tags[SCHEDULED_TAG]
    context.log.info("run %s started sweep %s: requesting sweep_job", run.run_id, sweep)
    return dg.RunRequest(
        run_key=f"sweep-after-{run.run_id}",
        partition_key=sweep,
        run_config={"ops": {"sweep_parameters": {"config": sweep_settings(config)}}},
        tags=tags,
    )
