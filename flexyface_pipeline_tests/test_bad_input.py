"""Bad input of every kind (settings, flags, files, partitions) is refused with one line that names
it, before anything is written: the data directory's files and the instance's sweeps and runs are
the same afterwards.

Each case runs ``flexyface`` in this process against one data directory holding a finished sweep
(``done``), a sweep defined but never generated (``planned``), a sweep whose ``sweep.json`` is
empty (``broken``) and a partition added by hand with a path-like name; a few run as real
processes to check what a user's terminal shows.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time

import dagster as dg
import pytest

from flexyface_pipeline import cli
from flexyface_pipeline_tests.conftest import REPO, in_ci  # noqa: F401 (in_ci: in a skip condition)
from flexyface_pipeline_tests.helpers import BIN, file_hashes, project_env, tiny_defs

SWEEP = ["--prompt-file", "demo.txt", "--width", "64", "--height", "64", "--steps", "4", "5"]
NEW = ["sweep", "fresh", "--images", "4", *SWEEP]  # a valid new sweep: only its settings are bad


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models_dir):
    """The environment and files every case starts from, made once: a finished sweep and its
    export, a planned one, a broken one, a bad partition, and odd files to point flags at."""
    root = tmp_path_factory.mktemp("bad_input")
    data = root / "data"
    shutil.copytree(REPO / "data" / "prompts", data / "prompts")
    home = root / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in project_env(home, data, tiny_models_dir).items() if k.startswith(("FLEXYFACE_", "DAGSTER_"))}
    (data / "prompts" / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (data / "prompts" / "empty.txt").write_text("# only a comment\n\n")
    (data / "prompts" / "folder.txt").mkdir()
    (root / "a_file").write_text("not a directory\n")
    (root / "home_without_yaml").mkdir()
    bad_yaml = root / "home_bad_yaml"
    bad_yaml.mkdir()
    (bad_yaml / "dagster.yaml").write_text("storage: [sqlite\n  : :\n")
    pg_home = root / "home_postgres"
    pg_home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", pg_home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for k, v in env.items():
            mp.setenv(k, v)
        assert cli.main(["sweep", "done", "--images", "2", *SWEEP, "--seed", "1"]) == 0
        defs = tiny_defs(data, tiny_models_dir)
        with dg.DagsterInstance.get() as instance:
            instance.add_dynamic_partitions("sweeps", ["planned", "broken", "../x"])
            for sweep in ("planned", "broken"):
                result = defs.resolve_job_def("sweep_job").execute_in_process(
                    instance=instance, partition_key=sweep, asset_selection=[dg.AssetKey("sweep_parameters")],
                    run_config={"ops": {"sweep_parameters": {"config": {
                        "num_images": 4, "width": 64, "height": 64, "prompt_files": ["demo.txt"],
                        "steps_min": 4, "steps_max": 5}}}})
                assert result.success
    (data / "sweeps" / "broken" / "sweep.json").write_bytes(b"")
    assert (data / "exports" / "sweep_results.parquet").is_file()
    return {"root": root, "data": data, "home": home, "env": env, "pg_home": pg_home}


def _instance_state() -> tuple[list[str], int]:
    with dg.DagsterInstance.get() as instance:
        return sorted(instance.get_dynamic_partitions("sweeps")), len(instance.get_runs())


def P(case_id, argv, status, words, env=None, *, marks=()):  # noqa: N802 (a table row)
    return pytest.param(argv, status, words, env or {}, id=case_id, marks=marks)


NO_CUDA = pytest.mark.skipif("_cuda()", reason="this machine has CUDA: the device setting is valid here")

CASES = [
    # -- settings ----------------------------------------------------------------------------------
    P("profile", NEW, 2, "FLEXYFACE_MODEL_PROFILE='garbage': expected one of real, tiny, random_full",
      {"FLEXYFACE_MODEL_PROFILE": "garbage"}),
    P("device-word", NEW, 2, "FLEXYFACE_DEVICE='gpu': expected auto, cpu, cuda or cuda:N", {"FLEXYFACE_DEVICE": "gpu"}),
    P("device-index", NEW, 2, "FLEXYFACE_DEVICE='cuda:x': expected", {"FLEXYFACE_DEVICE": "cuda:x"}),
    P("device-no-cuda", NEW, 2, "FLEXYFACE_DEVICE='cuda': this machine has no usable CUDA device",
      {"FLEXYFACE_DEVICE": "cuda"}, marks=NO_CUDA),
    P("device-no-cuda-1", NEW, 2, "FLEXYFACE_DEVICE='cuda:1': this machine has no usable CUDA device",
      {"FLEXYFACE_DEVICE": "cuda:1"}, marks=NO_CUDA),
    P("dtype", NEW, 2, "FLEXYFACE_DTYPE='garbage': expected auto", {"FLEXYFACE_DTYPE": "garbage"}),
    P("scoring-dtype", NEW, 2, "FLEXYFACE_SCORING_DTYPE='float64': expected one of reference, bf16, fp32, fp16",
      {"FLEXYFACE_SCORING_DTYPE": "float64"}),
    P("cpu-offload", NEW, 2, "FLEXYFACE_CPU_OFFLOAD='maybe': expected true or false", {"FLEXYFACE_CPU_OFFLOAD": "maybe"}),
    P("setting-unset", NEW, 2, "FLEXYFACE_DEVICE is not set: run `make setup`", {"FLEXYFACE_DEVICE": None}),
    P("data-dir-unset", NEW, 2, "FLEXYFACE_DATA_DIR is not set", {"FLEXYFACE_DATA_DIR": ""}),
    P("data-dir-missing", NEW, 2, "no such directory", {"FLEXYFACE_DATA_DIR": "{root}/nowhere"}),
    P("data-dir-file", NEW, 2, "is a file, not a directory", {"FLEXYFACE_DATA_DIR": "{root}/a_file"}),
    P("models-dir-file", NEW, 2, "FLEXYFACE_MODELS_DIR='{root}/a_file': is a file", {"FLEXYFACE_MODELS_DIR": "{root}/a_file"}),
    P("home-unset", NEW, 2, "DAGSTER_HOME is not set: run `make setup`", {"DAGSTER_HOME": ""}),
    P("home-no-yaml", NEW, 2, "holds no dagster.yaml", {"DAGSTER_HOME": "{root}/home_without_yaml"}),
    P("home-bad-yaml", NEW, 2, "dagster.yaml is not valid YAML (line", {"DAGSTER_HOME": "{root}/home_bad_yaml"}),
    P("postgres-closed-port", NEW, 2, "PostgreSQL at 127.0.0.1:1/flexyface",
      {"DAGSTER_HOME": "{root}/home_postgres", "FLEXYFACE_PG_PORT": "1"}),
    P("postgres-port-word", NEW, 2, "FLEXYFACE_PG_PORT='five': expected a TCP port number",
      {"DAGSTER_HOME": "{root}/home_postgres", "FLEXYFACE_PG_PORT": "five"}),
    P("postgres-no-database", NEW, 2, "database \"flexyface_absent\" does not exist; create it",
      {"DAGSTER_HOME": "{root}/home_postgres", "FLEXYFACE_PG_DB": "flexyface_absent"},
      marks=pytest.mark.skipif("not in_ci() and not _postgres_up()", reason="no PostgreSQL server on this machine")),
    P("ray-address-form", NEW, 2, "FLEXYFACE_RAY_ADDRESS='http://head': expected auto, ray://HOST:PORT",
      {"FLEXYFACE_RAY_ADDRESS": "http://head"}),
    P("ray-address-closed", NEW, 2, "FLEXYFACE_RAY_ADDRESS='127.0.0.1:1': no Ray cluster answers there",
      {"FLEXYFACE_RAY_ADDRESS": "127.0.0.1:1"}),
    P("ray-gpu-share", NEW, 2, "FLEXYFACE_RAY_GPUS_PER_SCORER='2': expected a GPU share in (0, 1]",
      {"FLEXYFACE_RAY_GPUS_PER_SCORER": "2"}),
    P("ray-actors-negative", NEW, 2, "FLEXYFACE_RAY_ACTORS='-1': expected a whole number of at least 0",
      {"FLEXYFACE_RAY_ACTORS": "-1"}),
    P("ray-actors-word", NEW, 2, "FLEXYFACE_RAY_ACTORS='many'", {"FLEXYFACE_RAY_ACTORS": "many"}),
    P("real-local-path", NEW, 2, "FLEXYFACE_CLIP_MODEL='/nonexistent/clip': local path '/nonexistent/clip' does not exist",
      {"FLEXYFACE_MODEL_PROFILE": "real", "FLEXYFACE_CLIP_MODEL": "/nonexistent/clip"}),
    P("real-not-a-hub-id", NEW, 2, "FLEXYFACE_REALVIS_XL_MODEL='not a hub id'",
      {"FLEXYFACE_MODEL_PROFILE": "real", "FLEXYFACE_REALVIS_XL_MODEL": "not a hub id"}),
    P("real-offline-missing", NEW, 2, "FLEXYFACE_REALVIS_XL_MODEL='flexyface-tests/absent-model': realvis_xl's "
      "weights are not on this machine and downloads are off",
      {"FLEXYFACE_MODEL_PROFILE": "real", "HF_HUB_OFFLINE": "1",
       "FLEXYFACE_REALVIS_XL_MODEL": "flexyface-tests/absent-model"}),
    P("nightly-images", NEW, 2, "FLEXYFACE_NIGHTLY_IMAGES='lots': expected a whole number", {"FLEXYFACE_NIGHTLY_IMAGES": "lots"}),
    P("nightly-width", NEW, 2, "FLEXYFACE_NIGHTLY_WIDTH='0': expected a whole number of at least 1",
      {"FLEXYFACE_NIGHTLY_WIDTH": "0"}),
    P("nightly-engine", NEW, 2, "FLEXYFACE_NIGHTLY_ENGINE='sd15': expected an engine", {"FLEXYFACE_NIGHTLY_ENGINE": "sd15"}),
    # -- flags ---------------------------------------------------------------------------------------
    P("images-word", ["sweep", "fresh", "--images", "abc"], 2, "argument --images: invalid int value: 'abc'"),
    P("images-zero", ["sweep", "fresh", "--images", "0", *SWEEP], 2, "num_images: must be a positive integer"),
    P("images-negative", ["sweep", "fresh", "--images", "-3", *SWEEP], 2, "num_images: must be a positive integer"),
    P("steps-inverted", ["sweep", "fresh", "--images", "4", "--steps", "30", "10"], 2, "steps: the range is inverted"),
    P("steps-outside", ["sweep", "fresh", "--images", "4", "--steps", "1", "2"], 2, "steps: [1, 2] is outside"),
    P("steps-list", ["sweep", "fresh", "--images", "4", "--steps", "4", "5", "6"], 2, "lists of values are for --design grid"),
    P("guidance-outside", ["sweep", "fresh", "--images", "4", "--guidance", "0.1", "5"], 2, "guidance: [0.1, 5.0] is outside"),
    P("guidance-words", ["sweep", "fresh", "--images", "4", "--guidance", "low", "high"], 2, "'low' is neither a number"),
    P("width-multiple", ["sweep", "fresh", "--images", "4", "--width", "100"], 2, "width: 100 is not a multiple of 8"),
    P("width-zero", ["sweep", "fresh", "--images", "4", "--width", "0"], 2, "width: 0 is outside"),
    P("engine-unknown", ["sweep", "fresh", "--images", "4", "--engine", "sd15"], 2, "unknown engine 'sd15'"),
    P("engine-twice", ["sweep", "fresh", "--images", "4", "--engine", "realvis_xl", "realvis_xl"], 2, "selected more than once"),
    P("design-unknown", ["sweep", "fresh", "--images", "4", "--design", "latin"], 2, "design: "),
    P("size-form", ["sweep", "fresh", "--images", "4", "--size", "64by64"], 2, "'64by64' is not a size"),
    P("scheduler-unknown", ["sweep", "fresh", "--images", "4", "--scheduler", "NoSuch"], 2, "NoSuch"),
    P("seeds-per-cell", ["sweep", "fresh", "--design", "grid", "--steps", "4", "5", "--guidance", "2", "3",
                         "--seeds-per-cell", "0"], 2,
      "seeds_per_cell: must be a positive integer"),
    P("name-path", ["sweep", "../../etc", "--images", "4"], 2, "'../../etc' is not a valid sweep name"),
    P("name-empty", ["sweep", "", "--images", "4"], 2, "the sweep name is empty"),
    P("name-space", ["sweep", "a b", "--images", "4"], 2, "'a b' is not a valid sweep name"),
    P("new-without-images", ["sweep", "fresh", *SWEEP], 2, "sweep 'fresh' is new: set num_images"),
    P("stored-and-changed", ["sweep", "done", "--steps", "6", "7"], 2, "keeps its stored settings, but steps_min"),
    P("command-unknown", ["sweeep", "fresh"], 2, "invalid choice: 'sweeep'"),
    P("metric-unknown", ["rescore", "fid_score", "--all"], 2, "unknown metric(s) ['fid_score']"),
    P("rescore-unknown-sweep", ["rescore", "clip_score", "--sweep", "nosuch"], 1, "unknown sweep(s) ['nosuch']"),
    P("remove-unknown-sweep", ["remove", "nosuch"], 1, "unknown sweep 'nosuch'"),
    P("doctor-unknown-sweep", ["doctor", "nosuch"], 1, "unknown sweep(s) ['nosuch']"),
    P("tune-budget-zero", ["tune", "fresh", "--budget", "0", *SWEEP], 2, "num_images: must be a positive integer"),
    P("tune-metric", ["tune", "fresh", "--budget", "12", "--metric", "fid", *SWEEP], 2, "unknown objective 'fid'"),
    # -- files ---------------------------------------------------------------------------------------
    P("prompt-file-missing", ["sweep", "fresh", "--images", "4", "--prompt-file", "missing.txt"], 2,
      "prompt file 'missing.txt' not found"),
    P("prompt-file-binary", ["sweep", "fresh", "--images", "4", "--prompt-file", "binary.txt"], 2,
      "prompt_files: prompt file 'binary.txt' is not UTF-8 text"),
    P("prompt-file-empty", ["sweep", "fresh", "--images", "4", "--prompt-file", "empty.txt"], 2,
      "prompt file 'empty.txt' holds no prompt"),
    P("prompt-file-outside", ["sweep", "fresh", "--images", "4", "--prompt-file", "../../a_file"], 2,
      "'../../a_file' is not a file under"),
    P("prompt-file-folder", ["sweep", "fresh", "--images", "4", "--prompt-file", "folder.txt"], 2, "folder.txt"),
    P("definition-empty", ["sweep", "broken"], 1, "sweep.json is damaged"),
    # -- partitions ----------------------------------------------------------------------------------
    P("rescore-without-images", ["rescore", "clip_score", "--sweep", "planned"], 1, "sweep planned has no images yet"),
    P("rescore-path-like-partition", ["rescore", "clip_score", "--sweep", "../x"], 1,
      "partition '../x' is not a valid sweep name"),
]


@pytest.mark.parametrize("argv, status, words, env", CASES)
def test_bad_input_is_refused_in_one_line_and_changes_nothing(world, monkeypatch, caplog, capsys,
                                                              argv, status, words, env):
    monkeypatch.chdir(world["root"])  # no .env here: the environment is the whole configuration
    for key, value in world["env"].items():
        monkeypatch.setenv(key, value)
    files = file_hashes(world["data"])
    state = _instance_state()
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value.format(root=world["root"]))
    caplog.set_level(logging.INFO)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own refusal
        code = exit_.code
    out, err = capsys.readouterr()
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    lines = [r.getMessage() for r in problems] + [line for line in err.splitlines() if line.strip()]
    assert code == status, lines
    assert len(lines) == 1, lines  # one line: the problem, nothing else
    assert "\n" not in lines[0] and words.format(root=world["root"]) in lines[0], lines[0]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    assert "Traceback" not in out + err + caplog.text
    monkeypatch.setenv("DAGSTER_HOME", world["env"]["DAGSTER_HOME"])
    assert file_hashes(world["data"]) == files  # nothing written: no sweep folder, no lock, no export
    assert _instance_state() == state  # no partition added, no run


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


def test_a_misspelt_setting_is_named_with_the_likely_one(world, monkeypatch, caplog, capsys):
    monkeypatch.chdir(world["root"])
    for key, value in world["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLEXYFACE_DEVIC", "cpu")
    assert cli.main(["check"]) == 0
    assert "FLEXYFACE_DEVIC is not a setting of this project (did you mean FLEXYFACE_DEVICE?)" in caplog.text
    assert capsys.readouterr().out.startswith("settings OK: data ")


def _terminal(world, argv, **env) -> tuple[int, list[str], float]:
    """``flexyface ARGV`` as a user runs it: exit status, the non-empty lines of stderr, seconds."""
    full = {**os.environ, **world["env"], **{k: v.format(root=world["root"]) for k, v in env.items()}}
    start = time.monotonic()
    done = subprocess.run([str(BIN / "flexyface"), *argv], cwd=world["root"], env=full, capture_output=True,
                          text=True, timeout=120)
    seconds = time.monotonic() - start
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()], seconds


@pytest.mark.parametrize("argv, env, words", [
    (["sweep", "fresh", "--images", "4", "--prompt-file", "binary.txt"], {}, "is not UTF-8 text"),
    (["--verbose", "sweep", "../x", "--images", "4"], {}, "Traceback"),
])
def test_what_the_terminal_shows(world, argv, env, words):
    code, lines, _ = _terminal(world, argv, **env)
    assert code == 2, lines
    if "--verbose" in argv:  # the traceback, only when asked for
        assert any(words in line for line in lines) and len(lines) > 3, lines
    else:
        assert len(lines) == 1 and words in lines[0], lines


def test_an_unreachable_postgresql_is_reported_within_five_seconds(world):
    files = file_hashes(world["data"])
    code, lines, seconds = _terminal(world, NEW, DAGSTER_HOME="{root}/home_postgres", FLEXYFACE_PG_PORT="1")
    assert code == 2 and len(lines) == 1, lines
    assert "PostgreSQL at 127.0.0.1:1/flexyface" in lines[0] and "Connection refused" in lines[0], lines
    assert seconds < 5, seconds
    assert file_hashes(world["data"]) == files
    assert sorted(p.name for p in (world["root"] / "home_postgres").iterdir()) == ["dagster.yaml"]


def _failure_lines(result) -> list[str]:
    """The one-line errors of a failed run: resource set-up and step failures."""
    kinds = (dg.DagsterEventType.RESOURCE_INIT_FAILURE, dg.DagsterEventType.STEP_FAILURE)
    return [str(getattr(e.event_specific_data, "error", None) and e.event_specific_data.error.message).strip()
            for e in result.all_events if e.event_type in kinds]


def test_runs_from_the_ui_share_the_checks_and_add_nothing(data_dir, dagster_home, tiny_models_dir):
    """The Dagster side: a bad device fails the start run while its resources are set up; real
    weights missing offline fail ``start_sweep`` and ``sweep_parameters`` before anything is written."""
    from flexyface_pipeline.defs.start import start_run_config
    from flexyface_pipeline_tests.helpers import sweep_run_config

    files = file_hashes(data_dir)
    settings = {"num_images": 4, "width": 64, "height": 64, "prompt_files": ["demo.txt"], "steps_min": 4,
                "steps_max": 5}
    bad_device = tiny_defs(data_dir, tiny_models_dir, device="gpu")
    absent = tiny_defs(data_dir, tiny_models_dir, profile="real", offline=True,
                       realvis_xl_model="flexyface-tests/absent-model")
    with dg.DagsterInstance.get() as instance:
        result = bad_device.resolve_job_def("start_sweep").execute_in_process(
            instance=instance, run_config=start_run_config("ui1", settings), raise_on_error=False)
        assert not result.success
        assert _failure_lines(result)[0].startswith("flexyface_pipeline.lib.settings.SettingError: "
                                                    "FLEXYFACE_DEVICE='gpu': expected auto, cpu, cuda or cuda:N")
        result = absent.resolve_job_def("start_sweep").execute_in_process(
            instance=instance, run_config=start_run_config("ui2", settings), raise_on_error=False)
        assert not result.success
        assert "FLEXYFACE_REALVIS_XL_MODEL='flexyface-tests/absent-model': realvis_xl's weights are not on this " \
               "machine" in _failure_lines(result)[0]
        instance.add_dynamic_partitions("sweeps", ["ui3"])  # as `dagster asset materialize` would find it
        result = absent.resolve_job_def("sweep_job").execute_in_process(
            instance=instance, partition_key="ui3", run_config=sweep_run_config(4), raise_on_error=False)
        assert not result.success
        assert [e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE] == [
            "sweep_parameters"]
        assert "realvis_xl's weights are not on this machine" in _failure_lines(result)[0]
        assert instance.get_dynamic_partitions("sweeps") == ["ui3"]
    assert file_hashes(data_dir) == files  # no sweep.json, no table
