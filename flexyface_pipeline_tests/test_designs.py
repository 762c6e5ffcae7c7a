"""Sweep designs (grid, Sobol, multi-engine pairing), the scheduler axis and adaptive tuning."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flexyface_pipeline import cli
from flexyface_pipeline.lib.analysis.stats import make_bins
from flexyface_pipeline.lib.config import SweepConfigError, SweepSpec, build_sweep_spec
from flexyface_pipeline.lib.designs import DESIGNS, axis_bins, get_design
from flexyface_pipeline.lib.engines import ENGINES, RealVisXLEngine
from flexyface_pipeline.lib.export import EXPORT_COLUMNS, finalize, write_export
from flexyface_pipeline.lib.generation import verify_image, write_png
from flexyface_pipeline.lib.grid import _representatives
from flexyface_pipeline.lib.sampling import sample_design, sample_parameters
from flexyface_pipeline_tests.conftest import REPO
from flexyface_pipeline_tests.helpers import project_env

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts"
PROMPTS = ["a red car", "an old man", "a bowl of ramen"]


class GuidanceFree(RealVisXLEngine):
    """A registered engine without guidance and with a narrower steps range (never loaded here)."""

    name = "guidance_free"
    steps_limits = (1, 8)
    default_steps = (1, 4)
    guidance_kind = "none"
    guidance_limits = None
    default_guidance = None
    size_multiple = 16


@pytest.fixture
def engines(monkeypatch) -> dict:
    monkeypatch.setitem(ENGINES, GuidanceFree.name, GuidanceFree)
    return ENGINES


def spec(**kw) -> SweepSpec:
    args = dict(sweep="d1", num_images=40, prompts=PROMPTS, prompts_dir=REPO_PROMPTS)
    args.update(kw)
    return build_sweep_spec(**args)


# -- grid ------------------------------------------------------------------------------------


def grid_spec(**kw) -> SweepSpec:
    args = dict(num_images=None, design="grid", steps_values=[8, 16, 24], guidance_values=[2.0, 5.0],
                seeds_per_cell=2)
    return spec(**(args | kw))


def test_grid_has_every_cell_for_every_prompt_with_the_same_seeds():
    s = grid_spec()
    df = sample_parameters(s)
    assert s.num_images == len(df) == 3 * 2 * len(PROMPTS) * 2
    cells = df.groupby(["prompt", "steps", "guidance"]).size()
    assert len(cells) == 3 * 2 * len(PROMPTS) and (cells == 2).all()
    for _, rows in df.groupby("prompt"):
        seeds_per_cell = rows.groupby(["steps", "guidance"])["seed"].apply(lambda s: tuple(sorted(s)))
        assert seeds_per_cell.nunique() == 1  # the same K seeds in every cell of a prompt
    assert df["seed"].nunique() == len(PROMPTS) * 2
    assert sample_parameters(grid_spec()).equals(df)  # re-running changes nothing
    assert df["image_id"].is_unique


def test_grid_over_two_engines_pairs_seeds_and_collapses_guidance(engines):
    s = grid_spec(engines=["realvis_xl", "guidance_free"], steps_values=[4, 8])
    df = sample_parameters(s)
    real, free = df[df["engine"] == "realvis_xl"], df[df["engine"] == "guidance_free"]
    assert len(real) == 2 * 2 * 3 * 2 and len(free) == 2 * 3 * 2  # no guidance axis for guidance_free
    assert free["guidance"].isna().all() and real["guidance"].notna().all()
    key = ["prompt", "steps"]
    assert (real.groupby(key)["seed"].apply(frozenset).to_dict()
            == free.groupby(key)["seed"].apply(frozenset).to_dict())
    assert df["image_id"].is_unique


def test_grid_contact_sheet_fills_every_cell(tmp_path):
    s = grid_spec(prompts=["one prompt"], steps_values=[4, 9, 17, 30], guidance_values=[1.5, 2.0, 7.25])
    df = sample_parameters(s)
    paths = []
    for i in df.index:
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i % 255, 0, 0)).save(path)
        paths.append(str(path))
    df["image_path"] = paths
    bins = axis_bins(s.to_dict())
    assert bins == {"steps_bins": 4, "guidance_bins": 3}
    s_bins = make_bins(df["steps"], bins["steps_bins"], integer=True)
    g_bins = make_bins(df["guidance"], bins["guidance_bins"], integer=False)
    reps = _representatives(df, s_bins, g_bins)
    assert len(reps) == 4 * 3  # every cell of the sheet has an image
    assert {(int(r["steps"]), float(r["guidance"])) for r in reps.values()} == {
        (st, g) for st in (4, 9, 17, 30) for g in (1.5, 2.0, 7.25)}
    from flexyface_pipeline.lib.grid import build_grid

    sheets = build_grid(df, **bins)
    assert len(sheets) == 1


# -- Sobol -----------------------------------------------------------------------------------


def test_sobol_is_deterministic_and_more_even_than_random():
    a, b = sample_design(spec(design="sobol", num_images=256)), sample_design(spec(design="sobol", num_images=256))
    assert a.table.equals(b.table)
    assert a.info["design"] == "sobol"
    assert a.info["discrepancy"] < a.info["random_discrepancy"] / 3
    other = sample_design(spec(design="sobol", num_images=256, base_seed=1)).table
    assert not other["steps"].equals(a.table["steps"])
    assert a.table["steps"].between(8, 48).all() and a.table["guidance"].between(1.0, 8.0).all()


def test_random_design_keeps_its_stream():
    """The random design draws what sample_parameters always drew (the old code, inlined)."""
    import hashlib

    s = spec(num_images=37, steps_min=4, steps_max=60, guidance_min=0.5, guidance_max=12.0, base_seed=7)
    key = int.from_bytes(hashlib.sha256(s.sweep.encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([s.base_seed, key])))
    prompt_index = rng.permutation(np.arange(37) % len(PROMPTS))
    steps = rng.integers(4, 60, size=37, endpoint=True)
    guidance = np.clip(np.round(rng.uniform(0.5, 12.0, size=37), 2), 0.5, 12.0)
    seeds = rng.integers(0, 2**31 - 1, size=37, dtype=np.int64)
    df = sample_parameters(s)
    assert (df["prompt_index"].to_numpy() == prompt_index).all()
    assert (df["steps"].to_numpy() == steps).all()
    assert (df["guidance"].to_numpy() == guidance).all()
    assert (df["seed"].to_numpy() == seeds).all()
    assert "scheduler" not in df  # no scheduler axis: the table has the columns it always had


# -- several engines ---------------------------------------------------------------------------


def test_engines_get_the_same_prompts_and_seeds(engines):
    s = spec(engines=["realvis_xl", "guidance_free"], num_images=30)
    df = sample_parameters(s)
    real, free = df[df["engine"] == "realvis_xl"], df[df["engine"] == "guidance_free"]
    assert len(real) == len(free) == 30
    assert real["prompt"].tolist() == free["prompt"].tolist()
    assert real["seed"].tolist() == free["seed"].tolist()
    assert real["steps"].between(8, 48).all() and free["steps"].between(1, 4).all()  # each engine's default
    # the same quantile: more steps for one engine means at least as many for the other
    order = np.argsort(real["steps"].to_numpy(), kind="stable")
    assert (np.diff(free["steps"].to_numpy()[order]) >= 0).all()
    assert free["guidance"].isna().all() and real["guidance"].between(1.0, 8.0).all()
    # the first engine's rows are those of a single-engine sweep
    single = sample_parameters(spec(num_images=30))
    assert real.reset_index(drop=True)[["prompt", "steps", "guidance", "seed"]].equals(
        single[["prompt", "steps", "guidance", "seed"]])


def test_real_guidance_free_engine_pairs_with_realvis():
    if "flux1_schnell" not in ENGINES:
        pytest.skip("flux1_schnell is not registered")
    df = sample_parameters(spec(engines=["realvis_xl", "flux1_schnell"], num_images=12))
    assert df[df["engine"] == "flux1_schnell"]["guidance"].isna().all()


def test_nan_guidance_is_exported_as_an_empty_cell(tmp_path):
    rows = pd.DataFrame({
        "steps": [4, 4], "guidance": [np.nan, 2.5], "seed": [1, 2], "sweep": "s", "image_id": ["s-1", "s-0"],
        "prompt": "p", "engine": ["guidance_free", "realvis_xl"], "width": 64, "height": 64, "image_path": "x",
        "elapsed_ms": 1.0, "clip_score": 0.5, "aesthetic_score": 5.0, "aes_v2_score": 5.0, "hps_v2_score": 0.2,
    })
    for column in EXPORT_COLUMNS:
        if column not in rows:
            rows[column] = pd.NA  # provenance, not under test here
    df = finalize([rows])
    assert df["guidance"].isna().tolist() == [False, True]  # NaN sorts last
    _, csv = write_export(df, tmp_path)
    lines = csv.read_text().splitlines()
    assert lines[2].startswith("4,,")  # empty, not a number
    assert df["scheduler"].isna().all()


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--design", "grid", "--steps", "--guidance", "2"], "expected at least one argument"),
    (["--design", "grid", "--steps", "8", "8", "--guidance", "2"], "duplicate value(s) [8]"),
    (["--design", "grid", "--steps", "8", "70", "--guidance", "2"], "outside engine realvis_xl"),
    (["--design", "grid", "--steps", "8", "--guidance", "2", "--seeds-per-cell", "0"], "seeds_per_cell: must be a positive"),
    (["--design", "grid", "--steps", "8", "--guidance", "2", "--images", "5"], "leave num_images out or set it to"),
    (["--images", "4", "--design", "latin"], "unknown design 'latin'; known designs: random, grid, sobol, adaptive"),
    (["--images", "4", "--engine", "realvis_xl", "guidance_free", "--steps", "8", "20"], "of engine guidance_free"),
    (["--images", "4", "--engine", "guidance_free", "--guidance", "1", "3"], "takes no guidance"),
    (["--images", "4", "--engine", "guidance_free", "--size", "520x512"], "not a multiple of 16"),
    (["--images", "4", "--scheduler", "Heun"], "unknown scheduler 'Heun' for engine realvis_xl; known: ['Euler'"),
    (["--images", "4", "--scheduler", "Euler", "Euler"], "duplicate scheduler(s)"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, fragment, engines, tmp_path, monkeypatch, caplog, capsys):
    data = tmp_path / "data"
    (data / "prompts").mkdir(parents=True)
    (data / "prompts" / "p.txt").write_text("a\nb\n")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")  # the instance is checked first
    for key, value in project_env(home, data, tmp_path / "models").items():  # every setting, as .env has them
        if key.startswith(("FLEXYFACE_", "DAGSTER_")):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(["sweep", "bad", "--prompt-file", "p.txt", *argv])
    except SystemExit as exit_:  # argparse refuses an option without its values
        code = exit_.code
    text = caplog.text + capsys.readouterr().err
    assert code == 2 and fragment in text
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == ["prompts", "prompts/p.txt"]
    assert [p.name for p in home.iterdir()] == ["dagster.yaml"]  # no instance storage, no partition


def test_tune_budget_smaller_than_one_round_is_refused():
    with pytest.raises(SweepConfigError, match="less than one round"):
        spec(design="adaptive", num_images=8, rounds=5, objective="combined")
    with pytest.raises(SweepConfigError, match="unknown objective 'fid'"):
        spec(design="adaptive", num_images=80, rounds=5, objective="fid")


def test_design_registry_refuses_unknown_names():
    assert list(DESIGNS) == ["random", "grid", "sobol", "adaptive"]
    with pytest.raises(ValueError, match="unknown design 'x'; known designs: random, grid, sobol, adaptive"):
        get_design("x")


def test_stored_spec_without_engines_still_loads():
    old = {"sweep": "old", "num_images": 5, "steps_min": 8, "steps_max": 48, "guidance_min": 1.0,
           "guidance_max": 8.0, "width": 512, "height": 512, "prompts": ["a"], "base_seed": 0, "engine": "realvis_xl"}
    loaded = SweepSpec.from_dict(old)
    assert loaded.engines == ("realvis_xl",) and loaded.design == "random"
    new = spec(sweep="old", num_images=5, prompts=["a"], prompt_files=[])
    assert loaded.to_dict() == new.to_dict()  # the same settings again: not a redefinition


# -- scheduler axis ------------------------------------------------------------------------------


def test_png_without_scheduler_key_matches_default_rows_only(tmp_path):
    row = {"image_id": "s-00000", "prompt": "p", "steps": 4, "guidance": 2.0, "seed": 1, "width": 8, "height": 8,
           "engine": "realvis_xl"}
    path = write_png(tmp_path / "a.png", Image.new("RGB", (8, 8)), dict(row))  # written before the axis existed
    assert verify_image(path, row) is not None
    assert verify_image(path, row | {"scheduler": None}) is not None
    assert verify_image(path, row | {"scheduler": float("nan")}) is not None
    assert verify_image(path, row | {"scheduler": "Euler a"}) is None


def test_scheduler_axis_is_balanced_and_in_the_table():
    df = sample_parameters(spec(num_images=40, schedulers=["Euler", "DPM++ 2M Karras"], sizes=[(64, 64), (64, 128)]))
    assert sorted(df["scheduler"].value_counts().tolist()) == [20, 20]
    assert set(zip(df["width"], df["height"])) == {(64, 64), (64, 128)}
    g = sample_parameters(grid_spec(schedulers=["Euler", "UniPC"]))
    assert len(g) == 3 * 2 * 2 * len(PROMPTS) * 2


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sched") / "tiny"
    RealVisXLEngine.build_tiny(directory)
    return directory


@pytest.mark.slow
def test_each_scheduler_matches_stock_diffusers(tiny_sdxl):
    import diffusers
    import torch
    from diffusers import StableDiffusionXLPipeline

    from flexyface_pipeline.lib.engines import ImageRequest
    from flexyface_pipeline.lib.models.common import resolve_runtime

    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, dtype=torch.float32, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    own = stock.scheduler
    images = {}
    with RealVisXLEngine.load(str(tiny_sdxl), resolve_runtime("cpu", "auto"), offline=True) as engine:
        for name in ("Euler a", "DPM++ 2M Karras", None):
            request = ImageRequest("i", "a red car", 3, 4.0, 11, 64, 64, scheduler=name)
            got = engine.generate_arrays([request])[0]
            if name is None:
                stock.scheduler = own
            else:
                class_name, settings = RealVisXLEngine.schedulers[name]
                stock.scheduler = getattr(diffusers, class_name).from_config(own.config, **settings)
            want = stock(prompt="a red car", num_inference_steps=3, guidance_scale=4.0, width=64, height=64,
                         generator=torch.Generator("cpu").manual_seed(11), output_type="np").images[0]
            np.testing.assert_allclose(got, want, atol=1e-5)
            images[name] = got
        assert np.abs(images["Euler a"] - images[None]).max() > 1e-3  # the scheduler changes the image
        with pytest.raises(ValueError, match=r"unknown scheduler 'Heun'; known: \['Euler', 'Euler a'"):
            engine.generate_arrays([ImageRequest("i", "a", 2, 4.0, 1, 64, 64, scheduler="Heun")])
    assert RealVisXLEngine.batch_key(ImageRequest("a", "p", 2, 4.0, 1, 64, 64, scheduler="Euler")) != \
        RealVisXLEngine.batch_key(ImageRequest("a", "p", 2, 4.0, 1, 64, 64))


# -- adaptive ------------------------------------------------------------------------------------


def tune_spec(seed: int, budget: int = 120, rounds: int = 4) -> SweepSpec:
    return spec(sweep=f"tune{seed}", design="adaptive", num_images=budget, rounds=rounds, objective="clip_score",
                prompts=["a", "b"], base_seed=seed)


def test_tuned_sweep_gets_closer_to_the_known_front_than_random():
    """Same budget (120 images, 2 prompts), 4 seeds: the Pareto settings the tuner found lie on average
    closer to the known front (quality gap at equal time) than those of a random sweep; measured
    here: mean gap about half of random's. Asserted: below 0.75 × random's."""
    import optuna

    from flexyface_pipeline.lib.tuning import SyntheticObjective, observed_front, run_tuning

    objective = SyntheticObjective()
    tuned, random = [], []
    for seed in range(4):
        s = tune_spec(seed)
        table = run_tuning(s, optuna.storages.InMemoryStorage(), lambda t, seed=seed: objective.evaluate(t, seed))
        assert len(table) == 120 and table["image_id"].is_unique and table["trial"].nunique() == 60
        front = observed_front(objective.evaluate(table, seed))
        tuned.append(objective.distance(front["steps"], front["guidance"]).mean())
        plain = sample_parameters(spec(sweep=f"tune{seed}", num_images=120, prompts=["a", "b"], base_seed=seed))
        front = observed_front(objective.evaluate(plain, seed))
        random.append(objective.distance(front["steps"], front["guidance"]).mean())
    assert np.mean(tuned) < 0.75 * np.mean(random), (tuned, random)


def test_killed_tuning_resumes_without_repeating_trials(tmp_path):
    from flexyface_pipeline.lib.tuning import SyntheticObjective, Tuner, run_tuning, sqlite_url

    objective = SyntheticObjective()
    s = tune_spec(0, budget=48, rounds=4)  # 24 trials, 6 per round
    url = sqlite_url(tmp_path)
    first = run_tuning(s, url, objective.evaluate, max_rounds=2)
    assert first["trial"].nunique() == 12 and len(first) == 24
    told_before = Tuner(s, url).finished()
    assert told_before == 6  # the second round's trials wait for their scores
    # A new process: a new study object on the same database, continuing with the rows written so far.
    table = run_tuning(s, url, objective.evaluate, table=first)
    study = Tuner(s, url).study
    assert len(study.trials) == 24 and Tuner(s, url).finished() == 24
    assert table["trial"].nunique() == 24 and len(table) == 48 and table["image_id"].is_unique
    assert table.iloc[:24].equals(first)  # earlier rows untouched, new ones appended
    assert Path(url.removeprefix("sqlite:///")).name == "optuna.db"


def test_categorical_effect_per_scheduler_with_intervals():
    from flexyface_pipeline.lib.analysis.categorical import categorical_axes, categorical_effect

    rng = np.random.default_rng(0)
    n = 120
    scheduler = np.array(["Euler", "UniPC", None], dtype=object)[np.arange(n) % 3]
    prompt = np.array(["a", "b"])[np.arange(n) // 3 % 2]
    # UniPC is better by 1 within each prompt; prompt b scores higher overall
    score = rng.normal(size=n) * 0.3 + (scheduler == "UniPC") * 1.0 + (prompt == "b") * 5.0
    df = pd.DataFrame({"scheduler": scheduler, "prompt": prompt, "clip_score": score, "width": 64, "height": 64,
                       "engine": "realvis_xl"})
    assert categorical_axes(df) == ["scheduler"]
    effect = categorical_effect(df, "scheduler", "clip_score", n_resamples=200).set_index("value")
    assert list(effect.index) == ["Euler", "UniPC", "default"] and (effect["n"] == 40).all()
    assert effect.at["UniPC", "z_ci_low"] > effect.at["Euler", "z_ci_high"]
    assert effect.at["UniPC", "z_ci_low"] > effect.at["default", "z_ci_high"]
    with pytest.raises(ValueError, match="categorical axis 'sampler' is not in the table"):
        categorical_effect(df, "sampler", "clip_score")


def test_report_has_categorical_section_and_handles_nan_guidance(tmp_path):
    import json

    from flexyface_pipeline.lib.analysis import analyze, write_report
    from flexyface_pipeline_tests.test_analysis import synthetic_results

    df = synthetic_results(n=300, seed=1)
    df["scheduler"] = np.array(["Euler", "UniPC", None], dtype=object)[np.arange(len(df)) % 3]
    guidance_free = df.index % 2 == 1
    df["engine"] = np.where(guidance_free, "guidance_free", "realvis_xl")
    df.loc[guidance_free, "guidance"] = np.nan
    html_path, json_path = write_report(analyze(df, bootstrap=100), df, tmp_path)
    effects = json.loads(json_path.read_text())["categorical_effects"]
    assert {(e["axis"], e["value"]) for e in effects} == {
        ("engine", "realvis_xl"), ("engine", "guidance_free"),
        ("scheduler", "Euler"), ("scheduler", "UniPC"), ("scheduler", "default")}
    assert all(e["z_ci_low"] <= e["z_mean"] <= e["z_ci_high"] for e in effects)
    assert "<h2>Categorical axes</h2>" in html_path.read_text()


@pytest.mark.slow
def test_tuning_rounds_through_dagster_grow_the_sweep(data_dir, tiny_models_dir, dagster_home, monkeypatch):
    """Each sweep_job run of an adaptive sweep appends one round; earlier images are kept; the
    study lives in optuna.db beside the instance's storage; the tune_rounds sensor asks for the
    next round after each successful one, and for none once the budget is spent."""
    import dagster as dg

    from flexyface_pipeline.defs.tuning import TUNE_TAG, tune_rounds, tuning_finished
    from flexyface_pipeline.lib.store import SweepStore
    from flexyface_pipeline_tests.helpers import tiny_defs

    defs = tiny_defs(data_dir, tiny_models_dir)
    config = {"num_images": 4, "design": "adaptive", "rounds": 2, "objective": "combined", "prompts": ["a cat", "a dog"],
              "prompt_files": [], "width": 64, "height": 64, "steps_min": 4, "steps_max": 5}
    store = SweepStore(data_dir)
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["tuned"])
        job = defs.resolve_job_def("sweep_job")
        monkeypatch.setenv("FLEXYFACE_DATA_DIR", str(data_dir))  # what the sensor's code location reads
        seen, requested = [], []
        for _ in range(3):
            result = job.execute_in_process(instance=instance, partition_key="tuned", tags={TUNE_TAG: "tuned"},
                                            run_config={"ops": {"sweep_parameters": {"config": config}}})
            assert result.success
            context = dg.build_run_status_sensor_context(
                sensor_name="tune_rounds", dagster_instance=instance, dagster_run=result.dagster_run,
                dagster_event=result.get_run_success_event())
            request = tune_rounds(context)
            requested.append(None if request is None else (request.partition_key, request.tags.get(TUNE_TAG)))
            images = next(e for e in result.get_asset_materialization_events()
                          if e.asset_key.path == ["generated_images"]).materialization.metadata
            params = store.read_table("parameters", "tuned")
            seen.append((len(params), images["generated"].value, images["reused_verified"].value))
        assert seen == [(2, 2, 0), (4, 2, 2), (4, 0, 4)]  # round 1, round 2, then the budget is spent
        # The sensor asks for a run after each round until every trial is told its scores (the run
        # after the last round tells them and appends nothing), then stops.
        assert requested == [("tuned", "tuned"), ("tuned", "tuned"), None]
        assert params["trial"].tolist() == [0, 0, 1, 1] and params["image_id"].is_unique
        assert tuning_finished(instance, store, "tuned")
        assert (dagster_home / "optuna.db").is_file()
