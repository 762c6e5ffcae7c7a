"""Scoring a sweep: score tables, and the image embeddings CLIP-based metrics share on disk."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from flexyface_pipeline.lib.export import EXPORT_COLUMNS, SCORE_TABLES, finalize, merge_tables, score_columns, write_export
from flexyface_pipeline.lib.metrics import SCORERS
from flexyface_pipeline.lib.models.common import resolve_runtime
from flexyface_pipeline.lib.models.scorer_builders import scorer_builder
from flexyface_pipeline.lib.scoring import EmbeddingCache, score_sweep
from flexyface_pipeline.lib.store import SweepStore

CPU = resolve_runtime("cpu", "fp32")
SWEEP = "cache-test"
CLIP_METRICS = ("clip_score", "aesthetic_score", "aes_v2_score")
PROMPTS = ["a red cat", "a dog on a sofa", "a blue sky"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scoring_models")
    for metric in SCORERS:
        scorer_builder(metric).build_tiny(root / metric)
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
    assert list(table.columns) == ["image_id", "hps_v2_score", "hps_v2_model", "hps_v2_model_revision",
                                   "hps_v2_device", "hps_v2_dtype", "hps_v2_tf32", "image_sha256", "scoring_version"]
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


def _export_rows(store: SweepStore, scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The export of the test sweep: its tables completed with the generation columns."""
    params = store.read_table("parameters", SWEEP).assign(
        sweep=SWEEP, steps=4, guidance=2.5, seed=range(7), width=44, height=44, engine="realvis_xl")
    images = store.read_table("images", SWEEP).assign(
        elapsed_ms=10.0, batch_size=1, engine_model="m", engine_model_revision="r")
    return finalize([merge_tables(params, images, scores)])


def test_score_tables_and_export_record_device_dtype_and_tf32(scorers, store, tmp_path) -> None:
    tables = {m: score_sweep(m, SWEEP, store, lambda m=m: scorers[m], batch_size=3) for m in SCORERS}
    for metric, table in tables.items():
        prefix = SCORE_TABLES[metric][1]
        assert list(table.columns) == ["image_id", *score_columns(metric), "image_sha256", "scoring_version"]
        assert set(table[f"{prefix}_device"]) == {"cpu"} and set(table[f"{prefix}_dtype"]) == {"float32"}
        assert table[f"{prefix}_tf32"].dtype == bool and not table[f"{prefix}_tf32"].any()
    assert tables["clip_score"]["clip_prompt_truncated"].dtype == bool
    assert not tables["clip_score"]["clip_prompt_truncated"].any()  # three short prompts

    df = _export_rows(store, tables)
    assert list(df.columns) == EXPORT_COLUMNS and len(df) == 7
    parquet, csv = write_export(df, tmp_path)
    for back in (pd.read_parquet(parquet), pd.read_csv(csv)):
        for prefix in ("clip", "aesthetic_v1", "aesthetic_v2", "hps_v2"):
            assert back[f"{prefix}_device"].tolist() == ["cpu"] * 7
            assert back[f"{prefix}_dtype"].tolist() == ["float32"] * 7
            assert back[f"{prefix}_tf32"].tolist() == [False] * 7
        assert back["clip_prompt_truncated"].tolist() == [False] * 7


def test_scoring_logs_progress_per_batch(scorers, store, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="flexyface_pipeline"):
        score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=3)
        score_sweep("clip_score", SWEEP, store, lambda: scorers["clip_score"], batch_size=3)
    pattern = re.compile(r"(\w+): (scored|embedded) (\d+)/7 images \((\d+) %\), [\d.]+ images/s, ETA (\d+) s")
    found = [m.groups() for m in map(pattern.fullmatch, caplog.messages) if m]
    assert [(g[0], g[1], g[2], g[3]) for g in found] == [
        ("hps_v2_score", "scored", "3", "42"), ("hps_v2_score", "scored", "6", "85"), ("hps_v2_score", "scored", "7", "100"),
        ("clip_score", "embedded", "3", "42"), ("clip_score", "embedded", "6", "85"), ("clip_score", "embedded", "7", "100"),
    ]
    assert found[2][4] == found[5][4] == "0"


def _long_prompt(words: int = 90) -> str:
    return "a portrait of a woman " + " ".join(f"detail{i % 10} red" for i in range(words))


def test_long_prompts_are_flagged_and_counted(scorers, store, caplog) -> None:
    params = store.read_table("parameters", SWEEP)
    long = _long_prompt()
    params["prompt"] = [long if i % 2 else PROMPTS[0] for i in range(len(params))]
    store.write_table("parameters", SWEEP, params)
    clip = scorers["clip_score"]
    assert clip.prompt_token_counts([long, PROMPTS[0]])[0] > 77
    with caplog.at_level(logging.INFO, logger="flexyface_pipeline"):
        table = score_sweep("clip_score", SWEEP, store, lambda: clip)
    assert table["clip_prompt_truncated"].tolist() == [bool(i % 2) for i in range(7)]
    assert "clip_score: 3 of 7 images had prompts longer than 77 CLIP tokens" in caplog.text

    from flexyface_pipeline.lib.analysis.core import truncated_prompt_count

    df = _export_rows(store, {"clip_score": table})
    assert truncated_prompt_count(df) == 0  # rows without all four scores are not exported
    merged = merge_tables(params.assign(sweep=SWEEP), store.read_table("images", SWEEP), {"clip_score": table})
    assert truncated_prompt_count(merged) == 3


def test_old_score_tables_export_with_unknown_precision(scorers, store) -> None:
    """Score tables written before the precision columns existed still export; those cells are empty."""
    tables = {m: score_sweep(m, SWEEP, store, lambda m=m: scorers[m], share_embeddings=False) for m in SCORERS}
    old = tables["aesthetic_score"][["image_id", "aesthetic_score", "aesthetic_v1_model", "aesthetic_v1_model_revision"]]
    df = _export_rows(store, tables | {"aesthetic_score": old})
    assert len(df) == 7 and df["aesthetic_v1_device"].isna().all() and df["aesthetic_v1_tf32"].isna().all()
    assert df["clip_device"].tolist() == ["cpu"] * 7


def test_scoring_precision_setting(data_dir, tiny_models_dir, store) -> None:
    from flexyface_pipeline.defs.resources import ModelResource, StorageResource
    from flexyface_pipeline.lib.metrics.base import scoring_runtime

    def tiny_resources(data_dir, models_dir, **settings):
        return {"models": ModelResource(storage=StorageResource(data_dir=str(data_dir)), profile="tiny", device="cpu",
                                        models_dir=str(models_dir), **settings)}

    with pytest.raises(ValueError) as refused:
        tiny_resources(data_dir, tiny_models_dir, scoring_dtype="float64")["models"].validate()
    assert str(refused.value) == ("FLEXYFACE_SCORING_DTYPE='float64': expected one of reference, bf16, fp32, fp16 "
                                  "(reference: each metric as its reference library computes it)")

    models = tiny_resources(data_dir, tiny_models_dir, scoring_dtype="bf16")["models"]
    try:
        table = score_sweep("aesthetic_score", SWEEP, store, lambda: models.scorer("aesthetic_score"))
        assert set(table["aesthetic_v1_dtype"]) == {"bfloat16"} and not table["aesthetic_v1_tf32"].any()
        assert models.runtime.dtype == torch.float32  # generation keeps FLEXYFACE_DTYPE (auto: fp32 on a CPU)
        assert models.engine("realvis_xl").runtime.dtype == torch.float32
    finally:
        models.release()
    default = tiny_resources(data_dir, tiny_models_dir)["models"]
    assert default.scoring_dtype == "reference" and default.scoring_runtime("hps_v2_score").dtype == torch.float32

    # What each setting means on a GPU (runtimes only describe it: nothing runs here).
    cuda = torch.device("cuda")
    expected = {
        ("reference", "clip_score"): (torch.float32, False), ("reference", "aesthetic_score"): (torch.float32, False),
        ("reference", "hps_v2_score"): (torch.float16, False), ("bf16", "hps_v2_score"): (torch.bfloat16, True),
        ("fp32", "clip_score"): (torch.float32, False), ("fp16", "aes_v2_score"): (torch.float16, False),
    }
    for (setting, metric), (dtype, tf32) in expected.items():
        runtime = scoring_runtime(SCORERS[metric], cuda, setting)
        assert (runtime.dtype, runtime.tf32) == (dtype, tf32), (setting, metric)
        assert runtime.columns("x") == {"x_device": "cuda", "x_dtype": str(dtype).removeprefix("torch."),
                                        "x_tf32": tf32}


def test_tf32_flags_follow_the_scoring_runtime_and_are_restored() -> None:
    from flexyface_pipeline.lib.models.common import Runtime, tf32_mode

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as generation sets them
        with tf32_mode(Runtime(torch.device("cuda"), torch.float32, tf32=False)):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with pytest.raises(KeyError), tf32_mode(Runtime(torch.device("cuda"), torch.bfloat16, tf32=True)):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise KeyError("restored on errors too")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        with tf32_mode(Runtime(torch.device("cpu"), torch.float32, tf32=True)):  # a CPU leaves them alone
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_analysis_report_counts_truncated_prompts(tmp_path) -> None:
    from flexyface_pipeline.lib.analysis import analyze, write_report
    from flexyface_pipeline_tests.test_analysis import synthetic_results

    line = "4 images had prompts longer than 77 CLIP tokens (truncated to BOS + 75 + EOS)"
    df = synthetic_results(n=10, seed=1, n_prompts=2)
    assert not any("CLIP tokens" in note for note in analyze(df, bootstrap=50).notes)  # no column: no line
    df["clip_prompt_truncated"] = [i % 3 == 0 for i in range(10)]
    analysis = analyze(df, bootstrap=50)
    assert line in analysis.notes
    html, _ = write_report(analysis, df, tmp_path)
    assert line in html.read_text()
    df["clip_prompt_truncated"] = False
    assert not any("CLIP tokens" in note for note in analyze(df, bootstrap=50).notes)


def test_scores_that_are_still_right_are_kept(scorers, store) -> None:
    import logging

    from PIL import Image

    log = logging.getLogger("test.scoring.reuse")
    first = score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=2)
    store.write_table("hps_v2_scores", SWEEP, first)
    # Same scorer, same files: every score is kept, none computed.
    kept = score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=2, log=log)
    pd.testing.assert_frame_equal(kept, first)
    # One image file changed (other pixels): only it is scored again, and its score changes.
    path = store.absolute(store.read_table("images", SWEEP)["image_path"].iloc[2])
    with Image.open(path) as image:
        Image.eval(image.convert("RGB"), lambda v: 255 - v).save(path)
    changed = score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=2)
    differs = changed["hps_v2_score"].to_numpy() != first["hps_v2_score"].to_numpy()
    assert differs.tolist() == [i == 2 for i in range(len(first))]
    assert changed["image_sha256"].iloc[2] != first["image_sha256"].iloc[2]
    # Another precision (the runtime columns differ): nothing is kept.
    store.write_table("hps_v2_scores", SWEEP, changed)
    other = changed.assign(hps_v2_dtype="bfloat16")
    store.write_table("hps_v2_scores", SWEEP, other)
    again = score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=2)
    np.testing.assert_allclose(again["hps_v2_score"], changed["hps_v2_score"], atol=1e-6, rtol=0)
    assert set(again["hps_v2_dtype"]) == {"float32"}
    # --force: every image again, even with a table that is still right.
    store.write_table("hps_v2_scores", SWEEP, again.assign(hps_v2_score=0.5))
    forced = score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=2, rescore_all=True)
    np.testing.assert_allclose(forced["hps_v2_score"], changed["hps_v2_score"], atol=1e-6, rtol=0)
    kept_stale = score_sweep("hps_v2_score", SWEEP, store, lambda: scorers["hps_v2_score"], batch_size=2)
    assert (kept_stale["hps_v2_score"] == 0.5).all()  # what "kept" means: the stored value, not recomputed
