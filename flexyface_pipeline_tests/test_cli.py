"""The `flexyface` command: bad input fails fast; sweeps and re-scoring go through the instance."""

import hashlib
import os

import dagster as dg
import pytest

from flexyface_pipeline import cli
from flexyface_pipeline_tests.helpers import project_env


@pytest.fixture
def cli_env(monkeypatch, data_dir, dagster_home, tmp_path, tiny_models_dir):
    monkeypatch.chdir(tmp_path)  # no .env here
    # Every setting of .env.example (as `make setup` writes .env), with this test's instance and data.
    env = {k: v for k, v in project_env(dagster_home, data_dir, tiny_models_dir).items()
           if k.startswith(("FLEXYFACE_", "DAGSTER_"))}
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
    assert "invalid input: metrics: unknown metric(s) ['fid_score']" in caplog.text


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


COMMON = ["--steps", "4", "5", "--width", "64", "--height", "64", "--prompt-file", "demo.txt"]


def _hps_runs(instance: dg.DagsterInstance) -> list[tuple[str, ...]]:
    """The sweeps each re-score run scored, oldest run first."""
    runs = [r for r in reversed(instance.get_runs()) if r.job_name == "rescore"]
    mats = instance.fetch_materializations(dg.AssetKey("hps_v2_scores"), limit=100).records
    return [tuple(sorted(m.partition_key for m in mats if m.run_id == r.run_id)) for r in runs]


def test_two_sweeps_then_rescore_all_in_one_run(cli_env, capsys, caplog):
    assert cli.main(["sweep", "c1", "--images", "3", "--no-export", *COMMON]) == 0
    assert cli.main(["sweep", "c2", "--images", "4", "--seed", "9", *COMMON]) == 0
    assert "sweep_results.csv" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("sweeps", ["pending"])  # added (UI, schedule), not generated yet
    images = {p: _digest(p) for p in sorted((cli_env / "images").rglob("*.png"))}
    clip = {s: _digest(cli_env / "sweeps" / s / "clip_scores.parquet") for s in ("c1", "c2")}
    caplog.clear()
    assert cli.main(["rescore", "hps_v2_score", "--all", "--no-export"]) == 0
    assert "skipping 1 sweep(s) without images yet: pending" in caplog.text
    with dg.DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        assert run.job_name == "rescore"
        steps = {e.step_key for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)}
        assert steps == {"hps_v2_scores"}  # --no-export: nothing under data/exports/, no contact sheets either
        assert run.tags["dagster/asset_partition_range_start"] == "c1"
        assert run.tags["dagster/asset_partition_range_end"] == "c2"
        assert _hps_runs(instance) == [("c1", "c2")]
    assert images == {p: _digest(p) for p in sorted((cli_env / "images").rglob("*.png"))}
    assert clip == {s: _digest(cli_env / "sweeps" / s / "clip_scores.parquet") for s in ("c1", "c2")}
    assert not (cli_env / "sweeps" / "pending").exists()

    # A sweep with images after the skipped one: a range from c1 to c3 would take in `pending`,
    # so c3 gets a run of its own.
    assert cli.main(["sweep", "c3", "--images", "2", "--seed", "5", "--no-export", *COMMON]) == 0
    caplog.clear()
    assert cli.main(["rescore", "hps_v2_score", "--all", "--no-export"]) == 0
    assert "skipping 1 sweep(s) without images yet: pending" in caplog.text
    with dg.DagsterInstance.get() as instance:
        assert _hps_runs(instance) == [("c1", "c2"), ("c1", "c2"), ("c3",)]
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in instance.get_runs())


def test_rescore_all_without_any_images_says_so(cli_env, caplog):
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("sweeps", ["p1", "p2"])
    assert cli.main(["rescore", "clip_score", "--all"]) == 1
    assert "skipping 2 sweep(s) without images yet: p1, p2" in caplog.text
    assert "no sweep has images yet (sweeps: p1, p2)" in caplog.text
    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs() == []


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flexyface" and r.levelname == "ERROR"]


def test_a_run_that_fails_ends_the_command_with_one_line(cli_env, tmp_path, monkeypatch, caplog):
    """A model location that does not exist is refused before any run (test_bad_input.py); one that
    fails while the run sets up its resources (here: a device that went away) ends the command with
    the run's one line, before any step runs."""
    from flexyface_pipeline.defs.resources import ModelResource

    def gone(self, context):
        raise RuntimeError("CUDA error: the device was lost")

    monkeypatch.setattr(ModelResource, "setup_for_execution", gone)
    assert cli.main(["sweep", "broken", "--images", "2", *COMMON]) == 1
    [error] = _errors(caplog)
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs()  # and no export after it
        assert run.status == dg.DagsterRunStatus.FAILURE
    assert error == (f"sweep broken failed (run {run.run_id}): setting up resources: RuntimeError: CUDA error: "
                     "the device was lost")
    assert not (cli_env / "images" / "broken").exists()


def test_a_failed_step_is_named_in_the_one_line_error(cli_env, caplog):
    (cli_env / "exports").write_text("a file where the exports directory belongs")
    assert cli.main(["export"]) == 1
    [error] = _errors(caplog)
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_runs()
        assert (run.job_name, run.status) == ("export_job", dg.DagsterRunStatus.FAILURE)
    assert "\n" not in error
    assert error.startswith(f"export failed (run {run.run_id}): step sweep_results: FileExistsError: ")
    assert str(cli_env / "exports") in error


def test_dotenv_in_the_current_directory_fills_in_what_is_not_exported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEXYFACE_DEVICE", "cpu")
    monkeypatch.setenv("FLEXYFACE_DTYPE", "placeholder")
    monkeypatch.delenv("FLEXYFACE_DTYPE")  # unset now, and unset again after the test
    (tmp_path / ".env").write_text("FLEXYFACE_DEVICE=cuda\nFLEXYFACE_DTYPE=bf16\n")
    cli._load_dotenv()
    assert os.environ["FLEXYFACE_DEVICE"] == "cpu"  # exported: kept
    assert os.environ["FLEXYFACE_DTYPE"] == "bf16"  # only in .env: read from it


def test_an_unset_setting_is_named_in_one_line(cli_env, monkeypatch, caplog):
    monkeypatch.delenv("FLEXYFACE_DEVICE")  # as with a .env written before the setting existed
    assert cli.main(["sweep", "unset", "--images", "2", *COMMON]) == 2
    assert _errors(caplog) == [
        "FLEXYFACE_DEVICE is not set: run `make setup` (it adds the settings of .env.example that .env lacks, "
        "keeping your values) or export it"
    ]
    with dg.DagsterInstance.get() as instance:
        assert instance.get_runs() == [] and instance.get_dynamic_partitions("sweeps") == []


def _latest_jobs(limit: int) -> list[str]:
    with dg.DagsterInstance.get() as instance:
        return [r.job_name for r in instance.get_runs(limit=limit)]


def test_a_metric_that_fails_still_leaves_the_others_exported(cli_env, monkeypatch, caplog):
    from flexyface_pipeline.lib.metrics import AestheticV2Scorer

    assert cli.main(["sweep", "part", "--images", "2", "--no-export", *COMMON]) == 0
    clip_before = _digest(cli_env / "sweeps" / "part" / "clip_scores.parquet")

    def unreadable(cls, *args, **kwargs):
        raise RuntimeError("the checkpoint is truncated")

    monkeypatch.setattr(AestheticV2Scorer, "load", classmethod(unreadable))
    caplog.clear()
    assert cli.main(["rescore", "clip_score", "aes_v2_score", "--sweep", "part"]) == 1
    [error] = _errors(caplog)
    assert "re-scoring part failed" in error
    assert "step aes_v2_scores: RuntimeError: the checkpoint is truncated" in error
    # clip_scores was written again in that run, so the export was refreshed after it.
    assert _latest_jobs(2) == ["export_job", "rescore"]
    assert (cli_env / "exports" / "sweep_results.parquet").is_file()
    assert _digest(cli_env / "sweeps" / "part" / "clip_scores.parquet") == clip_before  # same weights, same scores


def test_a_failed_score_check_fails_the_command(cli_env, monkeypatch, caplog):
    import torch

    from flexyface_pipeline.lib.metrics import AestheticV1Scorer

    real_load = AestheticV1Scorer.load.__func__

    def shifted(cls, *args, **kwargs):  # a head whose bias went wrong: every score is off by 100
        scorer = real_load(cls, *args, **kwargs)
        with torch.no_grad():
            scorer.model.predictor.bias.add_(100.0)
        return scorer

    monkeypatch.setattr(AestheticV1Scorer, "load", classmethod(shifted))
    assert cli.main(["sweep", "shifted", "--images", "2", *COMMON]) == 1
    # The export ran (the tables are complete) and its own checks say the same; the sweep's comes last.
    exported, error = _errors(caplog)
    assert "export: 1 check(s) failed" in exported and "sweep_results.export_aesthetic_score" in exported
    assert "sweep shifted: 1 check(s) failed" in error
    assert "aesthetic_scores.scores_valid: shifted: 2 outside [-10.0, 10.0] (above 10: unnormalised embeddings?)" in error
    with dg.DagsterInstance.get() as instance:
        sweep_run = [r for r in instance.get_runs() if r.job_name == "sweep_job"][0]
        assert sweep_run.status == dg.DagsterRunStatus.SUCCESS  # the run itself did not fail
    assert _latest_jobs(1) == ["export_job"]


def test_remove_deletes_one_sweep_and_refreshes_the_export(cli_env, caplog):
    import pandas as pd

    assert cli.main(["sweep", "keep", "--images", "2", "--no-export", *COMMON]) == 0
    assert cli.main(["sweep", "gone", "--images", "3", "--seed", "4", *COMMON]) == 0
    assert len(pd.read_parquet(cli_env / "exports" / "sweep_results.parquet")) == 5
    kept = {p: _digest(p) for p in sorted(cli_env.rglob("*")) if p.is_file() and "keep" in p.parts}
    assert kept
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("sweeps", ["My sweep"])  # added by hand in the UI

    assert cli.main(["remove", "gone"]) == 0
    for folder in (cli_env / "sweeps" / "gone", cli_env / "images" / "gone", cli_env / "exports" / "grids" / "gone"):
        assert not folder.exists(), folder
    export = pd.read_parquet(cli_env / "exports" / "sweep_results.parquet")
    assert sorted(export["sweep"].unique()) == ["keep"] and len(export) == 2
    assert kept == {p: _digest(p) for p in kept}
    assert cli.main(["remove", "My sweep", "--no-export"]) == 0
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("sweeps") == ["keep"]
    caplog.clear()
    assert cli.main(["remove", "gone"]) == 1
    assert "unknown sweep 'gone'; known sweeps: ['keep']" in caplog.text


@pytest.mark.parametrize("kind, message", [
    ("binary", "prompt_files: prompt file 'bin.dat' is not UTF-8 text: byte 0x89 at offset 0 (line 1) "
               "is not valid UTF-8; save it as UTF-8 text, one prompt per line"),
    ("directory", "prompt_files: prompt file 'bin.dat' is a directory: name a text file with one "
                  "prompt per line"),
    ("unreadable", "prompt_files: prompt file 'bin.dat' cannot be read (permission denied): make it "
                   "readable, e.g. `chmod a+r {path}`"),
])
def test_a_prompt_file_that_cannot_be_read_as_text_is_refused_in_one_line(cli_env, monkeypatch, caplog, kind, message):
    from pathlib import Path

    from flexyface_pipeline_tests.helpers import file_hashes

    path = cli_env / "prompts" / "bin.dat"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" if kind == "binary" else b"a portrait\n")
    before = file_hashes(cli_env)
    refused, real = {path} if kind == "unreadable" else set(), Path.read_bytes

    def read_bytes(self):  # a chmod does not stop root: the read is refused as the kernel would refuse it
        if self in refused:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert cli.main(["sweep", "x", "--images", "4", "--prompt-file", "bin.dat"]) == 2
    refused.clear()
    [error] = _errors(caplog)
    assert error.endswith(message.format(path=path)), error
    assert "Traceback" not in caplog.text
    assert file_hashes(cli_env) == before
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("sweeps") == []
        assert instance.get_runs() == []


def test_rescoring_a_sweep_without_images_is_refused_before_any_run(cli_env, tiny_models_dir, caplog):
    from flexyface_pipeline_tests.helpers import file_hashes, sweep_run_config, tiny_defs

    with dg.DagsterInstance.get() as instance:  # defined (its parameters), never generated
        instance.add_dynamic_partitions("sweeps", ["s"])
        assert tiny_defs(cli_env, tiny_models_dir).resolve_job_def("sweep_job").execute_in_process(
            instance=instance, partition_key="s", asset_selection=[dg.AssetKey("sweep_parameters")],
            run_config=sweep_run_config(2)).success
    before = file_hashes(cli_env)
    caplog.clear()
    assert cli.main(["rescore", "clip_score", "--sweep", "s"]) == 1
    assert _errors(caplog) == ["sweep s has no images yet: run `flexyface sweep s` first"]
    assert "Traceback" not in caplog.text
    assert file_hashes(cli_env) == before
    with dg.DagsterInstance.get() as instance:
        assert [r.job_name for r in instance.get_runs()] == ["sweep_job"]  # no re-score run
