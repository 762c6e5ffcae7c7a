"""Shared test helpers: resources on tiny models and a temporary instance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dagster as dg

from flexyface_pipeline.definitions import build_definitions
from flexyface_pipeline.defs.resources import ModelResource, StorageResource


def tiny_resources(data_dir: Path, models_dir: Path, **model_overrides) -> dict:
    storage = StorageResource(data_dir=str(data_dir))
    models = ModelResource(storage=storage, profile="tiny", device="cpu", models_dir=str(models_dir),
                           generation_batch_size=3, scoring_batch_size=4, **model_overrides)
    return {"storage": storage, "models": models}


def tiny_defs(data_dir: Path, models_dir: Path, **model_overrides) -> dg.Definitions:
    return build_definitions(tiny_resources(data_dir, models_dir, **model_overrides))


def sweep_run_config(num_images: int, **overrides) -> dict:
    config = {
        "num_images": num_images,
        "steps_min": 4,
        "steps_max": 7,
        "guidance_min": 0.5,
        "guidance_max": 9.0,
        "width": 64,
        "height": 64,
        "prompt_files": ["demo.txt"],
        "prompts": [],
        "base_seed": 3,
        "engine": "realvis_xl",
    }
    config.update(overrides)
    return {"ops": {"sweep_parameters": {"config": config}}}


def run_sweep(defs: dg.Definitions, instance: dg.DagsterInstance, sweep: str, num_images: int, **overrides):
    if not instance.has_dynamic_partition("sweeps", sweep):
        instance.add_dynamic_partitions("sweeps", [sweep])
    return defs.resolve_job_def("sweep_job").execute_in_process(
        instance=instance, partition_key=sweep, run_config=sweep_run_config(num_images, **overrides)
    )


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
