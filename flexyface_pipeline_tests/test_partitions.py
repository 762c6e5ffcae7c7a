"""Partitions a step cannot work on fail it in one line, before anything is read or written: a name
no sweep can have (added by hand), a sweep without the table the step starts from."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import pytest

from flexyface_pipeline.defs.assets.analysis import image_grid
from flexyface_pipeline.defs.assets.scores import score_assets
from flexyface_pipeline.defs.assets.sweep import generated_images, sweep_parameters
from flexyface_pipeline_tests.helpers import file_hashes, project_env, sweep_run_config, tiny_resources

PARTITIONED = [sweep_parameters, generated_images, *score_assets, image_grid]

BAD_NAME = (
    "partition '../x' cannot be a sweep: '../x' is not a valid sweep name: use letters, digits, '.', '_' and '-', "
    "starting with a letter or digit (no path separators, no '..'); nothing was read or written: "
    "`flexyface remove '../x'` deletes the partition"
)


def _failure(result) -> str:
    [failure] = result.get_step_failure_events()
    data = failure.step_failure_data
    assert data.user_failure_data is not None, data.error  # a dg.Failure, not an exception
    return data.user_failure_data.description


def _materialize(asset, key, instance, data_dir, models_dir, **kwargs):
    return dg.materialize([asset], partition_key=key, instance=instance, raise_on_error=False,
                          resources=tiny_resources(data_dir, models_dir), **kwargs)


@pytest.mark.parametrize("asset", PARTITIONED, ids=lambda a: a.key.to_user_string())
def test_a_partition_with_a_path_for_a_name_fails_its_step_in_one_line(asset, data_dir, tiny_models_dir,
                                                                        dagster_home):
    before = file_hashes(data_dir)
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["../x"])
        result = _materialize(asset, "../x", instance, data_dir, tiny_models_dir)
        assert not result.success
        assert _failure(result) == BAD_NAME
    assert file_hashes(data_dir) == before
    assert not (data_dir.parent / "x").exists()


def test_a_name_with_spaces_names_the_fix_quoted(data_dir, tiny_models_dir, dagster_home):
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["Bob's sweep"])
        result = _materialize(sweep_parameters, "Bob's sweep", instance, data_dir, tiny_models_dir)
    description = _failure(result)
    assert description.startswith(
        "partition \"Bob's sweep\" cannot be a sweep: \"Bob's sweep\" is not a valid sweep name")
    assert description.endswith("`flexyface remove 'Bob'\"'\"'s sweep'` deletes the partition")


def test_scoring_a_sweep_without_images_fails_in_one_line(data_dir, tiny_models_dir, dagster_home):
    """Defined (its parameters exist) but never generated: each score asset and the contact sheets
    say so before any model loads; generating one that is not even defined says that."""
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["s", "undefined"])
        assert _materialize(sweep_parameters, "s", instance, data_dir, tiny_models_dir,
                            run_config=sweep_run_config(2)).success
        before = file_hashes(data_dir)
        for asset in [*score_assets, image_grid]:
            name = asset.key.to_user_string()
            result = _materialize(asset, "s", instance, data_dir, tiny_models_dir)
            assert _failure(result) == (f"sweep s has no images yet, so {name} has nothing to work on: materialize "
                                        "generated_images for it first (`flexyface sweep s`)")
        result = _materialize(generated_images, "undefined", instance, data_dir, tiny_models_dir)
        assert _failure(result) == (
            "sweep undefined is not defined yet (no parameters), so generated_images has nothing to work on: "
            "materialize sweep_parameters for it first (`flexyface sweep undefined --images N`)")
    assert file_hashes(data_dir) == before


def _materialize_command(partition: str) -> list[str]:
    return [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "flexyface_pipeline.definitions",
            "--select", "sweep_parameters", "--partition", partition]


def test_dagster_asset_materialize_of_a_bad_partition_prints_the_one_line(data_dir, tiny_models_dir, dagster_home,
                                                                          tmp_path):
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["../x"])
    before = file_hashes(data_dir)
    env = project_env(dagster_home, data_dir, tiny_models_dir)
    # cwd: not the repository, whose .env (written by make) would override these variables
    done = subprocess.run(_materialize_command("../x"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    failures = [line for line in output.splitlines() if line.startswith("dagster._core.definitions.events.Failure: ")]
    assert failures and all(line.endswith(BAD_NAME) for line in failures), output[-3000:]
    assert output.strip().splitlines()[-1] == "Error: Materialization failed."
    assert file_hashes(data_dir) == before


def test_dagster_asset_materialize_of_an_unknown_partition_writes_nothing(data_dir, tiny_models_dir, dagster_home,
                                                                          tmp_path):
    """Dagster's own refusal (a traceback of its CLI; it ends in the line asserted here): no run, no
    partition, nothing under the data directory."""
    before = file_hashes(data_dir)
    env = project_env(dagster_home, data_dir, tiny_models_dir)
    done = subprocess.run(_materialize_command("nosuch"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "dagster._core.errors.DagsterInvalidSubsetError: All selected assets must have a PartitionsDefinition "
        "containing the passed partition key `nosuch` or have no PartitionsDefinition.")
    assert "DagsterUnknownPartitionError: Could not find a partition with key `nosuch`." in output
    assert file_hashes(data_dir) == before
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.get_runs() == []
        assert instance.get_dynamic_partitions("sweeps") == []
