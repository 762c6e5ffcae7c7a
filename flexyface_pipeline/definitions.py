"""The Dagster code location: assembles assets, jobs, resources and schedules."""

import warnings

import dagster as dg

# backfill_policy is marked beta in Dagster 1.13; it is what keeps one model load per backfill.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    from flexyface_pipeline.defs.assets.analysis import image_grid, sweep_analysis
    from flexyface_pipeline.defs.assets.results import sweep_results
    from flexyface_pipeline.defs.assets.scores import score_assets
    from flexyface_pipeline.defs.checks import export_checks
    from flexyface_pipeline.defs.assets.sweep import generated_images, sweep_parameters
    from flexyface_pipeline.defs.jobs import export_job, grid_job, sweep_job
    from flexyface_pipeline.defs.resources import ModelResource, StorageResource
    from flexyface_pipeline.defs.schedules import (
        export_after_failed_run,
        export_after_sweep,
        nightly_sweep_schedule,
    )
    from flexyface_pipeline.defs.start import launch_started_sweep, start_sweep_job
    from flexyface_pipeline.defs.tuning import tune_rounds


def env_resources() -> dict[str, dg.ConfigurableResource]:
    """Resources configured from the environment (``.env`` at the repository root), resolved at launch."""
    storage = StorageResource(data_dir=dg.EnvVar("FLEXYFACE_DATA_DIR"))
    models = ModelResource(
        storage=storage,
        profile=dg.EnvVar("FLEXYFACE_MODEL_PROFILE"),
        models_dir=dg.EnvVar("FLEXYFACE_MODELS_DIR"),
        device=dg.EnvVar("FLEXYFACE_DEVICE"),
        dtype=dg.EnvVar("FLEXYFACE_DTYPE"),
        scoring_dtype=dg.EnvVar("FLEXYFACE_SCORING_DTYPE"),
        realvis_xl_model=dg.EnvVar("FLEXYFACE_REALVIS_XL_MODEL"),
        flux1_schnell_model=dg.EnvVar("FLEXYFACE_FLUX1_SCHNELL_MODEL"),
        sd35_model=dg.EnvVar("FLEXYFACE_SD35_MODEL"),
        hidream_model=dg.EnvVar("FLEXYFACE_HIDREAM_MODEL"),
        hidream_llama_model=dg.EnvVar("FLEXYFACE_HIDREAM_LLAMA_MODEL"),
        flux2_dev_model=dg.EnvVar("FLEXYFACE_FLUX2_DEV_MODEL"),
        cpu_offload=dg.EnvVar("FLEXYFACE_CPU_OFFLOAD"),
        clip_model=dg.EnvVar("FLEXYFACE_CLIP_MODEL"),
        aesthetic_v1_model=dg.EnvVar("FLEXYFACE_AESTHETIC_V1_MODEL"),
        aesthetic_v2_model=dg.EnvVar("FLEXYFACE_AESTHETIC_V2_MODEL"),
        hps_v2_model=dg.EnvVar("FLEXYFACE_HPS_V2_MODEL"),
        ray_address=dg.EnvVar("FLEXYFACE_RAY_ADDRESS"),
        ray_gpus_per_scorer=dg.EnvVar("FLEXYFACE_RAY_GPUS_PER_SCORER"),
        ray_actors=dg.EnvVar.int("FLEXYFACE_RAY_ACTORS"),
    )
    return {"storage": storage, "models": models}


def build_definitions(resources: dict[str, dg.ConfigurableResource]) -> dg.Definitions:
    return dg.Definitions(
        assets=[sweep_parameters, generated_images, *score_assets, sweep_results, sweep_analysis, image_grid],
        asset_checks=[export_checks],
        jobs=[start_sweep_job, sweep_job, export_job, grid_job],
        schedules=[nightly_sweep_schedule],
        sensors=[launch_started_sweep, export_after_sweep, export_after_failed_run, tune_rounds],
        resources=resources,
        # One process per run: a model is loaded once per run and GPU steps never overlap within a run.
        executor=dg.in_process_executor,
    )


defs = build_definitions(env_resources())
