"""The asset graph end to end on tiny models, through a real (temporary) Dagster instance."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import dagster as dg
from PIL import Image

from flexyface_pipeline.lib.config import METRICS
from flexyface_pipeline.lib.export import EXPORT_COLUMNS
from flexyface_pipeline.lib.generation import generate_sweep, read_png_record
from flexyface_pipeline.lib.store import SweepStore
from flexyface_pipeline_tests.helpers import project_env, file_hashes, run_sweep, tiny_defs, tiny_resources

ASSET_KEYS = {
    "sweep_parameters",
    "generated_images",
    "clip_scores",
    "aesthetic_scores",
    "aes_v2_scores",
    "hps_v2_scores",
    "sweep_results",
    "sweep_analysis",
    "image_grid",
}


def test_definitions_load_with_the_asset_keys():
    from flexyface_pipeline.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert ASSET_KEYS <= keys
    for job in ("sweep_job", "export_job"):
        assert defs.resolve_job_def(job).name == job
    gpu_assets = {"generated_images", "clip_scores", "aesthetic_scores", "aes_v2_scores", "hps_v2_scores"}
    for spec in defs.resolve_asset_graph().asset_nodes:
        if spec.key.to_user_string() in gpu_assets:
            assert spec.pools == {"gpu"}


def test_whole_graph_materializes_and_exports(data_dir, tiny_models_dir, dagster_home):
    defs = tiny_defs(data_dir, tiny_models_dir)
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        result = run_sweep(defs, instance, "e2e", 8)
        assert result.success
        # A partition added by hand (the UI's "Add partition") with a name no sweep can have is
        # reported, and does not stop the export of the others.
        instance.add_dynamic_partitions("sweeps", ["My sweep"])
        export = defs.resolve_job_def("export_job").execute_in_process(instance=instance)
        assert export.success
        [materialization] = export.asset_materializations_for_node("sweep_results")
        incomplete = materialization.metadata["incomplete_sweeps"].value
        assert list(incomplete) == ["My sweep"] and incomplete["My sweep"].startswith("invalid sweep name")
        assert materialization.metadata["dagster/row_count"].value == 8
        # Every contact sheet as an inline figure on the asset's page (defs/figures.py): one column
        # schema entry per sheet, the sheet a data URL in its description.
        [grid] = result.asset_materializations_for_node("image_grid")
        sheets_md = grid.metadata["contact_sheets"].value
        assert sheets_md.count("](data:image/png;base64,") == grid.metadata["sheets"].value == 4
        figures = grid.metadata["dagster/column_schema"].schema.columns
        assert [f.name for f in figures] == sorted(f"e2e/{p.stem}" for p in (data_dir / "exports" / "grids" / "e2e").glob("*.png"))
        assert all(f.type == "png" and f.description.startswith("![") and "](data:image/png;base64," in f.description
                   and "<img" not in f.description for f in figures)
        # The export's columns with their types and meaning, and a preview of its rows.
        schema = materialization.metadata["dagster/column_schema"].schema
        assert [c.name for c in schema.columns] == EXPORT_COLUMNS
        types = {c.name: c.type for c in schema.columns}
        assert (types["steps"], types["clip_score"], types["prompt"]) == ("int", "float", "string")
        assert all(c.description for c in schema.columns)
        preview = materialization.metadata["preview"].value
        assert len(preview.records) == 8 and preview.records[0].data["sweep"] == "e2e"
        assert isinstance(preview.records[0].data["hps_v2_score"], float)
        # The analysis: every plot as an inline figure, and per metric its recommendation or refusal.
        [analysed] = export.asset_materializations_for_node("sweep_analysis")
        plots = [c.name for c in analysed.metadata["dagster/column_schema"].schema.columns]
        assert plots[0] == "overview" and {"hps_v2_score_heatmap", "correlations", "time_tradeoff"} <= set(plots)
        for metric in METRICS:
            text = analysed.metadata[f"recommended.{metric}"].value
            assert len(text) < 1000 and "Fewest steps: none — insufficient data" in text, text
        mats = instance.fetch_materializations(dg.AssetKey("hps_v2_scores"), limit=10).records
        assert [m.partition_key for m in mats] == ["e2e"]
        # Progress of the generation while it ran: the first batch, the last, and at most one
        # every 5 s between them, with the latest image inline.
        seen = instance.fetch_observations(dg.AssetKey("generated_images"), limit=50).records
        observed = sorted((r.asset_observation for r in seen), key=lambda o: o.metadata["done"].value)
        assert {o.partition for o in observed} == {"e2e"} and 2 <= len(observed) < 8
        done = [o.metadata["done"].value for o in observed]
        assert 1 <= done[0] <= 3 and done[-1] == 8 and len(set(done)) == len(done)
        assert {o.metadata["total"].value for o in observed} == {8}
        assert observed[-1].metadata["progress"].value.startswith("generated 8/8 images (100 %), ")
        assert observed[-1].metadata["eta"].value == "0 s"
        latest = observed[-1].metadata["latest_image"].value
        assert latest.startswith(str(data_dir / "images" / "e2e")) and latest.endswith(".png")
        assert observed[-1].metadata["preview"].value.startswith("![")
        assert "](data:image/png;base64," in observed[-1].metadata["preview"].value
        checks = {e.check_name: e.passed for e in export.get_asset_check_evaluations()}
        assert checks["export_clip_score"] and checks["export_images_exist"] and checks["export_hps_v2_score"]
        run_checks = [(e.asset_key.to_user_string(), e.check_name, e.passed) for e in result.get_asset_check_evaluations()]
        assert len(run_checks) == 5 and all(passed for _, _, passed in run_checks), run_checks

    df = pd.read_parquet(data_dir / "exports" / "sweep_results.parquet")
    csv = pd.read_csv(data_dir / "exports" / "sweep_results.csv")
    assert list(df.columns) == EXPORT_COLUMNS == list(csv.columns)
    assert len(df) == 8 == len(csv)
    for metric in METRICS:
        assert np.isfinite(df[metric]).all()
    assert df["clip_score"].between(0, 1).all()
    assert df["steps"].between(4, 7).all()
    assert (df["elapsed_ms"] > 0).all()
    assert df["prompt"].nunique() == 4
    # every image exists, decodes at the sweep's size and carries its row
    for row in df.itertuples():
        path = data_dir / row.image_path
        with Image.open(path) as im:
            assert im.size == (64, 64)
        record = read_png_record(path)
        assert record["seed"] == row.seed and record["steps"] == row.steps
    assert df["hps_v2_model_revision"].str.startswith("sha256:").all()
    # analysis and contact sheets: 8 images are too few to recommend anything, and the report says so
    import json

    recommendations = json.loads((data_dir / "exports" / "recommendations.json").read_text())
    assert (data_dir / "exports" / "sweep_report.html").stat().st_size > 10_000
    assert recommendations["metrics"]["clip_score"]["min_steps"] is None
    assert "insufficient" in recommendations["metrics"]["clip_score"]["min_steps_reason"].lower()
    sheets = sorted((data_dir / "exports" / "grids" / "e2e").glob("*.png"))
    assert len(sheets) == 4  # one per prompt


def test_rescoring_one_metric_touches_only_its_table(data_dir, tiny_models_dir, dagster_home, tmp_path):
    """The documented CLI line re-scores HPS alone; images and other score tables keep their bytes."""
    defs = tiny_defs(data_dir, tiny_models_dir)
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        assert run_sweep(defs, instance, "r1", 6).success
    before = file_hashes(data_dir / "images") | file_hashes(data_dir / "sweeps")
    hps = data_dir / "sweeps" / "r1" / "hps_v2_scores.parquet"
    hps.unlink()  # proves the table is written again by the re-score
    # Every setting of .env.example, with this test's instance, data and tiny models.
    env = project_env(dagster_home, data_dir, tiny_models_dir)
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "flexyface_pipeline.definitions",
           "--select", "hps_v2_scores", "--partition", "r1"]
    # cwd: not the repository, whose .env (written by make) would override these variables
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = file_hashes(data_dir / "images") | file_hashes(data_dir / "sweeps")
    assert set(before) == set(after)
    changed = {k for k in before if before[k] != after[k]}
    # Same weights: even the HPS table may be byte-identical; the manifest records its checksum anew.
    assert changed <= {"r1/hps_v2_scores.parquet", "r1/manifest.json"}
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = instance.get_runs(limit=1)
        assert runs[0].asset_selection == {dg.AssetKey("hps_v2_scores")}


def test_growing_keeps_earlier_sweeps_untouched(data_dir, tiny_models_dir, dagster_home):
    defs = tiny_defs(data_dir, tiny_models_dir)
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        assert run_sweep(defs, instance, "g1", 4).success
        first = file_hashes(data_dir / "images" / "g1") | file_hashes(data_dir / "sweeps" / "g1")
        assert run_sweep(defs, instance, "g2", 5, base_seed=11).success
        assert defs.resolve_job_def("export_job").execute_in_process(instance=instance).success
        second_run = instance.get_runs(limit=2)[1]
    assert first == file_hashes(data_dir / "images" / "g1") | file_hashes(data_dir / "sweeps" / "g1")
    df = pd.read_parquet(data_dir / "exports" / "sweep_results.parquet")
    assert df.groupby("sweep").size().to_dict() == {"g1": 4, "g2": 5}
    assert second_run.tags.get("dagster/partition") == "g2"


class _Crash(RuntimeError):
    pass


def test_resume_after_a_crash_regenerates_at_most_one_batch(data_dir, tiny_models_dir, tmp_path):
    from flexyface_pipeline.lib.config import build_sweep_spec
    from flexyface_pipeline.lib.sampling import sample_parameters

    models = tiny_resources(data_dir, tiny_models_dir)["models"]
    spec = build_sweep_spec(sweep="crash", num_images=10, steps_min=4, steps_max=5, width=64, height=64,
                            prompt_files=["demo.txt"], prompts_dir=data_dir / "prompts", base_seed=5)
    params = sample_parameters(spec)
    store = SweepStore(data_dir)
    calls = {"n": 0}

    def crash_after_first_batches(done: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash("power cut")

    with pytest.raises(_Crash):
        generate_sweep(params, store, lambda: models.engine("realvis_xl"), batch_size=3,
                       after_batch=crash_after_first_batches)
    finished = sorted(p.name for p in store.images_dir("crash").glob("*.png"))
    assert not list(store.images_dir("crash").glob("*.tmp"))
    assert 3 <= len(finished) < 10
    # a half-written file is not an image: truncate one, it must be regenerated
    victim = store.images_dir("crash") / finished[0]
    victim.write_bytes(victim.read_bytes()[:200])

    report = generate_sweep(params, store, lambda: models.engine("realvis_xl"), batch_size=3)
    assert report.reused == len(finished) - 1
    assert report.generated == 10 - len(finished) + 1
    assert sorted(p.name for p in store.images_dir("crash").glob("*.png")) == sorted(report.table["image_path"].str.split("/").str[-1])

    # same pixels as an uninterrupted run
    clean = SweepStore(tmp_path / "clean")
    generate_sweep(params, clean, lambda: models.engine("realvis_xl"), batch_size=3)
    models.release()
    for name in report.table["image_id"]:
        a = np.asarray(Image.open(store.image_path("crash", name)))
        b = np.asarray(Image.open(clean.image_path("crash", name)))
        assert np.array_equal(a, b), name


def test_redefining_a_sweep_drops_its_old_images_and_scores_tables(data_dir, tiny_models_dir, dagster_home):
    from flexyface_pipeline.defs.assets.sweep import sweep_parameters
    from flexyface_pipeline.lib.export import SCORE_TABLES
    from flexyface_pipeline_tests.helpers import sweep_run_config

    defs = tiny_defs(data_dir, tiny_models_dir)
    store = SweepStore(data_dir)
    derived = ["images"] + [table for table, _ in SCORE_TABLES.values()]
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        assert run_sweep(defs, instance, "r", 3).success
        assert all(store.has_table(t, "r") for t in derived)
        old = store.read_table("parameters", "r")
        # New settings for the sweep, and nothing else run yet (as when a later step fails).
        result = dg.materialize([sweep_parameters], partition_key="r", instance=instance,
                                resources=tiny_resources(data_dir, tiny_models_dir),
                                run_config=sweep_run_config(3, guidance_min=10.0, guidance_max=12.0))
        assert result.success
        assert not any(store.has_table(t, "r") for t in derived)
        new = store.read_table("parameters", "r")
        assert (new["guidance"] >= 10.0).all() and not new["guidance"].equals(old["guidance"])
        # The next full run makes images and scores of the new rows.
        assert run_sweep(defs, instance, "r", 3, guidance_min=10.0, guidance_max=12.0).success
        assert defs.resolve_job_def("export_job").execute_in_process(instance=instance).success
    df = pd.read_parquet(data_dir / "exports" / "sweep_results.parquet")
    assert sorted(df["guidance"]) == sorted(new["guidance"])
    for path in df["image_path"]:
        assert read_png_record(data_dir / path)["guidance"] >= 10.0


def test_a_redefined_sweep_leaves_the_export_in_the_step_that_redefines_it(data_dir, tiny_models_dir, dagster_home):
    """A run stopped right after sweep_parameters (only that step runs here) leaves an export without
    the sweep's superseded rows and without its old contact sheets; the other sweep's rows stay as
    they were."""
    from flexyface_pipeline_tests.helpers import sweep_run_config

    defs = tiny_defs(data_dir, tiny_models_dir)
    exports = data_dir / "exports"
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        # Both sweeps in one run (a partition range: each model loads once).
        instance.add_dynamic_partitions("sweeps", ["kept", "redo"])
        assert defs.resolve_job_def("sweep_job").execute_in_process(
            instance=instance, run_config=sweep_run_config(3),
            tags={"dagster/asset_partition_range_start": "kept", "dagster/asset_partition_range_end": "redo"}).success
        assert defs.resolve_job_def("export_job").execute_in_process(instance=instance).success
        old = pd.read_parquet(exports / "sweep_results.parquet")
        old_csv = (exports / "sweep_results.csv").read_text().splitlines(keepends=True)
        assert old.groupby("sweep").size().to_dict() == {"kept": 3, "redo": 3}
        sheets = sorted((exports / "grids" / "redo").glob("*.png"))
        kept_sheets = file_hashes(exports / "grids" / "kept")
        assert sheets and kept_sheets
        report = file_hashes(exports)["sweep_report.html"]

        result = defs.resolve_job_def("sweep_job").execute_in_process(
            instance=instance, partition_key="redo", asset_selection=[dg.AssetKey("sweep_parameters")],
            run_config=sweep_run_config(3, guidance_min=10.0, guidance_max=12.0))
        assert result.success
        assert [s.step_key for s in result.get_step_success_events()] == ["sweep_parameters"]
        [mat] = result.asset_materializations_for_node("sweep_parameters")
        assert mat.metadata["export_rows_dropped"].value == 3
        assert mat.metadata["contact_sheets_removed"].value == len(sheets)

    new = pd.read_parquet(exports / "sweep_results.parquet")
    pd.testing.assert_frame_equal(new, old[old["sweep"] == "kept"].reset_index(drop=True))
    keep = [True, *(old["sweep"] == "kept")]  # the header, then the rows in the Parquet file's order
    assert (exports / "sweep_results.csv").read_text().splitlines(keepends=True) == [
        line for line, kept in zip(old_csv, keep) if kept]
    assert not (exports / "grids" / "redo").exists()
    assert file_hashes(exports / "grids" / "kept") == kept_sheets
    # The analysis report covers every sweep: it stays until the next analysis.
    assert file_hashes(exports)["sweep_report.html"] == report
    assert not list(exports.rglob("*.tmp"))
