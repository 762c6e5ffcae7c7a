"""Damaged tables are named with their repair, and one damaged sweep never blocks the others."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flexyface_pipeline.lib.config import METRICS
from flexyface_pipeline.lib.export import SCORE_TABLES
from flexyface_pipeline.lib.store import DamagedTableError, SweepStore
from flexyface_pipeline_tests.helpers import tiny_defs
from flexyface_pipeline_tests.test_export import _sweep


def _write_sweep(store: SweepStore, name: str, n: int, seed: int) -> None:
    params, images, scores = _sweep(name, n, np.random.default_rng(seed), set(METRICS))
    images["image_path"] = [f"images/{name}/{i}.png" for i in params["image_id"]]
    for path in images["image_path"]:
        target = store.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (5, 6, 7)).save(target)
    store.write_table("parameters", name, params)
    store.write_table("images", name, images)
    for metric, frame in scores.items():
        store.write_table(SCORE_TABLES[metric][0], name, frame)


def test_a_changed_value_is_caught_by_the_recorded_checksum(data_dir) -> None:
    store = SweepStore(data_dir)
    _write_sweep(store, "a", 6, 0)
    assert store.read_manifest("a")["hps_v2_scores"]["rows"] == 6
    path = store.table_path("hps_v2_scores", "a")
    table = pd.read_parquet(path)
    table.loc[2, "hps_v2_score"] = 0.99  # changed in place, still a valid Parquet file
    table.to_parquet(path, index=False)
    with pytest.raises(DamagedTableError) as caught:
        store.read_table("hps_v2_scores", "a")
    message = str(caught.value)
    assert str(path) in message and "flexyface rescore hps_v2_score --sweep a" in message
    # Writing the table again (a re-score) records the new checksum.
    store.write_table("hps_v2_scores", "a", table)
    assert store.read_table("hps_v2_scores", "a").loc[2, "hps_v2_score"] == 0.99


def test_zero_byte_and_unrecorded_tables_name_the_file(data_dir) -> None:
    store = SweepStore(data_dir)
    _write_sweep(store, "a", 4, 0)
    store.table_path("images", "a").write_bytes(b"")
    with pytest.raises(DamagedTableError, match=r"images\.parquet .*repair: flexyface sweep a"):
        store.read_table("images", "a")
    # Without a recorded checksum (written before manifests existed) a damaged file is still named.
    store.manifest_path("a").unlink()
    with pytest.raises(DamagedTableError, match=r"images\.parquet cannot be read"):
        store.read_table("images", "a")
    # Dropping a table forgets its checksum.
    _write_sweep(store, "b", 4, 1)
    store.drop_tables("b", ("clip_scores",))
    assert "clip_scores" not in store.read_manifest("b") and "parameters" in store.read_manifest("b")


def test_the_export_holds_the_healthy_sweeps_and_names_the_damaged_one(data_dir, dagster_home, tiny_models_dir) -> None:
    store = SweepStore(data_dir)
    _write_sweep(store, "healthy", 5, 0)
    _write_sweep(store, "broken", 4, 1)
    store.table_path("images", "broken").write_bytes(b"")
    defs = tiny_defs(data_dir, tiny_models_dir)
    job = defs.resolve_job_def("export_job")
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("sweeps", ["healthy", "broken"])
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        assert result.success
        export = pd.read_parquet(data_dir / "exports" / "sweep_results.parquet")
        assert sorted(export["sweep"].unique()) == ["healthy"] and len(export) == 5
        damaged = result.asset_materializations_for_node("sweep_results")[0].metadata["damaged_sweeps"].value
        assert list(damaged) == ["broken"] and "images.parquet" in damaged["broken"]
        assert "flexyface sweep broken" in damaged["broken"]

        strict = job.execute_in_process(instance=instance, raise_on_error=False,
                                        run_config={"ops": {"sweep_results": {"config": {"strict": True}}}})
        assert not strict.success
        failure = next(e for e in strict.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
        error = failure.event_specific_data.error
        while error.cause is not None:
            error = error.cause
        assert error.cls_name == "DamagedSweepsError" and "(broken)" in error.message
        # The healthy sweep's rows were written all the same.
        assert len(pd.read_parquet(data_dir / "exports" / "sweep_results.parquet")) == 5
