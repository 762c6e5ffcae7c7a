"""Sweep analysis on synthetic results whose answer is known by construction.

Every metric is ``prompt offset + a * min(steps, 30) / 30 - b * ((guidance - 6) / 2) ** 2 + noise``:
quality plateaus from 30 steps on and peaks at guidance 6. The analysis must find the plateau
start within ±6 steps and a guidance band that contains 6 and is at most 3 wide.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flexyface_pipeline.lib.analysis import (
    RECOMMENDATIONS_NAME,
    REPORT_NAME,
    analysis_markdown,
    analyze,
    key_numbers,
    pareto_front,
    recommendations_dict,
    within_prompt_zscores,
    write_report,
)
from flexyface_pipeline.lib.analysis.stats import make_bins
from flexyface_pipeline.lib.config import METRICS

PLATEAU_STEPS = 30
PEAK_GUIDANCE = 6.0
STEPS_TOLERANCE = 6
MAX_BAND_WIDTH = 3.0
BOOTSTRAP = 200

# metric: (base, steps effect a, guidance effect b, noise sd, prompt offset sd)
_SHAPES = {
    "clip_score": (30.0, 2.0, 1.5, 1.0, 2.0),
    "aesthetic_score": (5.5, 0.4, 0.3, 0.2, 0.4),
    "aes_v2_score": (6.0, 0.4, 0.3, 0.2, 0.4),
    "hps_v2_score": (0.27, 0.01, 0.008, 0.005, 0.01),
}


def synthetic_results(
    n: int = 2000, *, seed: int = 0, n_prompts: int = 8, flat: bool = False, plateau: bool = True
) -> pd.DataFrame:
    """A results table in the merged layout; ``flat`` gives pure noise around prompt offsets."""
    rng = np.random.default_rng(seed)
    steps = rng.integers(4, 61, n)
    guidance = np.round(rng.uniform(0.5, 12.0, n), 2)
    prompt = rng.integers(0, n_prompts, n)
    ramp = np.minimum(steps, PLATEAU_STEPS) / PLATEAU_STEPS if plateau else steps / 60.0
    peak = -(((guidance - PEAK_GUIDANCE) / 2.0) ** 2)
    df = pd.DataFrame({"steps": steps.astype(np.int64), "guidance": guidance})
    for metric, (base, a, b, noise, offset_sd) in _SHAPES.items():
        offsets = rng.normal(0.0, offset_sd, n_prompts)
        effect = 0.0 if flat else a * ramp + b * peak
        df[metric] = base + offsets[prompt] + effect + rng.normal(0.0, noise, n)
    df["elapsed_ms"] = 45.0 * steps * np.where(guidance > 1.0, 2.0, 1.0) * rng.lognormal(0.0, 0.05, n)
    df["seed"] = rng.integers(0, 2**31 - 1, n)
    df["sweep"] = "synthetic"
    df["image_id"] = [f"synthetic-{i:05d}" for i in range(n)]
    df["prompt"] = [f"prompt number {k}" for k in prompt]
    df["engine"] = "tiny_sdxl"
    df["width"] = 64
    df["height"] = 64
    df["image_path"] = [f"images/synthetic-{i:05d}.png" for i in range(n)]
    df["clip_model"] = "tiny-clip"
    df["clip_model_revision"] = "0" * 40
    return df


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return synthetic_results()


@pytest.fixture(scope="module")
def analysis(results):
    return analyze(results, bootstrap=BOOTSTRAP, seed=0)


# --------------------------------------------------------------------------------------------
# Known answers


@pytest.mark.parametrize("metric", METRICS)
def test_recovers_plateau_start(analysis, metric):
    ma = analysis.per_metric[metric]
    assert ma.min_steps_reason is None
    rec = ma.min_steps
    assert rec is not None
    assert abs(rec.steps - PLATEAU_STEPS) <= STEPS_TOLERANCE, (rec.steps, rec.bin_low, rec.bin_high)
    assert rec.bin_low <= rec.steps <= rec.bin_high
    assert ma.steps_test.significant and ma.steps_test.p_adjusted < 1e-6
    # The estimate describes the images of the chosen bin, with its interval and count.
    in_bin = ma.steps[(ma.steps["low"] == rec.bin_low) & (ma.steps["high"] == rec.bin_high)].iloc[0]
    assert rec.estimate.n == in_bin["n"] >= analysis.settings.min_per_bin
    assert rec.estimate.ci_low < rec.estimate.mean < rec.estimate.ci_high
    assert rec.estimate.mean == pytest.approx(in_bin["mean"])
    # Bins well below the plateau are significantly worse than the best bin.
    low_bins = ma.steps[ma.steps["high"] <= 15]
    assert (low_bins["p_vs_best"] < analysis.settings.alpha).all()
    # Loss against the best bin is small next to the whole steps effect (> 0.3 z from 4 to 30 steps).
    assert rec.difference_z.ci_high < 0.15


@pytest.mark.parametrize("metric", METRICS)
def test_recovers_guidance_peak(analysis, metric):
    ma = analysis.per_metric[metric]
    band = ma.guidance_band
    assert band is not None and ma.guidance_band_reason is None
    assert band.low <= PEAK_GUIDANCE <= band.high, (band.low, band.high)
    assert band.high - band.low <= MAX_BAND_WIDTH
    assert band.best_bin_low <= PEAK_GUIDANCE + 1.0 and band.best_bin_high >= PEAK_GUIDANCE - 1.0
    assert band.estimate.n > band.best_estimate.n - 1
    assert band.estimate.ci_low < band.estimate.mean < band.estimate.ci_high


def test_linear_gain_without_plateau_recommends_the_top():
    df = synthetic_results(plateau=False, seed=3)
    ma = analyze(df, metrics=("clip_score",), bootstrap=BOOTSTRAP).per_metric["clip_score"]
    assert ma.min_steps is not None
    assert ma.min_steps.steps >= 48


def test_pareto_settings_trade_time_for_quality(analysis):
    fronts = analysis.pareto_settings
    assert len(fronts) >= 2
    times = [p.time_ms for p in fronts]
    quality = [p.quality_z.mean for p in fronts]
    assert times == sorted(times)
    assert all(b > a for a, b in zip(quality, quality[1:])), quality  # slower only if better
    # The fastest setting is in the fewest-steps row; every front cell is near the guidance peak or cheap.
    assert fronts[0].steps_low == analysis.cell_steps_bins.lows[0]
    assert all(p.quality_z.n >= analysis.settings.min_per_cell for p in fronts)
    best = max(fronts, key=lambda p: p.quality_z.mean)
    assert best.guidance_low <= PEAK_GUIDANCE + 1.5 and best.guidance_high >= PEAK_GUIDANCE - 1.5
    assert best.steps_high >= PLATEAU_STEPS - STEPS_TOLERANCE


def test_correlations(analysis):
    for key in ("pearson", "spearman", "pearson_within_prompt", "spearman_within_prompt"):
        matrix = analysis.correlations[key]
        assert list(matrix.columns) == list(METRICS) == list(matrix.index)
        assert np.allclose(np.diag(matrix.to_numpy()), 1.0)
        assert np.allclose(matrix.to_numpy(), matrix.to_numpy().T)
    # All four metrics share the same settings effects, so they agree strongly.
    assert analysis.correlations["spearman_within_prompt"].to_numpy().min() > 0.5
    assert analysis.correlation_n == 2000


# --------------------------------------------------------------------------------------------
# Refusals


def test_refuses_on_a_tiny_dataset(tmp_path):
    df = synthetic_results(n=10, seed=1, n_prompts=2)
    a = analyze(df, bootstrap=BOOTSTRAP)
    for metric in METRICS:
        ma = a.per_metric[metric]
        assert ma.min_steps is None and ma.guidance_band is None
        assert "insufficient data" in ma.min_steps_reason
        assert "insufficient data" in ma.guidance_band_reason
    assert a.pareto_settings == ()
    assert "insufficient data" in a.pareto_reason
    # The report still renders and says why, with nulls instead of numbers.
    _, json_path = write_report(a, df, tmp_path)
    payload = json.loads(json_path.read_text())
    assert payload["metrics"]["clip_score"]["min_steps"] is None
    assert "insufficient data" in payload["insufficient_data"]["clip_score.min_steps"]


def test_refuses_on_pure_noise():
    """No settings effect: nothing may be recommended.

    The effect tests are Holm-adjusted over all 8 of them, so pure noise yields any recommendation
    with probability at most 5 %; this seed is one draw of that.
    """
    a = analyze(synthetic_results(seed=5, flat=True), bootstrap=BOOTSTRAP)
    for metric in METRICS:
        ma = a.per_metric[metric]
        assert ma.min_steps is None and ma.guidance_band is None
        assert ma.min_steps_reason.startswith("no significant effect of steps")
        assert ma.guidance_band_reason.startswith("no significant effect of guidance")
        assert ma.steps_test.p_adjusted >= 0.05 and math.isfinite(ma.steps_test.p_value)
        assert not ma.steps["pareto"].any() and ma.pareto_reason == ma.min_steps_reason
    # No time/quality front either: every setting is as good as the fastest one.
    assert a.pareto_settings == ()
    assert a.pareto_reason.startswith("no significant quality difference")
    assert not a.combined_steps["pareto"].any() and not a.combined_cells["pareto"].any()


def test_bad_input_is_rejected(results):
    with pytest.raises(ValueError, match="hps_v2_score"):
        analyze(results.drop(columns=["hps_v2_score"]))
    with pytest.raises(ValueError, match="bootstrap"):
        analyze(results, bootstrap=-1)
    with pytest.raises(ValueError, match="not the string"):
        analyze(results, metrics="clip_score")
    with pytest.raises(ValueError, match="numeric"):
        analyze(results.assign(clip_score="x"))


def test_same_seed_same_numbers():
    df = synthetic_results(n=600, seed=7)
    a = recommendations_dict(analyze(df, bootstrap=50, seed=3, metrics=("clip_score",)))
    b = recommendations_dict(analyze(df, bootstrap=50, seed=3, metrics=("clip_score",)))
    assert a == b
    c = recommendations_dict(analyze(df, bootstrap=50, seed=4, metrics=("clip_score",)))
    assert c["metrics"]["clip_score"]["steps_bins"] != a["metrics"]["clip_score"]["steps_bins"]


# --------------------------------------------------------------------------------------------
# Building blocks


def test_pareto_front_hand_example():
    #          A     B     C     D     E     F     G       B'
    time = [1.0, 2.0, 2.0, 3.0, 4.0, 1.0, np.nan, 2.0]
    quality = [0.1, 0.5, 0.4, 0.45, 0.9, 0.05, 1.0, 0.5]
    # C (same time as B, worse), D (slower and worse than B), F (same time as A, worse) are
    # dominated; G has no time; B and its duplicate B' do not dominate each other.
    expected = [True, True, False, False, True, False, False, True]
    assert pareto_front(time, quality).tolist() == expected
    with pytest.raises(ValueError, match="differ in length"):
        pareto_front([1.0], [1.0, 2.0])


def test_within_prompt_zscores():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "prompt": ["a"] * 50 + ["b"] * 30 + ["flat"] * 5 + ["single"],
            "clip_score": np.r_[rng.normal(30, 3, 50), rng.normal(20, 0.5, 30), [7.0] * 5, [1.0]],
        }
    )
    z = within_prompt_zscores(df, ["clip_score"])
    assert list(z.columns) == ["clip_score_z"]
    for prompt in ("a", "b"):
        values = z.loc[df["prompt"] == prompt, "clip_score_z"]
        assert values.mean() == pytest.approx(0.0, abs=1e-12)
        assert values.std(ddof=1) == pytest.approx(1.0, abs=1e-12)
    assert (z.loc[df["prompt"] == "flat", "clip_score_z"] == 0.0).all()
    assert z.loc[df["prompt"] == "single", "clip_score_z"].isna().all()


def test_analysis_zscores_are_per_prompt(results):
    z = within_prompt_zscores(results, METRICS)
    grouped = z.groupby(results["prompt"])
    assert np.allclose(grouped.mean().to_numpy(), 0.0, atol=1e-12)
    assert np.allclose(grouped.std(ddof=1).to_numpy(), 1.0)


def test_bins_cover_integer_steps():
    steps = np.arange(4, 61)
    bins = make_bins(steps, 12, integer=True)
    codes = bins.assign(steps)
    assert (codes >= 0).all() and np.all(np.diff(codes) >= 0)
    assert bins.lows[0] == 4 and bins.highs[-1] == 60
    assert all(h + 1 == lo for h, lo in zip(bins.highs, bins.lows[1:]))
    few = make_bins(np.array([10, 20, 20, 40]), 6, integer=True)
    assert few.lows == few.highs == (10.0, 20.0, 40.0)
    assert few.assign(np.array([10, 20, 40, 30])).tolist() == [0, 1, 2, -1]
    g = make_bins(np.array([0.5, 3.0, 5.0, 7.0, 12.0]), 4, integer=False)  # edges 0.5, 3.375, 6.25, 9.125, 12
    assert g.assign(np.array([0.5, 3.3, 3.375, 12.0, 12.5, np.nan])).tolist() == [0, 0, 1, 3, -1, -1]


# --------------------------------------------------------------------------------------------
# Outputs


def _pngs_in_html(text: str) -> list[Image.Image]:
    images = []
    for payload in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text):
        images.append(Image.open(io.BytesIO(base64.b64decode(payload))))
    return images


@pytest.fixture(scope="module")
def report(analysis, results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(analysis, results, out)


def test_report_html_is_self_contained(report, analysis):
    html_path, _ = report
    assert html_path.name == REPORT_NAME
    text = html_path.read_text(encoding="utf-8")
    images = _pngs_in_html(text)
    # Overview, effects and heatmap per metric, time trade-off, Pareto cells, correlations.
    assert len(images) == 1 + 2 * len(analysis.metrics) + 3
    for im in images:
        im.load()
        assert im.format == "PNG" and im.width >= 800 and im.height >= 400
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)
    assert "<link" not in text and "<script" not in text
    for metric in METRICS:
        assert f"id='metric-{metric}'" in text
    assert "Dunnett" in text and "Holm" in text
    assert not any(p.name.endswith(".tmp") for p in html_path.parent.iterdir())


def test_recommendations_json(report, analysis):
    _, json_path = report
    assert json_path.name == RECOMMENDATIONS_NAME
    payload = json.loads(json_path.read_text(encoding="utf-8"))
    assert {"metrics", "test", "pareto_settings", "correlations", "insufficient_data", "n_images"} <= set(payload)
    assert payload["n_images"] == 2000 and payload["sweeps"] == ["synthetic"]
    assert payload["test"]["alpha"] == 0.05 and "Dunnett" in payload["test"]["comparison_with_best"]
    assert payload["insufficient_data"] == {}
    for metric in METRICS:
        m = payload["metrics"][metric]
        rec = analysis.per_metric[metric].min_steps
        assert m["min_steps"]["steps"] == rec.steps
        assert m["min_steps"]["bin"] == [rec.bin_low, rec.bin_high]
        assert set(m["min_steps"]["estimate"]) == {"mean", "ci_low", "ci_high", "n"}
        assert m["min_steps"]["estimate"]["n"] == rec.estimate.n
        band = m["guidance_band"]["band"]
        assert band[0] <= PEAK_GUIDANCE <= band[1]
        assert m["steps_effect_test"]["significant"] is True
        assert m["pareto_step_bins"], "the per-metric step-bin front is listed"
    assert len(payload["pareto_settings"]) == len(analysis.pareto_settings)
    first = payload["pareto_settings"][0]
    assert set(first) == {"steps", "guidance", "time_ms", "quality_z"}
    for key in ("pearson", "spearman", "pearson_within_prompt", "spearman_within_prompt"):
        assert set(payload["correlations"][key]) == set(METRICS)
        assert payload["correlations"][key]["clip_score"]["clip_score"] == pytest.approx(1.0)


def test_markdown_and_key_numbers(analysis):
    md = analysis_markdown(analysis)
    assert md.count("](data:image/png;base64,") == 3
    for metric in METRICS:
        assert f"| {metric} | {analysis.per_metric[metric].min_steps.steps} steps" in md
    numbers = key_numbers(analysis)
    assert all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in numbers.values())
    assert numbers["n_images"] == 2000 and numbers["n_prompts"] == 8
    for metric in METRICS:
        assert numbers[f"{metric}.min_steps"] == analysis.per_metric[metric].min_steps.steps
        assert numbers[f"{metric}.guidance_low"] <= PEAK_GUIDANCE <= numbers[f"{metric}.guidance_high"]
        assert f"{metric}.min_steps_reason" not in numbers


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed")
def test_report_renders_in_a_browser(report, tmp_path):
    html_path, _ = report
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}", "--window-size=1400,3000", html_path.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    im = Image.open(shot).convert("RGB")
    assert im.size == (1400, 3000)
    pixels = np.asarray(im)
    # The plots are drawn: a good share of the page is not background, and the plot colours appear.
    assert (pixels.min(axis=2) < 200).mean() > 0.03
    blue = (pixels[..., 2] > 140) & (pixels[..., 0] < 80)
    assert blue.sum() > 500


# --------------------------------------------------------------------------------------------
# The asset


def test_export_job_with_no_scored_sweep_analyses_nothing(data_dir, tiny_models_dir, dagster_home):
    """A sweep without images yet: the export is empty, and the analysis says so instead of failing."""
    import dagster as dg

    from flexyface_pipeline_tests.helpers import tiny_defs

    exports = data_dir / "exports"
    exports.mkdir()
    # Left by an analysis of an earlier export: they must not outlive it.
    (exports / REPORT_NAME).write_text("<html>old</html>")
    (exports / RECOMMENDATIONS_NAME).write_text("{}")
    defs = tiny_defs(data_dir, tiny_models_dir)
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["unscored"])
        result = defs.resolve_job_def("export_job").execute_in_process(instance=instance, raise_on_error=False)
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        [exported] = result.asset_materializations_for_node("sweep_results")
        assert exported.metadata["num_rows"].value == 0
        assert exported.metadata["incomplete_sweeps"].value == {"unscored": "not generated"}
        [analysed] = result.asset_materializations_for_node("sweep_analysis")
    assert analysed.metadata["num_rows"].value == 0
    assert analysed.metadata["summary"].value.startswith("Nothing to analyse: the export has no rows")
    assert sorted(analysed.metadata["removed_reports"].value) == sorted(
        [str(exports / REPORT_NAME), str(exports / RECOMMENDATIONS_NAME)])
    assert "report" not in analysed.metadata
    assert len(pd.read_parquet(exports / "sweep_results.parquet")) == 0
    assert not (exports / REPORT_NAME).exists() and not (exports / RECOMMENDATIONS_NAME).exists()

