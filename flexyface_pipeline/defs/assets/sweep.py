"""``sweep_parameters`` → ``generated_images``: what to generate, then the images."""


import dagster as dg
import pandas as pd
from pydantic import Field

from flexyface_pipeline.lib.config import SweepConfigError, SweepSpec, build_sweep_spec, parse_size
from flexyface_pipeline.lib.checks import check_images_exist
from flexyface_pipeline.lib.generation import IMAGE_COLUMNS, generate_sweep
from flexyface_pipeline.lib.designs import get_design
from flexyface_pipeline.lib.export import drop_sweep_exports, export_lock
from flexyface_pipeline.lib.sampling import sample_design
from flexyface_pipeline.lib.settings import SettingError
from flexyface_pipeline.lib.store import DERIVED_TABLES, SweepStore
from flexyface_pipeline.defs.partitions import require_tables, sweep_keys, sweeps_partitions
from flexyface_pipeline.defs.previews import ProgressObservations
from flexyface_pipeline.defs.resources import ModelResource, StorageResource


class SweepConfig(dg.Config):
    """How to sample a sweep. Leave ``num_images`` (and ``design``) unset to reuse the sweep's stored
    definition."""

    num_images: int | None = Field(default=None, description="Images per engine; required for a new sweep "
                                   "(a grid derives it; an adaptive sweep: the budget).")
    steps_min: int | None = Field(default=None, description="Fewest inference steps (unset: each engine's default).")
    steps_max: int | None = Field(default=None, description="Most inference steps (unset: each engine's default).")
    guidance_min: float | None = Field(default=None, description="Lowest guidance scale (unset: each engine's "
                                       "default; engines without guidance take none).")
    guidance_max: float | None = Field(default=None, description="Highest guidance scale (unset: each engine's default).")
    width: int = Field(default=512, description="Image width in pixels, a multiple of each engine's size_multiple.")
    height: int = Field(default=512, description="Image height in pixels, a multiple of each engine's size_multiple.")
    prompt_files: list[str] = Field(default=["portraits.txt"], description="Prompt files under data/prompts/.")
    prompts: list[str] = Field(default=[], description="Inline prompts, added to those of the files.")
    base_seed: int = Field(default=0, description="Base of the per-image seeds.")
    engine: str | None = Field(default=None, description="Generation engine (unset: realvis_xl); or use engines.")
    engines: list[str] = Field(default=[], description="Several engines: each gets the same prompts and seeds.")
    design: str = Field(default="random", description="random, grid, sobol or adaptive (lib/designs.py).")
    steps_values: list[int] = Field(default=[], description="grid: the steps axis values.")
    guidance_values: list[float] = Field(default=[], description="grid: the guidance axis values.")
    sizes: list[str] = Field(default=[], description="Size axis, e.g. ['512x512', '768x768'] (replaces width/height).")
    schedulers: list[str] = Field(default=[], description="Scheduler axis by name, e.g. ['Euler', 'DPM++ 2M Karras'] "
                                  "(unset: the model's own).")
    seeds_per_cell: int = Field(default=1, description="grid: seeds per prompt and cell, the same in every cell.")
    rounds: int = Field(default=5, description="adaptive: rounds of trials.")
    objective: str = Field(default="combined", description="adaptive: 'combined' (within-prompt z of every metric) "
                           "or one metric, maximised while elapsed_ms is minimised.")

    def defines_sweep(self) -> bool:
        """Whether this config (re)defines the sweep rather than reusing its stored definition."""
        return self.num_images is not None or self.design != "random"

    def to_spec(self, sweep: str, store: SweepStore) -> SweepSpec:
        adaptive = self.design == "adaptive"
        return build_sweep_spec(
            sweep=sweep,
            num_images=self.num_images,
            steps_min=self.steps_min,
            steps_max=self.steps_max,
            guidance_min=self.guidance_min,
            guidance_max=self.guidance_max,
            width=self.width,
            height=self.height,
            prompt_files=self.prompt_files,
            prompts=self.prompts,
            prompts_dir=store.prompts_dir,
            base_seed=self.base_seed,
            engine=self.engine,
            engines=self.engines,
            design=self.design,
            steps_values=self.steps_values,
            guidance_values=self.guidance_values,
            sizes=[parse_size(s) for s in self.sizes],
            schedulers=self.schedulers,
            seeds_per_cell=self.seeds_per_cell,
            rounds=self.rounds if adaptive else 0,
            objective=self.objective if adaptive else "",
        )


def resolve_spec(config: SweepConfig, sweep: str, store: SweepStore) -> SweepSpec:
    """The spec to sample: from the config if it defines the sweep, else the stored one."""
    if config.defines_sweep():
        return config.to_spec(sweep, store)
    stored = store.read_spec_dict(sweep)
    if stored is None:
        raise SweepConfigError("num_images", f"sweep {sweep!r} is new: set num_images (and the other settings)")
    defaults = SweepConfig()
    changed = [name for name in type(config).model_fields if getattr(config, name) != getattr(defaults, name)]
    if changed:
        raise SweepConfigError(
            "num_images",
            f"without num_images sweep {sweep!r} keeps its stored settings, but {', '.join(changed)} "
            "were set too; to redefine the sweep set num_images with them, or leave them out",
        )
    return SweepSpec.from_dict(stored)


def _markdown_table(df: pd.DataFrame, limit: int = 10) -> str:
    head = df.head(limit)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in head.itertuples(index=False)]
    return "\n".join(lines)


@dg.asset(
    partitions_def=sweeps_partitions,
    group_name="sweep",
    kinds={"python", "parquet"},
    backfill_policy=dg.BackfillPolicy.single_run(),
    description="Deterministically sampled settings (prompt, steps, guidance, seed) of every image of a sweep.",
)
def sweep_parameters(context: dg.AssetExecutionContext, config: SweepConfig, storage: StorageResource,
                     models: ModelResource) -> dg.MaterializeResult:
    sweeps = sweep_keys(context)
    store = storage.store()
    tables, infos = [], []
    export_rows_dropped = sheets_removed = 0
    for sweep in sweeps:
        spec = resolve_spec(config, sweep, store)
        try:
            models.check_available(spec.engines)  # weights missing offline: refused before anything is written
        except SettingError as err:
            raise dg.Failure(description=str(err), allow_retries=False) from None
        previous = store.read_spec_dict(sweep)
        redefined = previous is not None and SweepSpec.from_dict(previous).to_dict() != spec.to_dict()
        if redefined:
            # The images and score tables describe the old rows: dropped before the new rows are
            # written, so no export can join new settings to old images or scores; and the old rows
            # leave the exports in the same step (a run stopped after it shows none of them).
            with export_lock(store.exports_dir, on_wait=lambda: context.log.info(
                    "sweep %s is redefined: waiting for the export being written", sweep)):
                gone = drop_sweep_exports(store.exports_dir, sweep)
                dropped = store.drop_tables(sweep, DERIVED_TABLES)
            export_rows_dropped += gone.rows
            sheets_removed += len(gone.sheets)
            context.log.warning(
                "sweep %s is redefined: dropped its tables %s; images are verified against the new rows "
                "(those that no longer match are generated again) and every metric is scored again",
                sweep, ", ".join(dropped) or "(none yet)")
            if gone.rows or gone.sheets:
                context.log.warning(
                    "sweep %s is redefined: removed its %d superseded row(s) from %s and %d contact sheet(s); "
                    "the analysis report keeps describing the last analysed export until the next export",
                    sweep, gone.rows, ", ".join(str(path) for path in gone.rewritten) or "the export",
                    len(gone.sheets))
        if get_design(spec.design).adaptive:
            params, info = _tuning_round(context, spec, store, fresh=previous is None or redefined)
        else:
            result = sample_design(spec)
            params, info = result.table, result.info
        store.write_spec(spec)
        path = store.write_table("parameters", sweep, params)
        tables.append(params)
        infos.append(info)
        context.log.info("sweep %s (%s design, engines %s): %d images, %d prompts -> %s", sweep, spec.design,
                         ", ".join(spec.engines), len(params), len(spec.prompts), path)
    params = pd.concat(tables, ignore_index=True)
    guidance = params["guidance"].dropna()
    metadata = {
        "num_images": dg.MetadataValue.int(len(params)),
        "dagster/row_count": dg.MetadataValue.int(len(params)),
        "sweeps": dg.MetadataValue.text(", ".join(context.partition_keys)),
        "design": dg.MetadataValue.text(", ".join(sorted({str(i.get("design", "random")) for i in infos}))),
        "engines": dg.MetadataValue.text(", ".join(dict.fromkeys(params["engine"].astype(str)))),
        "steps_range": dg.MetadataValue.text(f"{int(params['steps'].min())}–{int(params['steps'].max())}"
                                             if len(params) else "–"),
        "guidance_range": dg.MetadataValue.text(f"{guidance.min():.2f}–{guidance.max():.2f}" if len(guidance) else "none"),
        "prompts": dg.MetadataValue.int(int(params["prompt"].nunique())),
        # A redefined sweep's superseded rows removed from the export, and its contact sheets.
        "export_rows_dropped": dg.MetadataValue.int(export_rows_dropped),
        "contact_sheets_removed": dg.MetadataValue.int(sheets_removed),
        "preview": dg.MetadataValue.md(_markdown_table(params[[c for c in ("image_id", "engine", "prompt", "steps", "guidance",
                                                                             "scheduler", "seed") if c in params]])),
    }
    if "scheduler" in params:
        metadata["schedulers"] = dg.MetadataValue.text(", ".join(str(s) for s in dict.fromkeys(params["scheduler"])))
    for key in ("discrepancy", "random_discrepancy", "cells", "trials_told", "trials_asked", "tuning_done"):
        values = [i[key] for i in infos if key in i]
        if len(values) == 1:
            value = values[0]
            metadata[key] = (dg.MetadataValue.bool(value) if isinstance(value, bool) else
                             dg.MetadataValue.int(value) if isinstance(value, int) else dg.MetadataValue.float(float(value)))
    return dg.MaterializeResult(metadata=metadata)


def _tuning_round(context: dg.AssetExecutionContext, spec: SweepSpec, store: SweepStore, *,
                  fresh: bool) -> tuple[pd.DataFrame, dict]:
    """An adaptive sweep's next round: tell the study the scored trials, append the next trials' rows."""
    from flexyface_pipeline.defs.tuning import study_storage
    from flexyface_pipeline.lib.export import SCORE_TABLES, merge_tables
    from flexyface_pipeline.lib.tuning import grow

    sweep = spec.sweep
    table = None if fresh or not store.has_table("parameters", sweep) else store.read_table("parameters", sweep)
    results = None
    if table is not None and store.has_table("images", sweep):
        scores = {m: store.read_table(t, sweep) for m, (t, _) in SCORE_TABLES.items() if store.has_table(t, sweep)}
        images = store.read_table("images", sweep)
        known = table[table["image_id"].isin(images["image_id"])]
        results = merge_tables(known, images, scores)
    grown, step = grow(spec, table, results, study_storage(context.instance, store))
    context.log.info("sweep %s: told %d trial(s), asked %d; %d new images%s", sweep, step.told, step.asked,
                     len(step.rows), " — the budget is spent" if step.done else "")
    return grown, {"design": spec.design, "trials_told": step.told, "trials_asked": step.asked,
                   "tuning_done": step.done}


@dg.asset(
    partitions_def=sweeps_partitions,
    deps=[sweep_parameters],
    group_name="sweep",
    kinds={"pytorch", "diffusers", "png"},
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[dg.AssetCheckSpec("images_exist", asset="generated_images",
                                   description="Every row of the sweep has its image file.")],
    description="PNG images of a sweep under `data/images/SWEEP/`, each carrying its settings; "
    "finished images are verified and kept when a run is repeated.",
)
def generated_images(context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource) -> dg.MaterializeResult:
    sweeps = sweep_keys(context)
    store = storage.store()
    require_tables(store, sweeps, ("parameters",), "generated_images")
    totals = {"generated": 0, "reused": 0, "images": 0}
    seconds = 0.0
    missing: list[str] = []
    num_missing = 0
    try:
        for sweep in sweeps:
            params = store.read_table("parameters", sweep)
            engine_tables = []
            # Each engine's rows with that engine, one engine loaded at a time.
            for engine_name in dict.fromkeys(params["engine"].astype(str)):
                rows = params[params["engine"].astype(str) == engine_name]
                report = generate_sweep(
                    rows,
                    store,
                    lambda: models.engine(engine_name),
                    batch_size=models.generation_batch,
                    expected_model=models.engine_identity(engine_name),
                    log=context.log,
                    # progress and the latest image, visible in the UI while the run goes on
                    after_batch=ProgressObservations(context.log_event, "generated_images", sweep),
                    backend=models.distributed(),  # None: in this process; else the Ray cluster's workers
                )
                models.release()  # the next engine loads into an empty device
                engine_tables.append(report.table)
                totals["generated"] += report.generated
                totals["reused"] += report.reused
                seconds += report.seconds
            table = (pd.concat(engine_tables, ignore_index=True).set_index("image_id")
                     .loc[params["image_id"]].reset_index()) if engine_tables else pd.DataFrame(columns=IMAGE_COLUMNS)
            store.write_table("images", sweep, table)
            outcome = check_images_exist([store.absolute(p) for p in table["image_path"]])
            missing += outcome.metadata["missing"]  # the first 20 per sweep, to show
            num_missing += outcome.metadata["num_missing"]
            totals["images"] += len(table)
    finally:
        models.release()  # no model outlives its gpu-pool step
    generated_per_s = totals["generated"] / seconds if totals["generated"] and seconds > 0 else 0.0
    return dg.MaterializeResult(
        check_results=[
            dg.AssetCheckResult(check_name="images_exist", passed=not num_missing,
                                description=f"{num_missing} missing" if num_missing else "all image files exist",
                                metadata={"missing": dg.MetadataValue.json(missing[:20]),
                                          "num_missing": dg.MetadataValue.int(num_missing)})
        ],
        metadata={
            "num_images": dg.MetadataValue.int(totals["images"]),
            "dagster/row_count": dg.MetadataValue.int(totals["images"]),
            "generated": dg.MetadataValue.int(totals["generated"]),
            "reused_verified": dg.MetadataValue.int(totals["reused"]),
            "images_per_second": dg.MetadataValue.float(round(generated_per_s, 4)),
            "images_dir": dg.MetadataValue.path(str(store.root / "images")),
            **models.distributed_metadata(),
        }
    )
