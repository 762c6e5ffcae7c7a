"""generate_sweep on the tiny SDXL: batch sizing, out-of-memory halving, PNG writes beside the
next batch, progress counted only for files on disk."""

from __future__ import annotations

import logging
import re
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flexyface_pipeline.lib import generation
from flexyface_pipeline.lib.config import build_sweep_spec
from flexyface_pipeline.lib.engines.base import MAX_CUDA_BATCH, Engine
from flexyface_pipeline.lib.generation import generate_sweep, read_png_record
from flexyface_pipeline.lib.progress import Progress
from flexyface_pipeline.lib.sampling import sample_parameters
from flexyface_pipeline.lib.store import SweepStore
from flexyface_pipeline_tests.helpers import tiny_resources

NUM_IMAGES = 7


@pytest.fixture
def models(data_dir, tiny_models_dir):
    models = tiny_resources(data_dir, tiny_models_dir)["models"]
    yield models
    models.release()


def _parameters(data_dir, sweep: str = "gen"):
    # One step count and guidance > 1 everywhere: all images may share a batch.
    spec = build_sweep_spec(sweep=sweep, num_images=NUM_IMAGES, steps_min=4, steps_max=4, guidance_min=2.0,
                            guidance_max=8.0, width=64, height=64, prompt_files=["demo.txt"],
                            prompts_dir=data_dir / "prompts", base_seed=3)
    return sample_parameters(spec)


class _Recording:
    """The tiny engine, recording each batch it is asked for; runs out of CUDA memory on batches
    larger than ``fits`` (as a GPU would), and sets ``started[k]`` when call k begins."""

    def __init__(self, engine, fits: int | None = None, *, error=None, warm_up: bool = False) -> None:
        self.engine, self.fits = engine, fits
        self.error = error or (lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"))
        self.identity, self.runtime = engine.identity, engine.runtime
        self.plan_batches, self.batch_size_for = engine.plan_batches, engine.batch_size_for
        self.batch_key = engine.batch_key
        self.needs_warm_up = warm_up  # as on CUDA
        self.calls: list[list[str]] = []
        self.steps: list[int] = []
        self.started = [threading.Event() for _ in range(64)]

    def warm_up(self, batch):
        return Engine.warm_up(self, batch)

    def generate(self, batch):
        self.started[len(self.calls)].set()
        self.calls.append([r.image_id for r in batch])
        self.steps.append(batch[0].steps)
        if self.fits is not None and len(batch) > self.fits:
            raise self.error()
        return self.engine.generate(batch)


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_automatic_batches_are_single_images_on_a_cpu(data_dir, tiny_models_dir) -> None:
    models = tiny_resources(data_dir, tiny_models_dir, generation_batch_size=0)["models"]
    assert models.generation_batch is None
    engine = models.engine("realvis_xl")
    assert engine.batch_size_for(512, 512) == 1
    assert MAX_CUDA_BATCH == 16
    recording = _Recording(engine)
    report = generate_sweep(_parameters(data_dir), SweepStore(data_dir), lambda: recording, batch_size=None)
    assert [len(c) for c in recording.calls] == [1] * NUM_IMAGES
    assert report.table["batch_size"].tolist() == [1] * NUM_IMAGES
    models.release()


def test_plan_batches_takes_a_size_per_group(models) -> None:
    from flexyface_pipeline.lib.engines.base import ImageRequest

    requests = [ImageRequest(image_id=f"i{n}", prompt="p", steps=4, guidance=3.0, seed=n, width=w, height=w)
                for n, w in enumerate([64, 128, 64, 128, 64, 64, 128])]
    plan = models.engine("realvis_xl").plan_batches(requests, lambda r: 3 if r.width == 64 else 2)
    assert [[r.image_id for r in b] for b in plan] == [["i0", "i2", "i4"], ["i5"], ["i1", "i3"], ["i6"]]
    with pytest.raises(ValueError, match="max_batch must be at least 1, got 0"):
        models.engine("realvis_xl").plan_batches(requests, lambda r: 0)


def test_out_of_memory_halves_the_batch_for_the_rest_of_the_sweep(models, data_dir, tmp_path, caplog) -> None:
    params = _parameters(data_dir)
    recording = _Recording(models.engine("realvis_xl"), fits=2)
    with caplog.at_level(logging.WARNING):
        report = generate_sweep(params, SweepStore(data_dir), lambda: recording, batch_size=7)
    # 7 fails -> halved to 3, which fails -> 1; every later batch is cut to single images.
    sizes = [len(c) for c in recording.calls]
    assert sizes[:2] == [7, 3]
    assert sizes[2:] == [1] * NUM_IMAGES
    assert "CUDA out of memory generating 7 images; retrying with batches of 3" in caplog.text
    assert "CUDA out of memory generating 3 images; retrying with batches of 1" in caplog.text
    assert report.generated == NUM_IMAGES
    assert report.table["batch_size"].tolist() == [1] * NUM_IMAGES
    # Each image is what the unconstrained engine makes for it alone.
    alone = SweepStore(tmp_path / "alone")
    generate_sweep(params, alone, lambda: models.engine("realvis_xl"), batch_size=1)
    for image_id in params["image_id"]:
        got = SweepStore(data_dir).image_path("gen", image_id)
        assert read_png_record(got)["batch_size"] == 1
        assert np.array_equal(_pixels(got), _pixels(alone.image_path("gen", image_id))), image_id

    # A single image that does not fit is an error, not an endless retry.
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate_sweep(_parameters(data_dir, "none"), SweepStore(data_dir),
                       lambda: _Recording(models.engine("realvis_xl"), fits=0), batch_size=2)


def test_out_of_memory_halving_keeps_batches_that_fit(models, data_dir) -> None:
    recording = _Recording(models.engine("realvis_xl"), fits=3)
    generate_sweep(_parameters(data_dir), SweepStore(data_dir), lambda: recording, batch_size=4)
    # 4 fails -> halved to 2; the remaining planned batch of 3 is cut into 2 + 1.
    assert [len(c) for c in recording.calls] == [4, 2, 2, 2, 1]
    assert sorted(i for c in recording.calls[1:] for i in c) == sorted(_parameters(data_dir)["image_id"])


def test_allocation_failures_outside_the_allocator_also_halve_the_batch(models, data_dir, caplog) -> None:
    # cuBLAS/cuDNN allocations fail with a plain RuntimeError that says so.
    recording = _Recording(models.engine("realvis_xl"), fits=3,
                           error=lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    with caplog.at_level(logging.WARNING):
        report = generate_sweep(_parameters(data_dir), SweepStore(data_dir), lambda: recording, batch_size=4)
    assert [len(c) for c in recording.calls] == [4, 2, 2, 2, 1]
    assert report.generated == NUM_IMAGES
    assert "CUDA out of memory generating 4 images; retrying with batches of 2" in caplog.text
    # Any other error stops the sweep at once.
    failing = _Recording(models.engine("realvis_xl"), fits=3, error=lambda: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        generate_sweep(_parameters(data_dir, "other"), SweepStore(data_dir), lambda: failing, batch_size=4)
    assert [len(c) for c in failing.calls] == [4]


def test_each_batch_shape_is_warmed_up_untimed_once(models, data_dir, tmp_path, caplog) -> None:
    params = _parameters(data_dir)
    recording = _Recording(models.engine("realvis_xl"), fits=3, warm_up=True)
    with caplog.at_level(logging.INFO):
        report = generate_sweep(params, SweepStore(data_dir), lambda: recording, batch_size=4)
    # Batches of 4 and 3 planned. The warm-up of 4 runs out of memory (halving to 2); then
    # one warm-up (2 steps) per new shape, 2 and 1, before its first timed call (4 steps).
    sizes_and_steps = [(len(c), s) for c, s in zip(recording.calls, recording.steps)]
    assert sizes_and_steps == [(4, 2), (2, 2), (2, 4), (2, 4), (2, 4), (1, 2), (1, 4)]
    assert caplog.text.count("warm-up call for batches of") == 2
    assert 0 < report.warm_up_seconds < report.seconds
    # Warm-up calls leave no trace in the images: the same pixels as a sweep without them.
    plain = SweepStore(tmp_path / "plain")
    generate_sweep(params, plain, lambda: _Recording(models.engine("realvis_xl"), fits=3), batch_size=4)
    for image_id in params["image_id"]:
        got = SweepStore(data_dir).image_path("gen", image_id)
        assert np.array_equal(_pixels(got), _pixels(plain.image_path("gen", image_id))), image_id
    assert generate_sweep(params, SweepStore(data_dir), lambda: recording, batch_size=4).warm_up_seconds == 0


def test_files_are_written_while_the_next_batch_generates(models, data_dir, monkeypatch) -> None:
    """The PNGs of batch k are held until batch k + 1 has started: with writes on the critical
    path this would stall (and fail after the timeout). Progress counts only batches whose files
    are all on disk (the last batch's file, never held, may be there already)."""
    params = _parameters(data_dir)
    store = SweepStore(data_dir)
    recording = _Recording(models.engine("realvis_xl"))
    num_batches = -(-NUM_IMAGES // 2)
    real_write = generation.write_png

    def held_write(path, image, record):
        k = next(n for n, call in enumerate(recording.calls) if path.stem in call)
        if k + 1 < num_batches and not recording.started[k + 1].wait(timeout=60):
            raise AssertionError(f"batch {k + 1} did not start while batch {k} was being written")
        return real_write(path, image, record)

    progress = []

    def after_batch(done: Progress) -> None:
        counted = [i for call in recording.calls for i in call][:done.done]
        progress.append((done.done, all(store.image_path("gen", i).is_file() for i in counted)))
        assert done.latest == store.image_path("gen", counted[-1]) and done.total == NUM_IMAGES

    monkeypatch.setattr(generation, "write_png", held_write)
    report = generate_sweep(params, store, lambda: recording, batch_size=2, after_batch=after_batch)
    assert [len(c) for c in recording.calls] == [2, 2, 2, 1]
    assert progress == [(2, True), (4, True), (6, True), (7, True)]
    assert report.generated == NUM_IMAGES


class _Lines(logging.Handler):
    """The messages logged to one logger, from any thread."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.logger = logging.getLogger(name)
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def progress(self) -> list[str]:
        return [m for m in list(self.messages) if m.startswith("generated ")]


PROGRESS_LINE = re.compile(r"generated (\d+)/(\d+) images \((\d+) %\), ([\d.]+) images/s, ETA (\d+) s "
                           r"\(steps=4, batch of (\d), \d+ ms/image\)")


def test_progress_is_logged_per_batch_while_the_next_batch_generates(models, data_dir) -> None:
    """Batch k's line (done/total, rate, ETA) appears once its files are written, while batch
    k + 1 generates: each call after the first waits for the line of the batch before it (a
    line logged only after the next batch finished would never come)."""
    lines = _Lines("flexyface.test.progress")
    engine = models.engine("realvis_xl")
    seen_before_next_finished: list[bool] = []

    class Waiting(_Recording):
        def generate(self, batch):
            k = len(self.calls)
            images = super().generate(batch)
            if k:
                deadline = time.monotonic() + 30
                while len(lines.progress()) < k and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen_before_next_finished.append(len(lines.progress()) >= k)
            return images

    try:
        report = generate_sweep(_parameters(data_dir), SweepStore(data_dir), lambda: Waiting(engine),
                                batch_size=2, log=lines.logger)
    finally:
        lines.logger.removeHandler(lines)
    assert report.generated == NUM_IMAGES
    assert seen_before_next_finished == [True, True, True]
    parsed = [PROGRESS_LINE.fullmatch(m) for m in lines.progress()]
    assert all(parsed), lines.progress()
    assert [(int(m[1]), int(m[2]), int(m[3]), int(m[6])) for m in parsed] == [
        (2, 7, 28, 2), (4, 7, 57, 2), (6, 7, 85, 2), (7, 7, 100, 1)]
    assert all(float(m[4]) > 0 for m in parsed) and int(parsed[-1][5]) == 0


def test_a_failing_after_batch_stops_the_sweep(models, data_dir) -> None:
    store = SweepStore(data_dir)

    def fail(progress: Progress) -> None:
        raise KeyError("observer failed")

    with pytest.raises(KeyError, match="observer failed"):
        generate_sweep(_parameters(data_dir), store, lambda: models.engine("realvis_xl"), batch_size=2,
                       after_batch=fail)
    written = list(store.images_dir("gen").glob("*.png"))
    assert 2 <= len(written) < NUM_IMAGES


def test_images_made_by_other_weights_are_generated_again(models, data_dir, caplog) -> None:
    from flexyface_pipeline.lib.models.common import ModelIdentity

    params = _parameters(data_dir)
    store = SweepStore(data_dir)
    loaded = models.engine("realvis_xl").identity  # builds the tiny model if this is the first use
    expected = models.engine_identity("realvis_xl")
    assert expected == loaded  # what loading gives, told without loading
    first = generate_sweep(params, store, lambda: models.engine("realvis_xl"), batch_size=4, expected_model=expected)
    assert first.generated == NUM_IMAGES

    never = _Recording(models.engine("realvis_xl"), fits=0)  # any call would fail
    again = generate_sweep(params, store, lambda: never, batch_size=4, expected_model=expected)
    assert (again.generated, again.reused, never.calls) == (0, NUM_IMAGES, [])

    # The sweep now points at other weights: nothing on disk is theirs.
    other = ModelIdentity(model_id="SG161222/RealVisXL_V5.0", revision="4a3f0e4fd1b1a6d5e2a1c8d3e0b7f9a1c2d3e4f5")
    with caplog.at_level(logging.WARNING):
        redo = generate_sweep(params, store, lambda: models.engine("realvis_xl"), batch_size=4, expected_model=other)
    assert (redo.generated, redo.reused) == (NUM_IMAGES, 0)
    assert f"{NUM_IMAGES} images were made by other weights ({expected.model_id} {expected.revision})" in caplog.text


def test_engine_identity_is_unknown_until_the_weights_exist(data_dir, tmp_path) -> None:
    models = tiny_resources(data_dir, tmp_path / "no-models-yet")["models"]
    assert models.engine_identity("realvis_xl") is None
    assert not (tmp_path / "no-models-yet").exists()  # nothing was built to answer
    real = tiny_resources(data_dir, tmp_path, profile="real", realvis_xl_model=str(tmp_path / "missing"))["models"]
    assert real.engine_identity("realvis_xl") is None


def test_a_bad_model_location_fails_when_the_run_starts(data_dir, tmp_path) -> None:
    from flexyface_pipeline.lib.settings import SettingError

    models = tiny_resources(data_dir, tmp_path, profile="real", hps_v2_model=str(tmp_path / "hps.pt"))["models"]
    # The same one-line check as the flexyface command's (lib/settings.py), naming the setting and its value.
    with pytest.raises(SettingError, match=r"^FLEXYFACE_HPS_V2_MODEL='.*hps\.pt': local path .*hps\.pt' does not exist; "
                       "set FLEXYFACE_HPS_V2_MODEL"):
        models.validate()
    with pytest.raises(SettingError, match="set FLEXYFACE_CLIP_MODEL"):
        tiny_resources(data_dir, tmp_path, profile="real", clip_model="not a hub id")["models"].validate()
    tiny_resources(data_dir, tmp_path, profile="real")["models"].validate()  # the default hub ids
