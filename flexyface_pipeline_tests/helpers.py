"""Shared test helpers: resources on tiny models and a temporary instance."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dotenv import dotenv_values

from flexyface_pipeline.definitions import build_definitions
from flexyface_pipeline.defs.resources import ModelResource, StorageResource

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny_resources(data_dir: Path, models_dir: Path, **model_overrides) -> dict:
    storage = StorageResource(data_dir=str(data_dir))
    settings = {"profile": "tiny", "device": "cpu", "generation_batch_size": 3, "scoring_batch_size": 4} | model_overrides
    models = ModelResource(storage=storage, models_dir=str(models_dir), **settings)
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


def project_env(home: Path, data_dir: Path, models_dir: Path) -> dict[str, str]:
    """The environment of a process of the code location: every setting of ``.env.example``,
    with this test's instance, data and tiny models."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXYFACE_", "DAGSTER_"))}
    env.update({k: v for k, v in dotenv_values(REPO / ".env.example").items() if v is not None})
    env.update(
        DAGSTER_HOME=str(home),
        FLEXYFACE_DATA_DIR=str(data_dir),
        FLEXYFACE_MODELS_DIR=str(models_dir),
        FLEXYFACE_MODEL_PROFILE="tiny",
        FLEXYFACE_DEVICE="cpu",
        # Several run processes share the CPU cores: one thread each keeps them from oversubscribing.
        OMP_NUM_THREADS="1",
    )
    assert not [k for k, v in env.items() if "@@REPO@@" in v]
    return env


def link_instance(home: Path) -> Path:
    """A DAGSTER_HOME whose dagster.yaml links to the repository's, as ``make instance`` makes it."""
    home.mkdir(parents=True)
    (home / "dagster.yaml").symlink_to(REPO / "dagster.yaml")
    return home


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch on ``count`` threads inside the block (run processes started meanwhile share the cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
