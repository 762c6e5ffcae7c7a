"""The `flexyface` command: bad input fails fast; sweeps and re-scoring go through the instance."""

import hashlib

import dagster as dg
import pytest

from flexyface_pipeline import cli


@pytest.fixture
def cli_env(monkeypatch, data_dir, dagster_home, tmp_path, tiny_models_dir):
    monkeypatch.chdir(tmp_path)  # no .env here
    env = {
        "DAGSTER_HOME": str(dagster_home),
        "FLEXYFACE_DATA_DIR": str(data_dir),
        "FLEXYFACE_MODEL_PROFILE": "tiny",
        "FLEXYFACE_MODELS_DIR": str(tiny_models_dir),
        "FLEXYFACE_DEVICE": "cpu",
        "FLEXYFACE_DTYPE": "auto",
        "FLEXYFACE_REALVIS_XL_MODEL": "SG161222/RealVisXL_V5.0",
        "FLEXYFACE_CLIP_MODEL": "openai/clip-vit-large-patch14",
        "FLEXYFACE_AESTHETIC_V1_MODEL": "shunk031/aesthetics-predictor-v1-vit-large-patch14",
        "FLEXYFACE_AESTHETIC_V2_MODEL": "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
        "FLEXYFACE_HPS_V2_MODEL": "xswu/HPSv2",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return data_dir


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "ok", "--images", "0"], "num_images: must be a positive integer"),
        (["sweep", "ok", "--images", "4", "--steps", "30", "10"], "steps: the range is inverted"),
        (["sweep", "ok", "--images", "4", "--guidance", "0.1", "5"], "guidance: [0.1, 5.0] is outside"),
        (["sweep", "ok", "--images", "4", "--width", "100"], "width: 100 is not a multiple of 8"),
        (["sweep", "../../etc", "--images", "4"], "sweep: '../../etc' is not a valid sweep name"),
        (["sweep", "ok", "--images", "4", "--engine", "sd15"], "engine: unknown engine 'sd15'"),
        (["sweep", "ok", "--images", "4", "--prompt-file", "missing.txt"], "prompt_files: prompt file 'missing.txt' not found"),
    ],
)
def test_bad_sweep_settings_fail_before_anything_runs(cli_env, dagster_home, caplog, argv, message):
    assert cli.main(argv) == 2
    assert message in caplog.text
    assert not (cli_env / "sweeps").exists() and not (cli_env / "images").exists()
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("sweeps") == []
        assert instance.get_runs() == []


def test_unknown_metric_is_refused(cli_env, caplog):
    assert cli.main(["rescore", "fid_score", "--all"]) == 2
    assert "unknown metric" in caplog.text


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_sweeps_then_rescore_all_in_one_run(cli_env, capsys):
    common = ["--steps", "4", "5", "--width", "64", "--height", "64", "--prompt-file", "demo.txt"]
    assert cli.main(["sweep", "c1", "--images", "3", "--no-export", *common]) == 0
    assert cli.main(["sweep", "c2", "--images", "4", "--seed", "9", *common]) == 0
    assert "sweep_results.csv" in capsys.readouterr().out
    images = {p: _digest(p) for p in sorted((cli_env / "images").rglob("*.png"))}
    clip = {s: _digest(cli_env / "sweeps" / s / "clip_scores.parquet") for s in ("c1", "c2")}
    assert cli.main(["rescore", "hps_v2_score", "--all", "--no-export"]) == 0
    with dg.DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        assert run.job_name == "rescore"
        steps = {e.step_key for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)}
        assert steps == {"hps_v2_scores"}
        assert run.tags["dagster/asset_partition_range_start"] == "c1"
        assert run.tags["dagster/asset_partition_range_end"] == "c2"
        mats = instance.fetch_materializations(dg.AssetKey("hps_v2_scores"), limit=10).records
        assert sorted(m.partition_key for m in mats if m.run_id == run.run_id) == ["c1", "c2"]
    assert images == {p: _digest(p) for p in sorted((cli_env / "images").rglob("*.png"))}
    assert clip == {s: _digest(cli_env / "sweeps" / s / "clip_scores.parquet") for s in ("c1", "c2")}
