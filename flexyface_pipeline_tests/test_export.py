import numpy as np
import pandas as pd
import pytest

from flexyface_pipeline.lib.config import METRICS
from flexyface_pipeline.lib.export import EXPORT_COLUMNS, SCORE_TABLES, finalize, merge_tables, write_export


def _sweep(name: str, n: int, rng: np.random.Generator, scored: set[str]):
    params = pd.DataFrame(
        {
            "image_id": [f"{name}-{i:05d}" for i in range(n)],
            "sweep": name,
            "index": range(n),
            "prompt": [f"prompt {i % 3}" for i in range(n)],
            "prompt_index": [i % 3 for i in range(n)],
            "steps": rng.integers(4, 8, n),
            "guidance": np.round(rng.uniform(1, 3, n), 2),
            "seed": rng.integers(0, 2**31, n),
            "width": 64,
            "height": 64,
            "engine": "realvis_xl",
        }
    )
    images = pd.DataFrame(
        {
            "image_id": params["image_id"],
            "image_path": [f"images/{name}/{i}.png" for i in params["image_id"]],
            "elapsed_ms": rng.uniform(10, 20, n),
            "batch_size": 2,
            "engine_model": "m",
            "engine_model_revision": "r",
        }
    )
    scores = {}
    for metric in scored:
        prefix = SCORE_TABLES[metric][1]
        scores[metric] = pd.DataFrame(
            {"image_id": params["image_id"], metric: rng.uniform(0, 1, n), f"{prefix}_model": "x",
             f"{prefix}_model_revision": "sha256:0", f"{prefix}_device": "cuda:0",
             f"{prefix}_dtype": "float16" if metric == "hps_v2_score" else "float32", f"{prefix}_tf32": False}
        )
        if metric == "clip_score":
            scores[metric]["clip_prompt_truncated"] = np.arange(n) % 4 == 0
    return params, images, scores


def test_export_schema_order_and_filtering(tmp_path):
    rng = np.random.default_rng(0)
    full = merge_tables(*_sweep("a", 30, rng, set(METRICS)))
    partial = merge_tables(*_sweep("b", 20, rng, {"clip_score", "hps_v2_score"}))
    # one row of sweep a loses a score: it must be left out
    full.loc[3, "aes_v2_score"] = np.nan
    df = finalize([full, partial])
    assert list(df.columns) == EXPORT_COLUMNS
    assert list(df.columns[:8]) == ["steps", "guidance", "clip_score", "aesthetic_score", "aes_v2_score",
                                    "hps_v2_score", "elapsed_ms", "seed"]
    assert len(df) == 29 and set(df["sweep"]) == {"a"}
    assert "a-00003" not in set(df["image_id"])
    keys = list(zip(df["steps"], df["guidance"]))
    assert keys == sorted(keys)
    for metric in METRICS:
        assert df[metric].dtype == np.float64 and df[metric].notna().all()

    parquet, csv = write_export(df, tmp_path)
    back = pd.read_parquet(parquet)
    pd.testing.assert_frame_equal(back, df)
    header = csv.read_text().splitlines()[0].split(",")
    assert header == EXPORT_COLUMNS
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_refuses_duplicate_rows():
    rng = np.random.default_rng(1)
    params, images, scores = _sweep("a", 5, rng, {"clip_score"})
    scores["clip_score"] = pd.concat([scores["clip_score"], scores["clip_score"].iloc[:1]])
    with pytest.raises(pd.errors.MergeError):
        merge_tables(params, images, scores)


def test_empty_export_has_the_columns():
    df = finalize([])
    assert list(df.columns) == EXPORT_COLUMNS and len(df) == 0


def test_provenance_columns_follow_the_seed_and_model_columns(tmp_path):
    seed = ["steps", "guidance", "clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score", "elapsed_ms", "seed"]
    assert EXPORT_COLUMNS[:8] == seed
    model_columns = [c for c in EXPORT_COLUMNS if c.endswith(("_model", "_model_revision"))]
    new = [f"{p}_{f}" for p in ("clip", "aesthetic_v1", "aesthetic_v2", "hps_v2") for f in ("device", "dtype", "tf32")]
    assert EXPORT_COLUMNS[-len(new) - 1:] == [*new, "clip_prompt_truncated"]
    assert EXPORT_COLUMNS.index(model_columns[-1]) < EXPORT_COLUMNS.index(new[0])

    rng = np.random.default_rng(2)
    df = finalize([merge_tables(*_sweep("a", 12, rng, set(METRICS)))])
    parquet, csv = write_export(df, tmp_path)
    for back in (pd.read_parquet(parquet), pd.read_csv(csv)):
        assert back["hps_v2_dtype"].tolist() == ["float16"] * 12 and back["clip_dtype"].tolist() == ["float32"] * 12
        assert back["aesthetic_v2_device"].tolist() == ["cuda:0"] * 12
        assert back["aesthetic_v1_tf32"].tolist() == [False] * 12
        by_id = dict(zip(back["image_id"], back["clip_prompt_truncated"]))
        assert by_id == {f"a-{i:05d}": i % 4 == 0 for i in range(12)}


def _two_sweep_export(tmp_path):
    rng = np.random.default_rng(3)
    df = finalize([merge_tables(*_sweep("a", 9, rng, set(METRICS))), merge_tables(*_sweep("b", 7, rng, set(METRICS)))])
    df.loc[df["sweep"] == "b", "prompt"] = 'a "quoted", two-line\nprompt'  # a record over two lines
    return df, *write_export(df, tmp_path)


def test_dropping_a_sweep_keeps_the_other_rows_as_they_were(tmp_path):
    from flexyface_pipeline.lib.export import drop_sweep_exports

    df, parquet, csv = _two_sweep_export(tmp_path)
    old_csv = csv.read_bytes()
    for sweep in ("a", "b"):
        (tmp_path / "grids" / sweep).mkdir(parents=True)
        (tmp_path / "grids" / sweep / "00_prompt.png").write_bytes(b"png")

    gone = drop_sweep_exports(tmp_path, "b")
    assert (gone.parquet_rows, gone.csv_rows, gone.rows) == (7, 7, 7)
    assert gone.rewritten == [parquet, csv]
    assert gone.sheets == [tmp_path / "grids" / "b" / "00_prompt.png"]
    assert not (tmp_path / "grids" / "b").exists() and (tmp_path / "grids" / "a" / "00_prompt.png").is_file()
    kept = df[df["sweep"] != "b"].reset_index(drop=True)
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), kept)
    # The CSV keeps the other records byte for byte; both files are those an export of sweep a alone writes.
    write_export(kept, tmp_path / "a_alone")
    assert csv.read_bytes() == (tmp_path / "a_alone" / "sweep_results.csv").read_bytes()
    assert parquet.read_bytes() == (tmp_path / "a_alone" / "sweep_results.parquet").read_bytes()
    assert len(old_csv) > len(csv.read_bytes())
    assert not list(tmp_path.rglob("*.tmp"))

    # Nothing of the sweep left: nothing is written again.
    stamps = {p: p.stat().st_mtime_ns for p in (parquet, csv)}
    again = drop_sweep_exports(tmp_path, "b")
    assert (again.rows, again.rewritten, again.sheets) == (0, [], [])
    assert stamps == {p: p.stat().st_mtime_ns for p in (parquet, csv)}


def test_dropping_a_sweep_without_exports_creates_nothing(tmp_path):
    from flexyface_pipeline.lib.export import drop_sweep_exports

    gone = drop_sweep_exports(tmp_path / "exports", "a")
    assert (gone.rows, gone.rewritten, gone.sheets) == (0, [], [])
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_export_is_named_and_nothing_is_changed(tmp_path):
    from flexyface_pipeline.lib.export import DamagedExportError, drop_sweep_exports

    _, parquet, csv = _two_sweep_export(tmp_path)
    parquet.write_bytes(parquet.read_bytes()[:100])
    before = csv.read_bytes()
    with pytest.raises(DamagedExportError) as err:
        drop_sweep_exports(tmp_path, "a")
    assert str(err.value).startswith(f"{parquet} cannot be read (")
    assert str(err.value).endswith("so the rows of sweep a it may hold cannot be removed: delete it "
                                   "(`flexyface export` writes it again), then run again")
    assert csv.read_bytes() == before
