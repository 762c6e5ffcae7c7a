"""The cross-engine analysis recovers a known best engine from synthetic paired rows."""

from __future__ import annotations

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.analysis.engines import comparison_dict, comparison_markdown, compare_engines
from flexyface_pipeline.lib.config import METRICS

OFFSETS = {"alpha": 0.0, "beta": 0.6, "gamma": -0.4}  # beta is the best engine, by 0.6 score sd
TIME_MS = {"alpha": 400.0, "beta": 900.0, "gamma": 150.0}


def _rows(pairs_per_prompt: int = 40, seed: int = 0) -> pd.DataFrame:
    """Paired rows as a multi-engine sweep makes them: every engine gets the same prompts and
    seeds; a row's quality is prompt difficulty + seed luck (shared by the pair) + the engine's
    offset + noise; time grows with steps."""
    rng = np.random.default_rng(seed)
    prompts = [f"prompt {i}" for i in range(4)]
    base = []
    for p, prompt in enumerate(prompts):
        for k in range(pairs_per_prompt):
            base.append({"prompt": prompt, "seed": int(rng.integers(0, 2**31)), "luck": rng.normal(),
                         "difficulty": p * 2.0, "u": rng.random()})
    rows, index = [], 0
    for engine, offset in OFFSETS.items():
        for b in base:
            steps = int(4 + round(b["u"] * 20))
            row = {"engine": engine, "prompt": b["prompt"], "seed": b["seed"], "index": index, "steps": steps,
                   "guidance": np.nan if engine == "gamma" else 2.0 + 4 * b["u"],
                   "elapsed_ms": TIME_MS[engine] * steps / 14 * (1 + 0.05 * rng.random())}
            for metric in METRICS:
                row[metric] = b["difficulty"] + b["luck"] + offset + 0.3 * rng.normal()
            rows.append(row)
            index += 1
    return pd.DataFrame(rows)


def test_the_known_best_engine_is_found_and_the_pairs_say_so() -> None:
    cmp = compare_engines(_rows(), METRICS, bootstrap=400, seed=1)
    assert cmp is not None
    assert cmp.best_engine == "beta"
    ranking = list(cmp.engines.sort_values("combined", ascending=False)["engine"])
    assert ranking == ["beta", "alpha", "gamma"]
    pairs = cmp.paired.set_index(["engine_a", "engine_b"])
    # Pairs share prompt and seed luck, so the differences are tight around the offsets.
    ab = pairs.loc[("alpha", "beta")]
    assert ab["pairs"] == 160 and ab["better"] == "beta"
    assert ab["ci_low"] < ab["diff"] < ab["ci_high"] < 0
    ag = pairs.loc[("alpha", "gamma")]
    assert ag["better"] == "alpha" and ag["ci_low"] > 0
    # Per prompt as well: four prompts per pair of engines.
    assert len(cmp.paired_by_prompt) == 3 * 4
    # The front: gamma is fastest (on the front), beta best (on the front); alpha's cells are
    # dominated by beta's or gamma's unless they are the fastest at their quality.
    front = cmp.cells[cmp.cells["on_front"]]
    assert {"beta", "gamma"} <= set(front["engine"])
    assert (cmp.cells.loc[cmp.cells["engine"] == "gamma", "guidance"] == "—").all()
    # What the report and the UI show.
    assert comparison_dict(cmp)["best_engine"] == "beta"
    text = comparison_markdown(cmp)
    assert "best: `beta`" in text and "alpha − beta" in text


def test_one_engine_has_nothing_to_compare() -> None:
    rows = _rows(pairs_per_prompt=5)
    assert compare_engines(rows[rows["engine"] == "alpha"], METRICS) is None


def test_no_difference_is_not_claimed() -> None:
    rows = _rows(pairs_per_prompt=10, seed=3)
    for metric in METRICS:  # the same quality for every engine: the offsets removed
        rows[metric] -= rows["engine"].map(OFFSETS)
    cmp = compare_engines(rows, METRICS, bootstrap=400, seed=2)
    claims = cmp.paired["better"].tolist()
    assert claims.count("") >= 2, cmp.paired


def test_the_report_compares_engines_and_analyses_each_alone(tmp_path) -> None:
    import json

    from flexyface_pipeline.lib.analysis import analyze, write_report
    from flexyface_pipeline.lib.analysis.engines import NO_GUIDANCE_REASON, analyze_engine

    df = _rows(pairs_per_prompt=20)
    df["sweep"], df["width"], df["height"] = "cmp", 64, 64
    df["image_id"] = [f"cmp-{i:05d}" for i in range(len(df))]
    cmp = compare_engines(df, METRICS, bootstrap=200)
    per_engine = {e: analyze_engine(rows, METRICS, bootstrap=200) for e, rows in df.groupby("engine")}
    # The guidance-free engine is analysed over steps; its guidance band is refused for that reason.
    gamma = per_engine["gamma"].per_metric["hps_v2_score"]
    assert gamma.guidance_band is None and gamma.guidance_band_reason == NO_GUIDANCE_REASON
    assert per_engine["alpha"].per_metric["hps_v2_score"].guidance_band_reason != NO_GUIDANCE_REASON
    html, recommendations = write_report(analyze(df, metrics=METRICS, bootstrap=200), df, tmp_path,
                                         engines=cmp, per_engine=per_engine)
    data = json.loads(recommendations.read_text())
    assert data["engines_compared"]["best_engine"] == "beta" and sorted(data["per_engine"]) == ["alpha", "beta", "gamma"]
    page = html.read_text()
    assert "Engines compared" in page and "Recommendations for gamma alone" in page


def test_a_two_engine_sweep_through_dagster_pairs_prompts_and_seeds(data_dir, tiny_models_dir, dagster_home) -> None:
    import json

    import dagster as dg

    from flexyface_pipeline_tests.helpers import run_sweep, tiny_defs

    defs = tiny_defs(data_dir, tiny_models_dir)
    with dg.DagsterInstance.get() as instance:
        result = run_sweep(defs, instance, "two", 4, engines=["realvis_xl", "flux1_schnell"], steps_min=4,
                           steps_max=5, guidance_min=2.0, guidance_max=6.0)
        assert result.success
        assert defs.resolve_job_def("export_job").execute_in_process(instance=instance).success
    export = pd.read_parquet(data_dir / "exports" / "sweep_results.parquet")
    assert export.groupby("engine").size().to_dict() == {"flux1_schnell": 4, "realvis_xl": 4}
    pairs = {e: sorted(zip(rows["prompt"], rows["seed"])) for e, rows in export.groupby("engine")}
    assert pairs["realvis_xl"] == pairs["flux1_schnell"]  # the same prompts and seeds for both engines
    assert export.loc[export["engine"] == "flux1_schnell", "guidance"].isna().all()
    assert export.loc[export["engine"] == "realvis_xl", "guidance"].between(2.0, 6.0).all()
    assert set(export["engine_model"].map(lambda p: p.rsplit("/", 1)[-1])) == {"realvis_xl", "flux1_schnell"}
    recommendations = json.loads((data_dir / "exports" / "recommendations.json").read_text())
    assert sorted(recommendations["per_engine"]) == ["flux1_schnell", "realvis_xl"]
    assert recommendations["engines_compared"]["paired_differences"][0]["pairs"] == 4


def test_each_sweep_gets_its_own_plots_once_it_has_enough_images() -> None:
    from flexyface_pipeline.defs.assets.analysis import SWEEP_PLOT_MIN_IMAGES, sweep_plots

    rows = _rows(pairs_per_prompt=20)
    rows["sweep"] = "own"
    one = rows[rows["engine"] == "alpha"]
    figures, why = sweep_plots("own", one)
    assert why == "" and len(figures) >= 8
    assert {f.key.split("/")[1] for f in figures} == {"analysis"} and all(f.png[:4] == b"\x89PNG" for f in figures)
    # An engine without guidance is analysed over steps alone.
    figures, why = sweep_plots("own", rows[rows["engine"] == "gamma"])
    assert why == "" and figures
    few, why = sweep_plots("own", one.head(SWEEP_PLOT_MIN_IMAGES - 1))
    assert few == [] and f"fewer than the {SWEEP_PLOT_MIN_IMAGES}" in why
