"""``sweep_parameters`` → ``generated_images``: what to generate, then the images."""


import dagster as dg
import pandas as pd
from pydantic import Field

from flexyface_pipeline.lib.config import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    SweepConfigError,
    SweepSpec,
    build_sweep_spec,
)
from flexyface_pipeline.lib.checks import check_images_exist
from flexyface_pipeline.lib.generation import generate_sweep
from flexyface_pipeline.lib.sampling import sample_parameters
from flexyface_pipeline.lib.store import DERIVED_TABLES, SweepStore
from flexyface_pipeline.defs.partitions import sweeps_partitions
from flexyface_pipeline.defs.resources import ModelResource, StorageResource


class SweepConfig(dg.Config):
    """How to sample a sweep. Leave ``num_images`` unset to reuse the sweep's stored definition."""

    num_images: int | None = Field(default=None, description="Images in the sweep; required for a new sweep.")
    steps_min: int = Field(default=DEFAULT_STEPS[0], description="Fewest inference steps (allowed 4–60).")
    steps_max: int = Field(default=DEFAULT_STEPS[1], description="Most inference steps (allowed 4–60).")
    guidance_min: float = Field(default=DEFAULT_GUIDANCE[0], description="Lowest guidance scale (allowed 0.5–12).")
    guidance_max: float = Field(default=DEFAULT_GUIDANCE[1], description="Highest guidance scale (allowed 0.5–12).")
    width: int = Field(default=512, description="Image width in pixels, a multiple of 8.")
    height: int = Field(default=512, description="Image height in pixels, a multiple of 8.")
    prompt_files: list[str] = Field(default=["portraits.txt"], description="Prompt files under data/prompts/.")
    prompts: list[str] = Field(default=[], description="Inline prompts, added to those of the files.")
    base_seed: int = Field(default=0, description="Base of the per-image seeds.")
    engine: str = Field(default="realvis_xl", description="Generation engine.")

    def to_spec(self, sweep: str, store: SweepStore) -> SweepSpec:
        return build_sweep_spec(
            sweep=sweep,
            num_images=self.num_images,  # type: ignore[arg-type]
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
        )


def resolve_spec(config: SweepConfig, sweep: str, store: SweepStore) -> SweepSpec:
    """The spec to sample: from the config if it defines the sweep, else the stored one."""
    if config.num_images is not None:
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
    stored["prompts"] = tuple(stored["prompts"])
    return SweepSpec(**stored)


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
def sweep_parameters(context: dg.AssetExecutionContext, config: SweepConfig, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    tables = []
    for sweep in context.partition_keys:
        spec = resolve_spec(config, sweep, store)
        previous = store.read_spec_dict(sweep)
        params = sample_parameters(spec)
        if previous is not None and previous != spec.to_dict():
            # The images and score tables describe the old rows: dropped before the new rows are
            # written, so no export can join new settings to old images or scores.
            dropped = store.drop_tables(sweep, DERIVED_TABLES)
            context.log.warning(
                "sweep %s is redefined: dropped its tables %s; images are verified against the new rows "
                "(those that no longer match are generated again) and every metric is scored again",
                sweep, ", ".join(dropped) or "(none yet)")
        store.write_spec(spec)
        path = store.write_table("parameters", sweep, params)
        tables.append(params)
        context.log.info("sweep %s: %d images, %d prompts -> %s", sweep, len(params), len(spec.prompts), path)
    params = pd.concat(tables, ignore_index=True)
    return dg.MaterializeResult(
        metadata={
            "num_images": dg.MetadataValue.int(len(params)),
            "dagster/row_count": dg.MetadataValue.int(len(params)),
            "sweeps": dg.MetadataValue.text(", ".join(context.partition_keys)),
            "steps_range": dg.MetadataValue.text(f"{int(params['steps'].min())}–{int(params['steps'].max())}"),
            "guidance_range": dg.MetadataValue.text(f"{params['guidance'].min():.2f}–{params['guidance'].max():.2f}"),
            "prompts": dg.MetadataValue.int(int(params["prompt"].nunique())),
            "preview": dg.MetadataValue.md(_markdown_table(params[["image_id", "prompt", "steps", "guidance", "seed"]])),
        }
    )


@dg.asset(
    partitions_def=sweeps_partitions,
    deps=[sweep_parameters],
    group_name="sweep",
    kinds={"pytorch", "diffusers", "png"},
    pool="gpu",
    backfill_policy=dg.BackfillPolicy.single_run(),
    check_specs=[dg.AssetCheckSpec("images_exist", asset="generated_images",
                                   description="Every row of the sweep has its image file.")],
    description="PNG images of a sweep under data/images/<sweep>/, each carrying its settings; "
    "finished images are verified and kept when a run is repeated.",
)
def generated_images(context: dg.AssetExecutionContext, storage: StorageResource, models: ModelResource) -> dg.MaterializeResult:
    store = storage.store()
    totals = {"generated": 0, "reused": 0, "images": 0}
    seconds = 0.0
    missing: list[str] = []
    num_missing = 0
    try:
        for sweep in context.partition_keys:
            params = store.read_table("parameters", sweep)
            engine_name = str(params["engine"].iloc[0])
            report = generate_sweep(
                params,
                store,
                lambda: models.engine(engine_name),
                batch_size=models.generation_batch,
                expected_model=models.engine_identity(engine_name),
                log=context.log,
            )
            store.write_table("images", sweep, report.table)
            outcome = check_images_exist([store.absolute(p) for p in report.table["image_path"]])
            missing += outcome.metadata["missing"]  # the first 20 per sweep, to show
            num_missing += outcome.metadata["num_missing"]
            totals["generated"] += report.generated
            totals["reused"] += report.reused
            totals["images"] += len(report.table)
            seconds += report.seconds
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
        }
    )
