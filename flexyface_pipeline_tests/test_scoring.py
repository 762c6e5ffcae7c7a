"""Scoring a sweep: score tables, and the image embeddings CLIP-based metrics share on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from flexyface_pipeline.lib.metrics import SCORERS
from flexyface_pipeline.lib.models.common import resolve_runtime
from flexyface_pipeline.lib.scoring import EmbeddingCache, score_sweep
from flexyface_pipeline.lib.store import SweepStore

CPU = resolve_runtime("cpu", "fp32")
SWEEP = "cache-test"
CLIP_METRICS = ("clip_score", "aesthetic_score", "aes_v2_score")
PROMPTS = ["a red cat", "a dog on a sofa", "a blue sky"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scoring_models")
    for metric, cls in SCORERS.items():
        cls.build_tiny(root / metric)
    return {metric: root / metric for metric in SCORERS}


@pytest.fixture(scope="module")
def scorers(tiny_dirs):
    loaded = {metric: cls.load(str(tiny_dirs[metric]), CPU, offline=True) for metric, cls in SCORERS.items()}
    yield loaded
    for scorer in loaded.values():
        scorer.close()


def _image(i: int) -> PIL.Image.Image:
    rng = np.random.default_rng(i)
    return PIL.Image.fromarray(rng.integers(0, 256, (36 + 4 * i, 44, 3), dtype=np.uint8))


@pytest.fixture
def store(tmp_path) -> SweepStore:
    """A sweep of seven images, three prompts, as the generation assets leave it."""
    store = SweepStore(tmp_path / "data")
    ids = [f"{SWEEP}-{i:05d}" for i in range(7)]
    paths = [store.image_path(SWEEP, i) for i in ids]
    paths[0].parent.mkdir(parents=True)
    for i, path in enumerate(paths):
        _image(i).save(path)
    store.write_table("parameters", SWEEP, pd.DataFrame({"image_id": ids, "prompt": [PROMPTS[i % 3] for i in range(7)]}))
    store.write_table("images", SWEEP, pd.DataFrame({"image_id": ids, "image_path": [store.relative(p) for p in paths]}))
    return store


def _direct(scorer, store: SweepStore) -> np.ndarray:
    params = store.read_table("parameters", SWEEP).merge(store.read_table("images", SWEEP), on="image_id")
    images = [PIL.Image.open(store.absolute(p)) for p in params["image_path"]]
    return scorer.score(images, list(params["prompt"]))


class _Counting:
    """Counts the images that go through a scorer's image tower."""

    def __init__(self, scorer, monkeypatch) -> None:
        self.images = 0
        embed = scorer.embed_prepared

        def counting(pixels):
            self.images += len(pixels)
            return embed(pixels)

        monkeypatch.setattr(scorer, "embed_prepared", counting)


def _embedding_files(store: SweepStore) -> list[str]:
    return sorted(p.name for p in (store.sweep_dir(SWEEP) / "embeddings").iterdir())


def test_shared_embeddings_give_the_numbers_of_direct_scoring(scorers, store, monkeypatch) -> None:
    without = {m: score_sweep(m, SWEEP, store, lambda m=m: scorers[m], batch_size=3, share_embeddings=False)
               for m in CLIP_METRICS}
    assert not (store.sweep_dir(SWEEP) / "embeddings").exists()

    counts = {m: _Counting(scorers[m], monkeypatch) for m in CLIP_METRICS}
    with_cache = {m: score_sweep(m, SWEEP, store, lambda m=m: scorers[m], batch_size=3) for m in CLIP_METRICS}
    # The first metric computed the 7 embeddings, the other two only ran their heads.
    assert [counts[m].images for m in CLIP_METRICS] == [7, 0, 0]
    digest = scorers["clip_score"].vision_digest
    assert _embedding_files(store) == [f"{digest}.json", f"{digest}.npy"]
    for metric in CLIP_METRICS:
        got, reference = with_cache[metric][metric].to_numpy(), without[metric][metric].to_numpy()
        np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0, err_msg=metric)
        np.testing.assert_allclose(got, _direct(scorers[metric], store), atol=1e-5, rtol=0, err_msg=metric)
        assert got.max() - got.min() > 1e-3
        pd.testing.assert_frame_equal(with_cache[metric].drop(columns=metric), without[metric].drop(columns=metric))

    stored = np.load(store.sweep_dir(SWEEP) / "embeddings" / f"{digest}.npy")
    meta = json.loads((store.sweep_dir(SWEEP) / "embeddings" / f"{digest}.json").read_text())
    assert stored.dtype == np.float32 and stored.shape == (7, 16)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-6)
    assert meta["image_ids"] == list(with_cache["clip_score"]["image_id"])
    assert meta["vision_digest"] == digest and len(meta["file_sha256"]) == 7


def test_a_changed_image_is_embedded_again(scorers, store, monkeypatch) -> None:
    score_sweep("clip_score", SWEEP, store, lambda: scorers["clip_score"])
    changed = store.image_path(SWEEP, f"{SWEEP}-00002")
    # Same size, same name, other pixels.
    _image(40).crop((0, 0, 44, 44)).resize((44, 44)).save(changed)
    counter = _Counting(scorers["aesthetic_score"], monkeypatch)
    table = score_sweep("aesthetic_score", SWEEP, store, lambda: scorers["aesthetic_score"])
    assert counter.images == 1
    np.testing.assert_allclose(table["aesthetic_score"], _direct(scorers["aesthetic_score"], store), atol=1e-5, rtol=0)
    # The rewritten cache now serves the new image too.
    counter.images = 0
    score_sweep("aes_v2_score", SWEEP, store, lambda: scorers["aes_v2_score"])
    assert counter.images == 0


def test_an_added_image_reuses_the_others(scorers, store, monkeypatch) -> None:
    score_sweep("clip_score", SWEEP, store, lambda: scorers["clip_score"])
    params, images = store.read_table("parameters", SWEEP), store.read_table("images", SWEEP)
    new_id = f"{SWEEP}-00007"
    _image(7).save(store.image_path(SWEEP, new_id))
    store.write_table("parameters", SWEEP, pd.concat([params, pd.DataFrame({"image_id": [new_id], "prompt": ["x"]})]))
    store.write_table("images", SWEEP, pd.concat([images, pd.DataFrame({
        "image_id": [new_id], "image_path": [store.relative(store.image_path(SWEEP, new_id))]})]))
    counter = _Counting(scorers["clip_score"], monkeypatch)
    table = score_sweep("clip_score", SWEEP, store, lambda: scorers["clip_score"])
    assert counter.images == 1 and len(table) == 8
    np.testing.assert_allclose(table["clip_score"], _direct(scorers["clip_score"], store), atol=1e-5, rtol=0)


def test_another_vision_digest_does_not_read_the_cache(scorers, tiny_dirs, store, monkeypatch) -> None:
    score_sweep("clip_score", SWEEP, store, lambda: scorers["clip_score"])
    bf16 = SCORERS["aesthetic_score"].load(str(tiny_dirs["aesthetic_score"]), resolve_runtime("cpu", "bf16"),
                                           offline=True)
    assert bf16.vision_digest != scorers["clip_score"].vision_digest
    counter = _Counting(bf16, monkeypatch)
    table = score_sweep("aesthetic_score", SWEEP, store, lambda: bf16)
    assert counter.images == 7
    np.testing.assert_allclose(table["aesthetic_score"], _direct(bf16, store), atol=1e-6, rtol=0)
    assert len(_embedding_files(store)) == 4  # one .npy/.json pair per digest
    bf16.close()


def test_an_inconsistent_cache_is_ignored(scorers, store, monkeypatch, caplog) -> None:
    score_sweep("clip_score", SWEEP, store, lambda: scorers["clip_score"])
    cache = EmbeddingCache(store.sweep_dir(SWEEP) / "embeddings", scorers["clip_score"].vision_digest)
    # A .npy replaced without its description (an interrupted or concurrent write).
    np.save(cache.array_path, np.zeros((7, 16), dtype=np.float32))
    counter = _Counting(scorers["aes_v2_score"], monkeypatch)
    with caplog.at_level(logging.WARNING):
        table = score_sweep("aes_v2_score", SWEEP, store, lambda: scorers["aes_v2_score"])
    assert "does not match its description" in caplog.text and counter.images == 7
    np.testing.assert_allclose(table["aes_v2_score"], _direct(scorers["aes_v2_score"], store), atol=1e-5, rtol=0)
    assert cache.read() is not None and cache.read().embeddings.any()
    cache.meta_path.write_text("{not json")
    assert cache.read() is None


def test_hps_scores_the_files(scorers, store) -> None:
    table = score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=2)
    assert list(table.columns) == ["image_id", "hps_v2_score", "hps_v2_model", "hps_v2_model_revision"]
    np.testing.assert_allclose(table["hps_v2_score"], _direct(scorers["hps_v2_score"], store), atol=1e-5, rtol=0)
    assert not (store.sweep_dir(SWEEP) / "embeddings").exists()


def test_bad_requests_fail_before_the_model_loads(scorers, store) -> None:
    def never() -> None:
        raise AssertionError("the model must not load")

    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        score_sweep("fid", SWEEP, store, never)
    store.image_path(SWEEP, f"{SWEEP}-00004").unlink()
    with pytest.raises(FileNotFoundError, match="1 image\\(s\\) missing"):
        score_sweep("clip_score", SWEEP, store, never)
    with pytest.raises(ValueError, match="returned a aesthetic_score scorer for clip_score"):
        _image(4).save(store.image_path(SWEEP, f"{SWEEP}-00004"))
        score_sweep("clip_score", SWEEP, store, lambda: scorers["aesthetic_score"])


def test_cache_rejects_a_bad_digest_and_mismatched_rows(tmp_path) -> None:
    with pytest.raises(ValueError, match="expected a hex digest"):
        EmbeddingCache(tmp_path, "../escape")
    cache = EmbeddingCache(tmp_path, "ab12")
    with pytest.raises(ValueError, match="for 2 images and 1 file digests"):
        cache.write(["a", "b"], ["x"], np.zeros((2, 4), np.float32))
    cache.write(["a", "b"], ["x", "y"], torch.ones(2, 4).numpy())
    read = cache.read()
    assert read is not None and read.image_ids == ["a", "b"] and read.file_digests == ["x", "y"]
    np.testing.assert_array_equal(read.embeddings, np.ones((2, 4), np.float32))
