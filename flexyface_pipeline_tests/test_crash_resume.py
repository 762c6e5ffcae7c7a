"""A sweep process killed with SIGKILL in the middle of generation, then run again.

The real command (`flexyface sweep`) runs against a temporary instance linked to the repository's
dagster.yaml, on tiny models. Images are PNG files written atomically, each carrying its row, so
what a killed run leaves is complete images and, at worst, temporary files whose names never end
in ``.png``; the re-run keeps every finished image and generates only the missing ones.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import numpy as np
from PIL import Image

from flexyface_pipeline.lib.engines import get_engine
from flexyface_pipeline.lib.engines.base import ImageRequest
from flexyface_pipeline.lib.export import SCORE_TABLES
from flexyface_pipeline.lib.generation import IDENTITY_FIELDS, read_png_record, verify_image
from flexyface_pipeline.lib.models.scorer_builders import scorer_builder
from flexyface_pipeline.lib.store import SweepStore
from flexyface_pipeline_tests.helpers import BIN, REPO, link_instance, project_env, tiny_resources

SWEEP = "crash"
NUM_IMAGES = 12
BATCH_SIZE = 1  # ModelResource.generation_batch on CPU (generation_batch_size 0: automatic)
SWEEP_ARGS = ["--images", str(NUM_IMAGES), "--width", "64", "--height", "64", "--steps", "4", "6",
              "--prompt-file", "demo.txt", "--seed", "7", "--no-export"]
PROGRESS = re.compile(r"generated (\d+)/(\d+) images")


def _project(root: Path, models_dir: Path) -> tuple[dict[str, str], Path]:
    data_dir = root / "data"
    shutil.copytree(REPO / "data" / "prompts", data_dir / "prompts")
    home = link_instance(root / "dagster")
    return project_env(home, data_dir, models_dir), data_dir


def _sweep(env: dict[str, str], cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "flexyface"), "sweep", SWEEP, *SWEEP_ARGS], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _build_tiny_models(data_dir: Path, models_dir: Path) -> None:
    """Build the tiny models up front: the two sweep processes below would otherwise both build them."""
    models = tiny_resources(data_dir, models_dir)["models"]
    models.location("realvis_xl", get_engine("realvis_xl"))
    for metric in SCORE_TABLES:
        models.location(metric, scorer_builder(metric))


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_sweep_killed_during_generation_resumes_without_redoing_finished_images(tmp_path, tiny_models_dir):
    crashed_env, crashed_data = _project(tmp_path / "crashed", tiny_models_dir)
    reference_env, reference_data = _project(tmp_path / "reference", tiny_models_dir)
    _build_tiny_models(crashed_data, tiny_models_dir)
    workdir = tmp_path / "work"
    workdir.mkdir()

    # The same sweep, uninterrupted, in another data directory and instance (runs meanwhile).
    reference = _sweep(reference_env, workdir, start_new_session=True)
    victim = _sweep(crashed_env, workdir, start_new_session=True)
    images_dir = SweepStore(crashed_data).images_dir(SWEEP)
    try:
        deadline = time.monotonic() + 180
        while len(list(images_dir.glob("*.png"))) < 3:
            assert victim.poll() is None, f"the sweep ended before it could be killed:\n{victim.communicate()[0]}"
            assert time.monotonic() < deadline, "no 3 images after 180 s"
            time.sleep(0.01)
        os.killpg(victim.pid, signal.SIGKILL)  # the run process, its compute-log tails, everything
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    assert victim.returncode == -signal.SIGKILL

    # What the killed run left: complete images of their rows, and temporary files never named *.png.
    store = SweepStore(crashed_data)
    rows = {row["image_id"]: row for row in store.read_table("parameters", SWEEP).to_dict("records")}
    assert len(rows) == NUM_IMAGES
    left = sorted(p.name for p in images_dir.iterdir())
    pngs = [name for name in left if name.endswith(".png")]
    temporary = [name for name in left if not name.endswith(".png")]
    assert NUM_IMAGES > len(pngs) >= 3, left
    for name in pngs:
        assert verify_image(images_dir / name, rows[name.removesuffix(".png")]) is not None, name
    for name in temporary:
        assert name.startswith(".") and name.endswith(".tmp") and ".png." in name, name

    with dg.DagsterInstance.from_config(crashed_env["DAGSTER_HOME"]) as instance:
        (killed,) = instance.get_runs()
        # Nobody recorded the end of the killed run, and its gpu step still holds the pool's slot:
        # every gpu step of every later run would wait for it.
        assert killed.status == dg.DagsterRunStatus.STARTED
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [(slot.run_id, slot.step_key) for slot in claimed] == [(killed.run_id, "generated_images")]
        progress = [int(m.group(1)) for e in instance.all_logs(killed.run_id) if (m := PROGRESS.search(e.message or ""))]
        logged = max(progress, default=0)
        # A batch is logged once all its files are on disk, which is checked after the next batch
        # has generated (its files are written meanwhile): the files of at most two more batches
        # may have been written before the kill.
        assert logged <= len(pngs) <= logged + 2 * BATCH_SIZE, (progress, pngs)
    # The re-run finds the dead run (its process is gone), marks it failed and frees its slot.
    rerun = _sweep(crashed_env, workdir)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output

    with dg.DagsterInstance.from_config(crashed_env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
        assert runs[1].run_id == killed.run_id
        assert any("no longer exists" in (e.message or "") for e in instance.all_logs(killed.run_id))
        event = instance.get_latest_materialization_event(dg.AssetKey("generated_images"))
        assert event.run_id == runs[0].run_id
        metadata = event.asset_materialization.metadata
        # Only the missing images were generated; every image on disk was verified and kept.
        assert metadata["generated"].value == NUM_IMAGES - len(pngs)
        assert metadata["reused_verified"].value == len(pngs)
        assert metadata["num_images"].value == NUM_IMAGES
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []

    # Every image exists exactly once, under its row's name.
    expected = {f"{image_id}.png" for image_id in rows}
    assert {p.name for p in images_dir.glob("*.png")} == expected

    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output
    reference_dir = SweepStore(reference_data).images_dir(SWEEP)
    assert {p.name for p in reference_dir.glob("*.png")} == expected
    # The same images as the uninterrupted run's, pixel for pixel. The re-run batches the missing
    # images among themselves: where the kill split a batch, an image's batch differs from the one
    # it had in the uninterrupted run, and a batched call sums in another order (float32 rounding,
    # a few 1e-6; see test_engine_realvis_xl). Those images are compared by their rows only.
    same_batch = _same_batch(list(rows.values()), missing={r for r in rows if f"{r}.png" not in pngs})
    diffs = {}
    for name in sorted(expected):
        image_id = name.removesuffix(".png")
        resumed, uninterrupted = read_png_record(images_dir / name), read_png_record(reference_dir / name)
        assert {k: resumed[k] for k in IDENTITY_FIELDS} == {k: uninterrupted[k] for k in IDENTITY_FIELDS}
        if same_batch[image_id]:
            assert resumed["batch_size"] == uninterrupted["batch_size"]
            diffs[name] = int(np.abs(_pixels(images_dir / name) - _pixels(reference_dir / name)).max())
    # The images on disk before the kill and every regenerated image whose batch was not split.
    assert len(diffs) >= len(pngs), same_batch
    assert all(d == 0 for d in diffs.values()), f"max abs pixel difference per image: {diffs}"


def _same_batch(rows: list[dict], missing: set[str]) -> dict[str, bool]:
    """For each image: is its batch in the resumed sweep the batch it had in an uninterrupted run?

    Both runs plan batches the same way (engine.plan_batches over the rows in order, batches of
    BATCH_SIZE); the re-run plans over the missing images only.
    """
    engine = get_engine("realvis_xl")
    requests = [ImageRequest(**{k: row[k] for k in ("image_id", "prompt", "steps", "guidance", "seed", "width", "height")})
                for row in rows]

    def members(batches):
        return {r.image_id: tuple(m.image_id for m in batch) for batch in batches for r in batch}

    uninterrupted = members(engine.plan_batches(requests, BATCH_SIZE))
    rerun = members(engine.plan_batches([r for r in requests if r.image_id in missing], BATCH_SIZE))
    return {image_id: rerun.get(image_id, batch) == batch for image_id, batch in uninterrupted.items()}
