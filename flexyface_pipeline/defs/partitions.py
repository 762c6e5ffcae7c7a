import dagster as dg

from flexyface_pipeline.lib.config import SweepConfigError, validate_sweep_name
from flexyface_pipeline.lib.store import SweepStore

# One partition per sweep. Sweeps appear over time (from the CLI, the UI or the schedule).
sweeps_partitions = dg.DynamicPartitionsDefinition(name="sweeps")


def remove_command(key: str) -> str:
    """The command that deletes the partition ``key``, quoted for the shell."""
    return "flexyface remove '" + key.replace("'", "'\"'\"'") + "'"


def sweep_keys(context: dg.AssetExecutionContext) -> list[str]:
    """The step's partition keys, each a valid sweep name.

    A partition added by hand (the UI's "Add partition", the instance API) may have a name no
    sweep can have: a path (``../x``), spaces, an empty name. Its step fails before anything is
    read or written, with one line naming the partition, why, and how to delete it.
    """
    keys = list(context.partition_keys)
    for key in keys:
        try:
            validate_sweep_name(key)
        except SweepConfigError as err:
            why = str(err).removeprefix(f"{err.field}: ")
            raise dg.Failure(
                description=f"partition {key!r} cannot be a sweep: {why}; nothing was read or written: "
                f"`{remove_command(key)}` deletes the partition",
                allow_retries=False,
            ) from None
    return keys


def require_tables(store: SweepStore, sweeps: list[str], tables: tuple[str, ...], asset: str) -> None:
    """Fail the step in one line, before anything is read or written, when a sweep lacks one of
    ``tables`` (``parameters``, ``images``): the step ``asset`` has nothing to work on yet."""
    makers = {"parameters": "sweep_parameters", "images": "generated_images"}
    for sweep in sweeps:
        for table in tables:
            if store.has_table(table, sweep):
                continue
            what, command = (("is not defined yet (no parameters)", f"flexyface sweep {sweep} --images N")
                             if table == "parameters" else ("has no images yet", f"flexyface sweep {sweep}"))
            raise dg.Failure(
                description=f"sweep {sweep} {what}, so {asset} has nothing to work on: materialize "
                f"{makers[table]} for it first (`{command}`)",
                allow_retries=False,
            )
