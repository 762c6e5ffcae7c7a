"""Weights are known by their content; damaged images are found by path; files follow the umask;
commands refuse an instance that is not the project's."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flexyface_pipeline.lib.atomic import atomic_write_bytes
from flexyface_pipeline.lib.checks import check_images_exist
from flexyface_pipeline.lib.config import build_sweep_spec
from flexyface_pipeline.lib.generation import generate_sweep
from flexyface_pipeline.lib.models.common import ModelIdentity
from flexyface_pipeline.lib.sampling import sample_parameters
from flexyface_pipeline.lib.store import SweepStore
from flexyface_pipeline_tests.helpers import BIN, project_env, tiny_resources
from flexyface_pipeline_tests.test_cli import cli_env  # noqa: F401  (fixture)


def test_the_revision_names_the_weights_wherever_they_lie() -> None:
    here = ModelIdentity(model_id="/old/models/tiny/realvis_xl", revision="sha256:abc")
    assert here.same_weights("/new/place/realvis_xl", "sha256:abc")
    assert not here.same_weights("/old/models/tiny/realvis_xl", "sha256:def")
    # Without a known revision only the location can tell.
    unknown = ModelIdentity(model_id="org/model", revision="unknown")
    assert unknown.same_weights("org/model", "unknown")
    assert not unknown.same_weights("org/other", "unknown")


def _identity_run(data_dir: Path, models_dir: Path):
    models = tiny_resources(data_dir, models_dir)["models"]
    spec = build_sweep_spec(sweep="moved", num_images=3, steps_min=4, steps_max=4, guidance_min=2.0,
                            guidance_max=3.0, width=64, height=64, prompt_files=["demo.txt"],
                            prompts_dir=data_dir / "prompts", base_seed=1)
    params = sample_parameters(spec)
    store = SweepStore(data_dir)
    try:
        report = generate_sweep(params, store, lambda: models.engine("realvis_xl"), batch_size=3,
                                expected_model=models.engine_identity("realvis_xl"))
    finally:
        models.release()
    return report


def test_moved_weights_regenerate_nothing_and_changed_weights_regenerate_all(data_dir, tiny_models_dir, tmp_path):
    first = _identity_run(data_dir, tiny_models_dir)
    assert first.generated == 3
    # The same weights under another folder (a moved models directory or clone).
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_models_dir, copy)
    moved = _identity_run(data_dir, copy)
    assert (moved.generated, moved.reused) == (0, 3)
    # One weight value changed in the copy: other weights, so every image is made again.
    from safetensors.torch import load_file, save_file

    weights = next((copy / "tiny" / "realvis_xl" / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights)
    changed = _identity_run(data_dir, copy)
    assert (changed.generated, changed.reused) == (3, 0)


def test_a_truncated_png_fails_the_image_check_by_path(tmp_path) -> None:
    good, cut = tmp_path / "good.png", tmp_path / "cut.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(good)
    Image.effect_noise((64, 64), 50).convert("RGB").save(cut)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    outcome = check_images_exist([good, cut, tmp_path / "gone.png"])
    assert not outcome.passed
    assert outcome.metadata["damaged"] == [str(cut)] and outcome.metadata["num_missing"] == 1
    assert str(cut) in outcome.description and "flexyface sweep" in outcome.description
    assert check_images_exist([good]).passed


def test_written_files_follow_the_umask(tmp_path) -> None:
    target = tmp_path / "private" / "table.bin"
    script = ("import os, sys; from pathlib import Path; os.umask(0o077); "
              "from flexyface_pipeline.lib.atomic import atomic_write_bytes; "
              "atomic_write_bytes(Path(sys.argv[1]), b'x')")
    subprocess.run([sys.executable, "-c", script, str(target)], check=True)
    assert target.stat().st_mode & 0o777 == 0o600
    assert target.parent.stat().st_mode & 0o777 == 0o700
    atomic_write_bytes(tmp_path / "shared.bin", b"y")  # this process: the usual umask 022
    assert (tmp_path / "shared.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_an_instance_without_dagster_yaml_is_refused(tmp_path, data_dir) -> None:
    home = tmp_path / "not_an_instance"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXYFACE_", "DAGSTER_"))}
    env |= {"DAGSTER_HOME": str(home), "FLEXYFACE_DATA_DIR": str(data_dir), "FLEXYFACE_MODEL_PROFILE": "tiny"}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = subprocess.run([str(BIN / "flexyface"), "export"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2  # a setting (DAGSTER_HOME) is wrong
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no dagster.yaml" in lines[0] and "make setup" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_instance_without_a_gpu_limit_is_refused(tmp_path, data_dir) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = project_env(home, data_dir, tmp_path / "models")  # every setting, as .env has them
    done = subprocess.run([str(BIN / "flexyface"), "export"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pool 'gpu'" in lines[0] and "make instance" in lines[0], done.stderr
    assert not (data_dir / "exports").exists()


@pytest.mark.parametrize("umask", [0o077])
def test_umask_helper_reads_without_changing(umask) -> None:
    from flexyface_pipeline.lib.atomic import _umask as project_umask

    old = os.umask(umask)
    try:
        assert project_umask() == umask
        assert os.umask(umask) == umask  # unchanged by the read
    finally:
        os.umask(old)


def _run_logs(instance, result) -> str:
    return "\n".join(e.message or "" for e in instance.all_logs(result.run_id))


def test_moving_the_models_regenerates_and_rescores_nothing(data_dir, tiny_models_dir, dagster_home, tmp_path) -> None:
    import dagster as dg

    from flexyface_pipeline_tests.helpers import run_sweep, tiny_defs

    with dg.DagsterInstance.get() as instance:
        assert run_sweep(tiny_defs(data_dir, tiny_models_dir), instance, "mv", 4).success
        tables = {p.name: p.read_bytes() for p in (data_dir / "sweeps" / "mv").glob("*_scores.parquet")}
        copy = tmp_path / "models-elsewhere"
        shutil.copytree(tiny_models_dir, copy)
        again = run_sweep(tiny_defs(data_dir, copy), instance, "mv", 4)
        assert again.success
        logs = _run_logs(instance, again)
        generated = again.asset_materializations_for_node("generated_images")[0].metadata["generated"].value
        assert generated == 0
        for metric in ("clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score"):
            assert f"{metric}: 4 of 4 images of mv keep their scores" in logs, metric
            assert f"{metric}: scored 0 images of mv" in logs
        for name, data in tables.items():  # the same scores; the model column names the new place
            before = pd.read_parquet(io.BytesIO(data))
            after = pd.read_parquet(data_dir / "sweeps" / "mv" / name)
            metric = [c for c in before.columns if c.endswith("_score")][0]
            assert before[metric].tolist() == after[metric].tolist()
        # Other scoring weights (one value changed): that metric is scored again, the others kept.
        from safetensors.torch import load_file, save_file

        weights = next((copy / "tiny" / "aes_v2_score").rglob("*.safetensors"))
        tensors = load_file(weights)
        name = sorted(tensors)[-1]
        tensors[name] = tensors[name] + 0.5
        save_file(tensors, weights)
        third = run_sweep(tiny_defs(data_dir, copy), instance, "mv", 4)
        logs = _run_logs(instance, third)
        assert "aes_v2_score: scored 4 images of mv" in logs
        assert "hps_v2_score: 4 of 4 images of mv keep their scores" in logs


def test_no_export_writes_nothing_under_exports(cli_env) -> None:  # noqa: F811
    from flexyface_pipeline import cli
    from flexyface_pipeline_tests.test_cli import COMMON

    assert cli.main(["sweep", "quiet", "--images", "2", *COMMON, "--no-export"]) == 0
    assert (cli_env / "sweeps" / "quiet" / "hps_v2_scores.parquet").is_file()
    assert not (cli_env / "exports").exists()
    assert cli.main(["rescore", "clip_score", "--sweep", "quiet", "--no-export"]) == 0
    assert not (cli_env / "exports").exists()


def test_moving_the_whole_data_directory_regenerates_and_rescores_nothing(data_dir, tiny_models_dir, dagster_home,
                                                                          tmp_path) -> None:
    """A clone moved to another path keeps its data/ (models built under it): nothing is made again."""
    import dagster as dg

    from flexyface_pipeline_tests.helpers import run_sweep, tiny_defs

    with dg.DagsterInstance.get() as instance:
        assert run_sweep(tiny_defs(data_dir, tiny_models_dir), instance, "home", 3).success
        moved_root = tmp_path / "moved-clone"
        shutil.copytree(data_dir, moved_root / "data")
        shutil.copytree(tiny_models_dir, moved_root / "data" / "models")
        shutil.rmtree(data_dir)  # the old place is gone
        again = run_sweep(tiny_defs(moved_root / "data", moved_root / "data" / "models"), instance, "home", 3)
        assert again.success
        assert again.asset_materializations_for_node("generated_images")[0].metadata["generated"].value == 0
        logs = _run_logs(instance, again)
        for metric in ("clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score"):
            assert f"{metric}: 3 of 3 images of home keep their scores" in logs, metric
