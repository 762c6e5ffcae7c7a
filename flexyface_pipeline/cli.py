"""``flexyface``: start, grow and re-score sweeps from the shell.

Runs go through the Dagster instance named by ``DAGSTER_HOME``, so they show up in the UI like runs
launched there. ``.env`` in the current directory is read first; a variable already set in the
environment keeps its value (the ``dagster`` CLI does the opposite: its ``.env`` values replace
exported ones). A failed run ends the command with one line saying which step failed and why, and
exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

logger = logging.getLogger("flexyface")


class CliError(Exception):
    """A failure the command reports in one line (exit status 1)."""


def _load_dotenv() -> None:
    """Read ``.env`` from the current directory; exported variables win (``override=False``)."""
    from dotenv import load_dotenv

    path = Path.cwd() / ".env"
    if path.is_file():
        load_dotenv(path, override=False)


@contextlib.contextmanager
def _instance() -> Iterator[Any]:
    """The instance of ``DAGSTER_HOME``, entered for the command: definitions resolved meanwhile
    read their state from it, and it is disposed of afterwards."""
    import dagster as dg

    import fcntl

    from flexyface_pipeline.defs.recovery import recover_dead_runs
    from flexyface_pipeline.lib.settings import check_instance

    check_instance(os.environ)  # dagster.yaml present, its PostgreSQL answering: before Dagster's own retries
    home = Path(os.environ["DAGSTER_HOME"])
    # Opening a new SQLite instance creates its databases and schema: two commands started at once
    # would both do it (and leave two schema versions), so instances are opened one at a time.
    with open(home / ".open.lock", "a") as opening:
        fcntl.flock(opening, fcntl.LOCK_EX)
        instance = dg.DagsterInstance.get()
        fcntl.flock(opening, fcntl.LOCK_UN)
    with instance:
        if not _has_gpu_limit(instance):
            raise CliError(
                f"the instance at {home} sets no limit for the pool 'gpu' (two runs could hold GPU models at "
                "once): run `make instance`, or `dagster instance concurrency set gpu 1`"
            )
        recover_dead_runs(instance, logger)  # a killed run must not keep the gpu slot
        yield instance


def _has_gpu_limit(instance: Any) -> bool:
    """Whether the instance limits the pool ``gpu``: its own limit, or the instance's default."""
    if instance.get_concurrency_config().pool_config.default_pool_limit is not None:
        return True
    return "gpu" in set(instance.event_log_storage.get_concurrency_keys())


def _tags() -> dict[str, str]:
    import socket

    from flexyface_pipeline.defs.recovery import HOST_TAG

    return {HOST_TAG: socket.gethostname()}


def _storage_root() -> Path:
    data_dir = os.environ.get("FLEXYFACE_DATA_DIR")
    if not data_dir:
        raise CliError("FLEXYFACE_DATA_DIR is not set: run `make setup` (it writes .env) or export it")
    return Path(data_dir)


def _axis_settings(args: argparse.Namespace) -> dict:
    """Steps and guidance from the command line: MIN MAX ranges, or axis values for the grid."""
    from flexyface_pipeline.lib.config import SweepConfigError, parse_axis

    out: dict = {}
    design = getattr(args, "design", "random")
    for name, integer in (("steps", True), ("guidance", False)):
        texts = getattr(args, name)
        if texts is None:
            continue
        values = parse_axis(name, texts, integer=integer)
        if design == "grid":
            out[f"{name}_values"] = values
        elif len(texts) != 2 or len(values) != 2:
            raise SweepConfigError(name, f"give MIN MAX (got {' '.join(texts)}); lists of values are for --design grid")
        else:
            out[f"{name}_min"], out[f"{name}_max"] = values
    return out


def _sweep_run_config(args: argparse.Namespace) -> dict:
    config = {
        "num_images": args.images,
        "width": args.width,
        "height": args.height,
        "prompt_files": args.prompt_file or ([] if args.prompt else ["portraits.txt"]),
        "prompts": args.prompt or [],
        "base_seed": args.seed,
        "engines": args.engine or [],
        "design": args.design,
        "sizes": args.size or [],
        "schedulers": args.scheduler or [],
        "seeds_per_cell": args.seeds_per_cell,
        **_axis_settings(args),
    }
    if args.design == "adaptive":
        config.update(rounds=args.rounds, objective=args.metric)
    return {"ops": {"sweep_parameters": {"config": config}}}


def _validate_sweep(args: argparse.Namespace) -> None:
    """Fail on bad settings before anything is written or loaded: the sweep's definition (or the
    stored one it runs again), and with real weights offline the weights it needs."""
    from flexyface_pipeline.defs.assets.sweep import SweepConfig, resolve_spec
    from flexyface_pipeline.lib.config import METRICS, validate_sweep_name
    from flexyface_pipeline.lib.settings import check_environment, check_weights_available
    from flexyface_pipeline.lib.store import SweepStore

    validate_sweep_name(args.name)
    cfg = _sweep_run_config(args)["ops"]["sweep_parameters"]["config"]
    spec = resolve_spec(SweepConfig(**cfg), args.name, SweepStore(_storage_root()))
    settings = getattr(args, "settings", None) or check_environment(os.environ)
    if settings.profile == "real" and settings.offline:
        check_weights_available(settings.locations, spec.engines, METRICS)


def _error_line(error) -> str:
    """The first line of the error that caused a failure, past the errors dagster wraps it in."""
    while error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    lines = error.message.strip().splitlines()
    text = lines[0] if lines else ""
    head, sep, rest = text.partition(": ")
    if sep and head.endswith(error.cls_name):
        text = f"{error.cls_name}: {rest}"  # without the module path
    return text or error.cls_name


def _failure(result) -> str:
    """Where and why a run failed: the failed step (or the resources, or the run) and its error."""
    import dagster as dg

    kinds = (dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RESOURCE_INIT_FAILURE,
             dg.DagsterEventType.RUN_FAILURE)
    for kind in kinds:
        for event in result.all_events:
            if event.event_type != kind:
                continue
            error = getattr(event.event_specific_data, "error", None)
            why = _error_line(error) if error is not None else (event.message or "no error recorded")
            where = {dg.DagsterEventType.STEP_FAILURE: f"step {event.step_key}: ",
                     dg.DagsterEventType.RESOURCE_INIT_FAILURE: "setting up resources: "}.get(kind, "")
            return where + why
    return "no failure event recorded"


def _problem(result, what: str) -> str | None:
    """Why the run did not do its job: a failure, or a failed check of ERROR severity (which
    does not fail the run, but means its data must not be trusted); None when all is well."""
    import dagster as dg

    if not result.success:
        detail = " ".join(_failure(result).split())
        return f"{what} failed (run {result.run_id}): {detail}"
    failed = [e for e in result.get_asset_check_evaluations()
              if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR]
    if failed:
        detail = "; ".join(f"{e.asset_key.to_user_string()}.{e.check_name}: "
                           f"{' '.join((e.description or 'failed').split())}" for e in failed)
        return f"{what}: {len(failed)} check(s) failed (run {result.run_id}): {detail}"
    return None


def _check(result, what: str) -> None:
    problem = _problem(result, what)
    if problem:
        raise CliError(problem)


def _scored(result) -> bool:
    """Whether the run wrote a score table (then the export is out of date, even if it failed)."""
    from flexyface_pipeline.defs.schedules import SCORE_ASSET_KEYS

    return any(e.asset_key in SCORE_ASSET_KEYS for e in result.get_asset_materialization_events()
               if e.asset_key is not None)


def _finish(results: list, problem: str | None, args: argparse.Namespace) -> None:
    """Export unless told not to, and if the runs wrote any score table even when one failed
    (the tables written are complete); then report the problem, if any."""
    if not args.no_export and (problem is None or any(_scored(r) for r in results)):
        if problem is None:
            run_export(args)
        else:
            logger.warning("refreshing the export with the score tables written before the problem")
            try:
                run_export(args)
            except CliError as err:  # reported too, but the run's own problem comes last
                logger.error("%s", err)
    if problem is not None:
        raise CliError(problem)


def _no_export_selection(args: argparse.Namespace) -> list | None:
    """With --no-export nothing is written under data/exports/: the sweep's assets without its
    contact sheets (``image_grid``); None (the whole job) otherwise."""
    if not getattr(args, "no_export", False):
        return None
    import dagster as dg

    from flexyface_pipeline.lib.export import SCORE_TABLES

    return [dg.AssetKey(k) for k in ("sweep_parameters", "generated_images", *(t for t, _ in SCORE_TABLES.values()))]


def _claim(claims: contextlib.ExitStack, sweeps: Sequence[str], *, skip_busy: bool = False) -> dict[str, Any]:
    """Claim each sweep for this command (``SweepStore.claim``), held until ``claims`` closes: a
    command that finds a sweep claimed by another ends with one line naming it and its holder, or,
    with ``skip_busy``, leaves it out with a warning. Taken after the input is validated, so a
    refused command writes nothing. Returns the claims taken, by sweep."""
    from flexyface_pipeline.lib.store import SweepBusyError, SweepStore, describe_holder

    store = SweepStore(_storage_root())
    claimed = {}
    for sweep in sweeps:
        try:
            claim = claims.enter_context(store.claim(sweep))
        except SweepBusyError as err:
            if not skip_busy:
                raise CliError(str(err)) from None
            logger.warning("skipping sweep %s: another command is running it (%s)", sweep,
                           describe_holder(err.holder))
        else:
            claimed[sweep] = claim
    return claimed


def run_sweep(args: argparse.Namespace) -> None:
    from flexyface_pipeline.definitions import defs
    from flexyface_pipeline.defs.partitions import sweeps_partitions

    if args.design == "adaptive":
        raise CliError("an adaptive sweep runs in rounds: use `flexyface tune NAME --engine E --budget N`")
    _validate_sweep(args)
    with contextlib.ExitStack() as claims:  # the sweep is this command's until it has exported
        with _instance() as instance:
            _claim(claims, [args.name])  # a second command on the sweep stops here, having written nothing
            if not instance.has_dynamic_partition(sweeps_partitions.name, args.name):
                instance.add_dynamic_partitions(sweeps_partitions.name, [args.name])
                logger.info("added sweep partition %s", args.name)
            job = defs.resolve_job_def("sweep_job")
            result = job.execute_in_process(instance=instance, partition_key=args.name,
                                            run_config=_sweep_run_config(args), tags=_tags(), raise_on_error=False,
                                            asset_selection=_no_export_selection(args))
        _finish([result], _problem(result, f"sweep {args.name}"), args)


def run_tune(args: argparse.Namespace) -> None:
    """An adaptive sweep: rounds of sweep_job runs, each asking the study for the next trials."""
    from flexyface_pipeline.definitions import defs
    from flexyface_pipeline.defs.partitions import sweeps_partitions
    from flexyface_pipeline.defs.tuning import TUNE_TAG, tuning_finished
    from flexyface_pipeline.lib.store import SweepStore

    args.images, args.design, args.size, args.seeds_per_cell = args.budget, "adaptive", args.size, 1
    args.engine = [args.engine]
    _validate_sweep(args)
    store = SweepStore(_storage_root())
    results, problem = [], None
    with contextlib.ExitStack() as claims:  # the sweep is this command's for every round and the export
        with _instance() as instance:
            _claim(claims, [args.name])
            if not instance.has_dynamic_partition(sweeps_partitions.name, args.name):
                instance.add_dynamic_partitions(sweeps_partitions.name, [args.name])
                logger.info("added sweep partition %s", args.name)
            job = defs.resolve_job_def("sweep_job")
            # Each round's run repeats the definition (unchanged: nothing is dropped) and grows the sweep;
            # a round more than asked covers a run that stopped after asking and before writing.
            for number in range(1, args.rounds + 2):
                if tuning_finished(instance, store, args.name) and store.has_table("parameters", args.name):
                    break
                logger.info("tuning %s: round %d", args.name, number)
                results.append(job.execute_in_process(
                    instance=instance, partition_key=args.name, run_config=_sweep_run_config(args),
                    tags=_tags() | {TUNE_TAG: args.name}, raise_on_error=False,
                    asset_selection=_no_export_selection(args)))
                problem = _problem(results[-1], f"tuning {args.name}, round {number}")
                if problem is not None:
                    break
        _finish(results, problem, args)


def run_export(args: argparse.Namespace) -> None:
    from flexyface_pipeline.definitions import defs

    strict = bool(getattr(args, "strict", False))
    with _instance() as instance:
        result = defs.resolve_job_def("export_job").execute_in_process(
            instance=instance, tags=_tags(), raise_on_error=False,
            run_config={"ops": {"sweep_results": {"config": {"strict": strict}}}})
    for event in result.get_asset_materialization_events():
        entry = event.materialization.metadata.get("damaged_sweeps")
        for sweep, why in sorted((entry.value if entry is not None else {}).items()):
            logger.warning("sweep %s left out of the export: %s", sweep, why)
    _check(result, "export")
    exports = _storage_root() / "exports"
    logger.info("exports written under %s", exports)
    for path in sorted(exports.glob("*")):
        if path.is_file() and not path.name.startswith("."):
            sys.stdout.write(f"{path}\n")


def run_rescore(args: argparse.Namespace) -> None:
    """Score sweeps again. Each sweep is claimed for the command: with --sweep one that another
    command is running ends the command before anything is re-scored; with --all such sweeps are
    skipped with a warning (like those without images) and the others are re-scored."""
    import dagster as dg

    from flexyface_pipeline.definitions import defs
    from flexyface_pipeline.defs.partitions import sweeps_partitions
    from flexyface_pipeline.lib.config import validate_metrics
    from flexyface_pipeline.lib.export import SCORE_TABLES
    from flexyface_pipeline.lib.store import SweepStore

    metrics = validate_metrics(args.metric)
    with contextlib.ExitStack() as claims:  # the sweeps re-scored are this command's until it has exported
        with _instance() as instance:
            known = instance.get_dynamic_partitions(sweeps_partitions.name)
            if args.all:
                if not known:
                    raise CliError("there is no sweep to re-score yet")
                store = SweepStore(_storage_root())
                invalid = [s for s in known if not _valid_name(s)]
                if invalid:
                    logger.warning("skipping partition(s) whose names are not valid sweep names: %s",
                                   ", ".join(invalid))
                no_images = [s for s in known if s not in invalid and not store.has_table("images", s)]
                if no_images:
                    logger.warning("skipping %d sweep(s) without images yet: %s", len(no_images), ", ".join(no_images))
                skipped = invalid + no_images
                if len(skipped) == len(known):
                    raise CliError(f"no sweep has images yet (sweeps: {', '.join(known)})")
                # A sweep another command is running is skipped with a warning; the others are re-scored.
                claimed = _claim(claims, [s for s in known if s not in skipped], skip_busy=True)
                if not claimed:
                    raise CliError("every sweep with images is being run by another command: wait for them to "
                                   "finish, then run the command again")
                skipped += [s for s in known if s not in skipped and s not in claimed]
                # Runs over consecutive sweeps with images: a partition range would include a skipped sweep.
                blocks = [list(group) for has_images, group in groupby(known, key=lambda s: s not in skipped)
                          if has_images]
            else:
                unknown = [s for s in args.sweep if s not in known]
                if unknown:
                    raise CliError(f"unknown sweep(s) {unknown}; known sweeps: {known}")
                _require_images(args.sweep)  # a sweep with nothing to score: one line, before any run
                _claim(claims, [s for s in args.sweep if _valid_name(s)])  # one of them busy: nothing is re-scored
                blocks = [[sweep] for sweep in args.sweep]
            # The contact sheets print every score: redrawn after the new scores, in the same run.
            selection = [SCORE_TABLES[m][0] for m in metrics] + ([] if args.no_export else ["image_grid"])
            job = dg.define_asset_job("rescore", selection=selection)
            # --force: every image again; by default an image keeps a score that is still right.
            run_config = {"ops": {SCORE_TABLES[m][0]: {"config": {"rescore_all": bool(args.force)}} for m in metrics}}
            resolved = dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).resolve_job_def("rescore")
            results, problem = [], None
            for block in blocks:
                if len(block) > 1:
                    # One run over the block: the score assets' single-run backfill policy loads each model once.
                    tags = _tags() | {"dagster/asset_partition_range_start": block[0],
                                      "dagster/asset_partition_range_end": block[-1]}
                    results.append(resolved.execute_in_process(instance=instance, tags=tags, raise_on_error=False,
                                                               run_config=run_config))
                    problem = _problem(results[-1], f"re-scoring sweeps {block[0]} to {block[-1]}")
                else:
                    results.append(resolved.execute_in_process(instance=instance, partition_key=block[0],
                                                               run_config=run_config,
                                                               tags=_tags(), raise_on_error=False))
                    problem = _problem(results[-1], f"re-scoring {block[0]}")
                if problem is not None:
                    break
        _finish(results, problem, args)


def _valid_name(sweep: str) -> bool:
    from flexyface_pipeline.lib.config import SweepConfigError, validate_sweep_name

    try:
        validate_sweep_name(sweep)
    except SweepConfigError:
        return False
    return True


def _require_images(sweeps: Sequence[str]) -> None:
    """Refuse sweeps that have nothing to re-score, in one line naming the first and the fix: a
    partition whose name no sweep can have, a sweep never defined, a sweep without images."""
    from flexyface_pipeline.defs.partitions import remove_command
    from flexyface_pipeline.lib.store import SweepStore

    store = SweepStore(_storage_root())
    for sweep in sweeps:
        if not _valid_name(sweep):
            raise CliError(f"partition {sweep!r} is not a valid sweep name, so it has nothing to re-score: "
                           f"`{remove_command(sweep)}` deletes the partition")
        if not store.has_table("parameters", sweep):
            raise CliError(f"sweep {sweep} is not defined yet: run `flexyface sweep {sweep} --images N` first")
        if not store.has_table("images", sweep):
            raise CliError(f"sweep {sweep} has no images yet: run `flexyface sweep {sweep}` first")


def run_remove(args: argparse.Namespace) -> None:
    """Remove a sweep: its tables, images, contact sheets and partition; then refresh the export."""
    import shutil

    from flexyface_pipeline.defs.partitions import sweeps_partitions
    from flexyface_pipeline.lib.store import SweepStore

    with _instance() as instance:
        known = instance.get_dynamic_partitions(sweeps_partitions.name)
        store = SweepStore(_storage_root())
        folders = []
        if _valid_name(args.name):  # a partition added by hand may have a name no sweep can have: no files
            folders = [store.sweep_dir(args.name), store.images_dir(args.name),
                       store.exports_dir / "grids" / args.name]
        if args.name not in known and not any(f.exists() for f in folders):
            raise CliError(f"unknown sweep {args.name!r}; known sweeps: {known}")
        with contextlib.ExitStack() as claims:  # a sweep another command is running is not removed
            for claim in _claim(claims, [args.name] if folders else []).values():
                claim.discard = True  # the sweep is gone: so is its lock file
            for folder in [f for f in folders if f.exists()]:
                shutil.rmtree(folder)
                logger.info("removed %s", folder)
            if args.name in known:
                instance.delete_dynamic_partition(sweeps_partitions.name, args.name)
                logger.info("removed sweep partition %s", args.name)
    if not args.no_export:
        run_export(args)


def run_doctor(args: argparse.Namespace) -> None:
    """Check sweeps for damaged files; with --repair remove them and run what makes them again.
    --repair claims each sweep before examining it: a sweep named on the command line that another
    command is running ends the command; without names, such sweeps are skipped with a warning."""
    from flexyface_pipeline.definitions import defs
    from flexyface_pipeline.defs.partitions import sweeps_partitions
    from flexyface_pipeline.lib import doctor
    from flexyface_pipeline.lib.store import SweepStore

    store = SweepStore(_storage_root())
    with _instance() as instance:
        known = instance.get_dynamic_partitions(sweeps_partitions.name)
    unknown = [s for s in args.sweep if s not in known]
    if unknown:
        raise CliError(f"unknown sweep(s) {unknown}; known sweeps: {known}")
    sweeps = args.sweep or [s for s in known if _valid_name(s)]
    with contextlib.ExitStack() as claims:
        if args.repair:  # the sweeps repaired are this command's until it has exported
            sweeps = list(_claim(claims, sweeps, skip_busy=not args.sweep))
        diagnoses = [doctor.examine(store, sweep) for sweep in sweeps]
        damaged = [d for d in diagnoses if not d.healthy]
        for d in diagnoses:
            if d.healthy:
                sys.stdout.write(f"{d.sweep}: healthy\n")
            for finding in d.findings:
                sys.stdout.write(f"{d.sweep}: {finding.path}: {finding.problem}\n")
        if not damaged:
            return
        if not args.repair:
            raise CliError(f"{len(damaged)} damaged sweep(s): {', '.join(d.sweep for d in damaged)}; "
                           "run `flexyface doctor --repair` to repair them")
        unrepairable = [d for d in damaged if d.unrepairable]
        results, problem = [], None
        with _instance() as instance:
            for d in damaged:
                if d.unrepairable:
                    continue
                for line in doctor.clear(store, d):
                    sys.stdout.write(f"{d.sweep}: {line}\n")
                if d.regenerate:
                    job = defs.resolve_job_def("sweep_job")  # the stored settings: no run config
                    sys.stdout.write(f"{d.sweep}: running the sweep again (finished images are verified and kept)\n")
                    results.append(job.execute_in_process(instance=instance, partition_key=d.sweep, tags=_tags(),
                                                          raise_on_error=False))
                else:
                    import dagster as dg

                    from flexyface_pipeline.lib.export import SCORE_TABLES

                    sys.stdout.write(f"{d.sweep}: re-scoring {', '.join(d.rescore)}\n")
                    job = dg.define_asset_job("repair_scores", selection=[SCORE_TABLES[m][0] for m in d.rescore])
                    resolved = dg.Definitions.merge(defs, dg.Definitions(jobs=[job])).resolve_job_def("repair_scores")
                    results.append(resolved.execute_in_process(instance=instance, partition_key=d.sweep, tags=_tags(),
                                                               raise_on_error=False))
                problem = _problem(results[-1], f"repairing {d.sweep}")
                if problem is not None:
                    break
        if problem is None and unrepairable:
            problem = "; ".join(d.unrepairable for d in unrepairable)
        _finish(results, problem, args)


def run_recover(args: argparse.Namespace) -> None:
    """``_instance()`` already recovers; report what it found."""
    import dagster as dg

    with _instance() as instance:
        left = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    sys.stdout.write(f"{len(left)} run(s) still in progress\n")


def _add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", nargs="+", metavar="N",
                        help="MIN MAX (default: each engine's own range); grid: values or START:STOP:COUNT")
    parser.add_argument("--guidance", nargs="+", metavar="G",
                        help="MIN MAX (default: each engine's own range); grid: values or START:STOP:COUNT")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--size", nargs="+", metavar="WxH", help="size axis, e.g. 512x512 768x768")
    parser.add_argument("--scheduler", nargs="+", metavar="NAME", help="scheduler axis, e.g. Euler 'DPM++ 2M Karras'")
    parser.add_argument("--prompt-file", action="append", help="prompt file under data/prompts/ (repeatable)")
    parser.add_argument("--prompt", action="append", help="inline prompt (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="base seed")


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem and where the help is (not the usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and the traceback of a failure")
    parser = _Parser(prog="flexyface", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sweep = sub.add_parser("sweep", parents=[common], help="add a sweep partition, generate and score it, then export")
    sweep.add_argument("name", help="sweep name (the partition key): letters, digits, '.', '_', '-'")
    sweep.add_argument("--images", type=int, help="images per engine (the grid design derives it)")
    sweep.add_argument("--design", default="random",
                       help="random (default), grid (axis values), sobol (scrambled Sobol over the ranges)")
    _add_setting_arguments(sweep)
    sweep.add_argument("--seeds-per-cell", type=int, default=1, metavar="K",
                       help="grid: seeds per prompt and cell, the same K seeds in every cell of a prompt")
    sweep.add_argument("--engine", nargs="+", help="engine(s); several get the same prompts and seeds "
                       "(default realvis_xl)")
    sweep.add_argument("--no-export", action="store_true", help="skip merging into data/exports/")
    sweep.set_defaults(func=run_sweep)

    tune = sub.add_parser("tune", parents=[common], help="adaptive sweep: Optuna proposes each round's settings from the scores so far")
    tune.add_argument("name", help="sweep name (the partition key)")
    tune.add_argument("--engine", default="realvis_xl")
    tune.add_argument("--budget", type=int, required=True, help="images in all (one trial: an image per prompt)")
    tune.add_argument("--rounds", type=int, default=5, help="rounds of trials (default 5)")
    tune.add_argument("--metric", default="combined",
                      help="quality to maximise: combined (within-prompt z of every metric, default) or a metric")
    _add_setting_arguments(tune)
    tune.add_argument("--no-export", action="store_true", help="skip merging into data/exports/")
    tune.set_defaults(func=run_tune)

    rescore = sub.add_parser("rescore", parents=[common], help="recompute one or more metrics for some or all sweeps")
    rescore.add_argument("metric", nargs="+", help="clip_score, aesthetic_score, aes_v2_score, hps_v2_score")
    target = rescore.add_mutually_exclusive_group(required=True)
    target.add_argument("--sweep", action="append", help="sweep to re-score (repeatable)")
    target.add_argument("--all", action="store_true", help="every sweep that has images (the others are skipped)")
    rescore.add_argument("--force", action="store_true",
                         help="score every image again (by default an image whose bytes, weights and precision are "
                         "unchanged keeps its score)")
    rescore.add_argument("--no-export", action="store_true")
    rescore.set_defaults(func=run_rescore)

    remove = sub.add_parser("remove", parents=[common], help="delete a sweep (tables, images, contact sheets, partition), then export")
    remove.add_argument("name", help="the sweep to delete")
    remove.add_argument("--no-export", action="store_true")
    remove.set_defaults(func=run_remove)

    recover = sub.add_parser("recover", parents=[common], help="mark runs whose process died as failed and free their gpu slot")
    recover.set_defaults(func=run_recover)

    doctor = sub.add_parser("doctor", parents=[common], help="check sweeps for damaged files (tables, images, definitions)")
    doctor.add_argument("sweep", nargs="*", help="sweeps to check (default: all)")
    doctor.add_argument("--repair", action="store_true",
                        help="remove what is damaged and make it again (re-run the sweep or re-score a metric), "
                        "then refresh the export")
    doctor.add_argument("--no-export", action="store_true", help="do not refresh data/exports/ afterwards")
    doctor.set_defaults(func=run_doctor)

    check = sub.add_parser("check", parents=[common], help="check every FLEXYFACE_* setting and the instance, and "
                           "say what was found (nothing is written)")
    check.add_argument("--no-pool-limit", action="store_true",
                       help="do not require the gpu pool limit (checked before `make instance` sets it)")
    check.set_defaults(func=run_check)

    export = sub.add_parser("export", parents=[common], help="merge every sweep into data/exports/")
    export.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a sweep is damaged (its healthy sweeps are exported either way)")
    export.set_defaults(func=run_export)
    return parser


def run_check(args: argparse.Namespace) -> None:
    """The settings were checked before this runs; check the instance, then say what was found."""
    from flexyface_pipeline.lib.settings import check_instance

    settings = args.settings
    storage = check_instance(os.environ)
    if not args.no_pool_limit:
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            if not _has_gpu_limit(instance):
                raise CliError(f"the instance at {os.environ['DAGSTER_HOME']} sets no limit for the pool 'gpu': run "
                               "`make instance`, or `dagster instance concurrency set gpu 1`")
    device = settings.device
    sys.stdout.write(f"settings OK: data {settings.data_dir}; models: profile {settings.profile}, device {device}"
                     f"{', offline' if settings.profile == 'real' and settings.offline else ''}; instance: {storage}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; every failure ends it with one line on stderr (the traceback too with --verbose)."""
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # storage schema set-up, on every new instance
    _load_dotenv()
    from flexyface_pipeline.lib.config import SweepConfigError
    from flexyface_pipeline.lib.settings import SettingError, check_environment, check_instance
    from flexyface_pipeline.lib.store import DamagedTableError

    try:
        # The instance first: it needs neither torch nor dagster, so an unreachable PostgreSQL server is
        # reported within a second or two. Then every FLEXYFACE_* setting, before anything is written.
        if args.command != "check":
            check_instance(os.environ)
        args.settings = check_environment(os.environ)
        import dagster as dg

        try:
            args.func(args)
        except dg.DagsterError as err:  # configuration or instance trouble, before any step ran
            raise CliError(_dagster_error_line(err)) from err
    except SettingError as err:
        logger.error("%s", err, exc_info=verbose)
        return 2
    except SweepConfigError as err:
        logger.error("invalid %s: %s", "input" if err.field == "metrics" else "sweep", err, exc_info=verbose)
        return 2
    except (CliError, DamagedTableError) as err:
        logger.error("%s", err, exc_info=verbose)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted: finished images and tables are kept; run the command again to go on")
        return 130
    except Exception as err:  # anything else: one line, the traceback with --verbose
        first = str(err).strip().splitlines()[0][:400] if str(err).strip() else ""
        logger.error("%s%s%s", type(err).__name__, f": {first}" if first else "",
                     "" if verbose else " (run again with --verbose for the traceback)", exc_info=verbose)
        return 1
    return 0


def _dagster_error_line(err: Exception) -> str:
    """One line for an error dagster raised outside a run (an unset setting, a bad instance)."""
    text = str(err)
    unset = re.search(r'environment variable "([A-Za-z0-9_]+)" which is not set', text)
    if unset:
        return (f"{unset.group(1)} is not set: run `make setup` (it adds the settings of .env.example that "
                ".env lacks, keeping your values) or export it")
    causes = [line.strip() for line in text.splitlines() if line.strip()]
    summary = " ".join(causes[:2])
    return f"{type(err).__name__}: {summary[:400]}"


if __name__ == "__main__":
    sys.exit(main())
