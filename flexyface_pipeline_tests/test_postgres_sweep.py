"""A whole sweep on a PostgreSQL-backed instance (deploy/dagster-postgres.yaml), read back by a new
instance object: runs, materializations of every partitioned asset, dynamic partitions, the pool.

Needs the server of FLEXYFACE_PG_*: skipped when it is unreachable, failed on CI (CI=true).
"""

from __future__ import annotations

import os

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage

from flexyface_pipeline.defs.jobs import sweep_selection
from flexyface_pipeline_tests.helpers import run_sweep, tiny_defs, torch_threads
from flexyface_pipeline_tests.pg import open_instance, postgres_dagster_home, require_postgres

SWEEP = "pg-sweep"
NUM_IMAGES = 4


@pytest.mark.postgres
def test_sweep_on_postgres_reads_back_from_a_new_instance(tmp_path, data_dir, tiny_models_dir):
    settings = require_postgres()
    defs = tiny_defs(data_dir, tiny_models_dir)
    partitioned = {key.to_user_string() for key in sweep_selection.resolve(defs.resolve_asset_graph())}
    assert partitioned == {"sweep_parameters", "generated_images", "clip_scores", "aesthetic_scores",
                           "aes_v2_scores", "hps_v2_scores", "image_grid"}

    with postgres_dagster_home(tmp_path / "dagster", settings) as home:
        with open_instance(home) as instance, torch_threads(1):
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
            result = run_sweep(defs, instance, SWEEP, NUM_IMAGES)
            assert result.success
            run_id = result.run_id
            written = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
            assert written == partitioned

        # A new instance object on the same database: everything comes back from PostgreSQL.
        with open_instance(home) as reopened:
            run = reopened.get_run_by_id(run_id)
            assert run is not None
            assert (run.job_name, run.status, run.tags["dagster/partition"]) == ("sweep_job", dg.DagsterRunStatus.SUCCESS, SWEEP)
            assert reopened.get_dynamic_partitions("sweeps") == [SWEEP]
            for asset in sorted(partitioned):
                key = dg.AssetKey(asset)
                event = reopened.get_latest_materialization_event(key)
                assert event is not None and event.run_id == run_id, asset
                assert event.asset_materialization.partition == SWEEP
                assert reopened.get_materialized_partitions(key) == {SWEEP}
            images = reopened.get_latest_materialization_event(dg.AssetKey("generated_images")).asset_materialization
            assert images.metadata["num_images"].value == NUM_IMAGES
            assert images.metadata["generated"].value == NUM_IMAGES
            for table in ("clip_scores", "aesthetic_scores", "aes_v2_scores", "hps_v2_scores"):
                score = reopened.get_latest_materialization_event(dg.AssetKey(table)).asset_materialization
                assert score.metadata["num_images"].value == NUM_IMAGES, table
            # Asset checks (images_exist, scores_valid) and the step events, from the event log.
            checks = reopened.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
            assert len(checks) == 5
            assert all(e.dagster_event.event_specific_data.passed for e in checks)
            starts = reopened.all_logs(run_id, of_type=DagsterEventType.STEP_START)
            assert {e.step_key for e in starts} == partitioned
            # The gpu steps claimed and freed the pool's slot in PostgreSQL.
            info = reopened.event_log_storage.get_concurrency_info("gpu")
            assert (info.limit, info.slot_count, info.claimed_slots) == (1, 1, [])

        # The rows are in the test's database, not in files under DAGSTER_HOME.
        database = os.environ["FLEXYFACE_PG_DB"]
        assert database.startswith("flexyface_test_")
        with settings.connect(database) as conn, conn.cursor() as cur:
            cur.execute("SELECT run_id, status FROM runs")
            assert cur.fetchall() == [(run_id, "SUCCESS")]
            cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'sweeps'")
            assert cur.fetchall() == [(SWEEP,)]
            cur.execute("SELECT count(DISTINCT asset_key) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
            assert cur.fetchone() == (len(partitioned),)
        conn.close()
        assert not list(home.rglob("*.db"))
