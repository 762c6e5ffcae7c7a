"""Adaptive sweeps the Dagster way: each round is a ``sweep_job`` run of the sweep's partition.

``sweep_parameters`` of an adaptive sweep tells the study the scored trials and appends the next
round's rows (``lib/tuning.py``); ``generated_images`` makes only the new images, the score assets
score them. ``tune_rounds`` requests the next round once a round's run succeeded, until the budget
is spent. Start a tuned sweep with ``flexyface tune`` or by materializing ``sweep_job`` with
``design: adaptive`` and the tag ``flexyface/tune`` set to the sweep's name.
"""

import os

import dagster as dg

from flexyface_pipeline.defs.jobs import sweep_job
from flexyface_pipeline.lib.store import SweepStore

TUNE_TAG = "flexyface/tune"


def study_storage(instance: dg.DagsterInstance, store: SweepStore) -> str:
    """The study's database: the instance's PostgreSQL server, or ``optuna.db`` beside a SQLite
    instance (under DAGSTER_HOME; the data directory for an instance without a home)."""
    from flexyface_pipeline.lib.tuning import postgres_url, sqlite_url

    if "postgres" in type(instance.run_storage).__name__.lower():
        return postgres_url(os.environ)
    root = getattr(instance, "root_directory", None)
    return sqlite_url(root if root else store.root)


def tuning_finished(instance: dg.DagsterInstance, store: SweepStore, sweep: str) -> bool:
    """Whether an adaptive sweep has spent its budget with every trial told."""
    from flexyface_pipeline.lib.config import SweepSpec
    from flexyface_pipeline.lib.tuning import Tuner

    stored = store.read_spec_dict(sweep)
    if stored is None:
        return True
    spec = SweepSpec.from_dict(stored)
    if spec.design != "adaptive":
        return True
    tuner = Tuner(spec, study_storage(instance, store))
    return tuner.finished() >= tuner.total


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[sweep_job],
    request_job=sweep_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a successful round of an adaptive sweep (a sweep_job run tagged flexyface/tune), requests "
    "the next round of the same partition until the sweep's budget is spent.",
)
def tune_rounds(context: dg.RunStatusSensorContext):
    run = context.dagster_run
    sweep = run.tags.get(TUNE_TAG)
    if not sweep:
        return None
    # The code location's data directory (the storage resource reads the same setting).
    store = SweepStore(os.environ.get("FLEXYFACE_DATA_DIR") or "data")
    if tuning_finished(context.instance, store, sweep):
        context.log.info("adaptive sweep %s: the budget is spent", sweep)
        return None
    return dg.RunRequest(run_key=f"tune-{sweep}-{run.run_id}", partition_key=sweep, tags={TUNE_TAG: sweep})
