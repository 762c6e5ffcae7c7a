import numpy as np
import pandas as pd
from PIL import Image

from flexyface_pipeline.lib.checks import check_export, check_scores, find_disagreements
from flexyface_pipeline.lib.config import METRICS


def _export(tmp_path, n=40, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    (tmp_path / "images").mkdir()
    paths = []
    for i in range(n):
        p = tmp_path / "images" / f"x-{i:05d}.png"
        Image.new("RGB", (8, 8), (i, 0, 0)).save(p)
        paths.append(f"images/{p.name}")
    base = rng.normal(size=n)  # all metrics agree up to small noise
    return pd.DataFrame({
        "image_id": [f"x-{i:05d}" for i in range(n)],
        "prompt": [f"p{i % 2}" for i in range(n)],
        "clip_score": 0.3 + 0.01 * base + 0.001 * rng.normal(size=n),
        "aesthetic_score": 5 + 0.5 * base + 0.01 * rng.normal(size=n),
        "aes_v2_score": 5 + 0.4 * base + 0.01 * rng.normal(size=n),
        "hps_v2_score": 0.25 + 0.01 * base + 0.001 * rng.normal(size=n),
        "image_path": paths,
    })


def test_clean_export_passes(tmp_path):
    outcomes = check_export(_export(tmp_path), tmp_path)
    assert [o.passed for o in outcomes] == [True] * 6, [o.description for o in outcomes]


def test_injected_bad_rows_fail(tmp_path):
    df = _export(tmp_path)
    df.loc[2, "hps_v2_score"] = np.nan
    df.loc[5, "aesthetic_score"] = 11.3
    (tmp_path / df.loc[7, "image_path"]).unlink()
    outcomes = dict(zip([*METRICS, "images", "agree"], check_export(df, tmp_path)))
    assert outcomes["clip_score"].passed and outcomes["aes_v2_score"].passed
    assert not outcomes["hps_v2_score"].passed and "1 missing or non-finite" in outcomes["hps_v2_score"].description
    assert outcomes["hps_v2_score"].metadata["bad_image_ids"] == ["x-00002"]
    assert not outcomes["aesthetic_score"].passed and "unnormalised" in outcomes["aesthetic_score"].description
    assert outcomes["aesthetic_score"].metadata["bad_image_ids"] == ["x-00005"]
    assert not outcomes["images"].passed and outcomes["images"].metadata["num_missing"] == 1


def test_row_count_must_match_the_sweep(tmp_path):
    df = _export(tmp_path)
    outcome = check_scores(df, "clip_score", expected_rows=41)
    assert not outcome.passed and "40 rows, the sweep has 41 images" in outcome.description


def test_wild_disagreement_is_a_warning_with_image_ids(tmp_path):
    df = _export(tmp_path)
    top = df[df.prompt == "p0"]["aesthetic_score"].idxmax()
    df.loc[top, "clip_score"] = df["clip_score"].min() - 0.05  # top aesthetic, bottom CLIP
    found = find_disagreements(df)
    assert df.at[top, "image_id"] in set(found["image_id"])
    row = found[(found.image_id == df.at[top, "image_id"]) & (found.low_metric == "clip_score")].iloc[0]
    assert row.high_metric == "aesthetic_score"
    outcome = check_export(df, tmp_path)[-1]
    assert outcome.warn_only and not outcome.passed
