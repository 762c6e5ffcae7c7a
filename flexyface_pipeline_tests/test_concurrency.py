"""Commands on one instance and data directory at the same time.

A command that runs a sweep first claims it (``SweepStore.claim``: a lock file under
``data/sweeps/.locks/``). Two ``flexyface sweep`` processes on the same new sweep end with one
sweep and every image generated once: the second ends at once with one line naming the sweep and
the command that holds it, having written nothing (or, started after the first has finished, runs
it again and keeps every image: both succeed as one). On different sweeps both run, taking turns in
the pools (gpu, export), and the last export holds both. The processes are real ``flexyface``
commands; both cases run in one test (three commands at once) to keep the test short.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from flexyface_pipeline import cli
from flexyface_pipeline.lib.engines import get_engine
from flexyface_pipeline.lib.export import SCORE_TABLES
from flexyface_pipeline.lib.models.scorer_builders import scorer_builder
from flexyface_pipeline.lib.store import SweepBusyError, SweepStore
from flexyface_pipeline_tests.helpers import BIN, REPO, link_instance, project_env, tiny_resources

NUM_IMAGES = 4
SWEEP_ARGS = ["--images", str(NUM_IMAGES), "--engine", "realvis_xl", "--width", "64", "--height", "64",
              "--steps", "4", "5", "--prompt-file", "demo.txt"]
TIMEOUT_S = 300


@dataclass
class Project:
    home: Path
    data_dir: Path
    env: dict[str, str]
    workdir: Path

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))


@pytest.fixture
def project(tmp_path, tiny_models_dir) -> Project:
    data_dir = tmp_path / "data"
    shutil.copytree(REPO / "data" / "prompts", data_dir / "prompts")
    home = link_instance(tmp_path / "dagster")
    # What `make instance` does: the instance's storage exists (two processes creating SQLite
    # storage at once can leave it unusable) and the gpu pool has its limit.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
    workdir = tmp_path / "work"
    workdir.mkdir()
    # Built up front (the processes would wait for one another's build, on the clock of the test).
    models = tiny_resources(data_dir, tiny_models_dir)["models"]
    models.location("realvis_xl", get_engine("realvis_xl"))
    for metric in SCORE_TABLES:
        models.location(metric, scorer_builder(metric))
    return Project(home, data_dir, project_env(home, data_dir, tiny_models_dir), workdir)


@dataclass
class Ended:
    name: str
    pid: int
    returncode: int
    stderr: str

    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if " ERROR flexyface: " in line]

    def __str__(self) -> str:
        return f"--- {self.name} (pid {self.pid}) exited {self.returncode}; its stderr:\n{self.stderr[-6000:]}"


def _run_together(project: Project, *commands: list[str]) -> list[Ended]:
    """Start the commands at the same moment and wait for all. Output goes to files: a process
    blocked on a full pipe could hold a pool slot the other one waits for."""
    started = []
    for number, argv in enumerate(commands):
        log = project.workdir / f"{number}.stderr"
        with open(log, "w") as err:
            started.append((log, subprocess.Popen([str(BIN / "flexyface"), *argv], env=project.env,
                                                  cwd=project.workdir, stdout=subprocess.DEVNULL, stderr=err)))
    try:
        for _, process in started:
            process.wait(timeout=TIMEOUT_S)
    finally:
        for _, process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [Ended(" ".join(argv[:2]), p.pid, p.returncode, log.read_text())
            for argv, (log, p) in zip(commands, started)]


def _generated(instance: dg.DagsterInstance, sweep: str) -> list[int]:
    """The images each run generated for the sweep (not those it verified and kept)."""
    records = instance.fetch_materializations(dg.AssetKey("generated_images"), limit=100).records
    return [r.asset_materialization.metadata["generated"].value for r in records
            if r.asset_materialization.partition == sweep]


def test_three_sweeps_at_once_two_on_one_new_name_one_on_another(project):
    """``same`` twice and ``other`` once, started at the same moment: one ``same`` sweep with every
    image generated once, the ``other`` sweep in full, and an export holding both."""
    first, second, other = _run_together(project, ["sweep", "same", *SWEEP_ARGS, "--seed", "1"],
                                         ["sweep", "same", *SWEEP_ARGS, "--seed", "1"],
                                         ["sweep", "other", *SWEEP_ARGS, "--seed", "2"])
    report = f"{first}\n{second}\n{other}"
    codes = sorted((first.returncode, second.returncode))
    outcome = {(0, 1): "one of the two refused", (0, 0): "both succeeded as one"}.get(tuple(codes), "failed")
    print(f"same name: exit statuses {codes} ({outcome}); other name: exit status {other.returncode}")
    assert other.returncode == 0, report
    assert codes in ([0, 0], [0, 1]), report
    if codes == [0, 1]:  # the usual case: the loser was refused while the winner ran
        winner, loser = (first, second) if first.returncode == 0 else (second, first)
        [line] = loser.errors() or [""]
        assert (f"sweep 'same' is busy: another command is running it (pid {winner.pid} on host " in line
                and f"flexyface sweep same --images {NUM_IMAGES}" in line
                and "wait for it to finish, then run the command again: finished images are kept" in line), report
        assert "Traceback" not in loser.stderr, report
        same_runs = 1
    else:  # the second started after the first had finished: it ran the sweep again, keeping every image
        same_runs = 2

    with project.instance() as instance:
        assert sorted(instance.get_dynamic_partitions("sweeps")) == ["other", "same"], report
        runs = [r for r in instance.get_runs() if r.job_name == "sweep_job"]
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), report
        assert len(runs) == same_runs + 1, report
        generated = {sweep: sorted(_generated(instance, sweep), reverse=True) for sweep in ("same", "other")}
    # Every image generated once: a second run of ``same`` verified and kept them all.
    assert generated == {"same": [NUM_IMAGES] + [0] * (same_runs - 1), "other": [NUM_IMAGES]}, (generated, report)
    store = SweepStore(project.data_dir)
    for sweep in ("same", "other"):
        assert len(list(store.images_dir(sweep).glob("*.png"))) == NUM_IMAGES, sweep
        images = store.read_table("images", sweep)
        assert len(images) == NUM_IMAGES and images["image_id"].is_unique, sweep
        assert not store.claim_path(sweep).read_text()  # released: no holder recorded
    # The last export ran after both sweeps were complete (the export pool orders the exports).
    export = pd.read_parquet(project.data_dir / "exports" / "sweep_results.parquet")
    assert export.groupby("sweep").size().to_dict() == {"other": NUM_IMAGES, "same": NUM_IMAGES}, report
    assert not export.duplicated(["sweep", "image_id"]).any()
    assert export[list(SCORE_TABLES)].notna().all().all(), export[list(SCORE_TABLES)]


# -- the claim itself ---------------------------------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys
    from flexyface_pipeline.lib.store import SweepStore
    with SweepStore(sys.argv[1]).claim(sys.argv[2], command="flexyface sweep " + sys.argv[2]):
        print("holding", flush=True)
        sys.stdin.read()  # until the test closes it
""")


@contextmanager
def held_elsewhere(data_dir: Path, sweep: str) -> Iterator[int]:
    """The sweep claimed by another process for the duration of the block; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(data_dir), sweep], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def _try_claim_elsewhere(data_dir: Path, sweep: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import sys
        from flexyface_pipeline.lib.store import SweepBusyError, SweepStore
        store = SweepStore(sys.argv[1])
        print("holder:", store.claim_holder(sys.argv[2]))
        try:
            with store.claim(sys.argv[2]):
                print("claimed")
        except SweepBusyError as err:
            print("busy:", err)
    """)
    return subprocess.run([sys.executable, "-c", code, str(data_dir), sweep], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)


def test_a_claim_refuses_other_processes_and_names_its_holder(tmp_path):
    import os

    store = SweepStore(tmp_path / "data")
    with store.claim("mine", command="flexyface sweep mine --images 4") as claim:
        with store.claim("mine") as again:  # this process holds it already: reentered
            assert again is claim
        assert store.claim_holder("mine") is None  # held by this process, not by another
        lines = _try_claim_elsewhere(store.root, "mine").stdout.splitlines()
        assert lines[0].startswith(f"holder: {{'pid': {os.getpid()}, ")
        assert lines[1] == (
            f"busy: sweep 'mine' is busy: another command is running it (pid {os.getpid()} on host "
            f"{os.uname().nodename}: flexyface sweep mine --images 4, since {lines[1].split(', since ')[1]}"
        )
        assert lines[1].endswith("); wait for it to finish, then run the command again: finished images are kept")
    assert _try_claim_elsewhere(store.root, "mine").stdout.splitlines() == ["holder: None", "claimed"]
    assert [p.name for p in (store.root / "sweeps" / ".locks").iterdir()] == ["mine.lock"]
    assert store.claim_holder("unclaimed") is None and not store.claim_path("unclaimed").exists()

    with held_elsewhere(store.root, "theirs") as pid:
        with pytest.raises(SweepBusyError, match=rf"sweep 'theirs' is busy: .*\(pid {pid} on host .*: "
                           r"flexyface sweep theirs, since "):
            with store.claim("theirs"):
                pass
        assert store.claim_holder("theirs")["pid"] == pid
    with store.claim("theirs") as claim:  # free again once the holder has ended
        claim.discard = True
    assert not store.claim_path("theirs").exists()


@pytest.fixture
def cli_env(monkeypatch, data_dir, dagster_home, tmp_path, tiny_models_dir):
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in project_env(dagster_home, data_dir, tiny_models_dir).items()
           if k.startswith(("FLEXYFACE_", "DAGSTER_"))}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return data_dir


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flexyface" and r.levelname == "ERROR"]


def test_commands_refuse_a_sweep_another_command_holds_and_write_nothing(cli_env, caplog):
    from flexyface_pipeline.defs.start import start_run_config
    from flexyface_pipeline.definitions import defs

    common = ["--width", "64", "--height", "64", "--steps", "4", "5", "--prompt-file", "demo.txt"]
    store = SweepStore(cli_env)
    # A sweep with images, as far as the commands look before they claim it.
    store.write_table("parameters", "done", pd.DataFrame({"image_id": ["a"]}))
    store.write_table("images", "done", pd.DataFrame({"image_id": ["a"], "image_path": ["images/done/a.png"]}))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("sweeps", ["done"])
    before = sorted(p for p in cli_env.rglob("*") if p.is_file() and ".locks" not in p.parts)
    with dg.DagsterInstance.get() as instance:
        runs = len(instance.get_runs())

    with held_elsewhere(cli_env, "fresh") as pid:
        for argv in (["sweep", "fresh", "--images", "2", *common],
                     ["tune", "fresh", "--budget", "4", "--rounds", "1", *common]):
            caplog.clear()
            assert cli.main(argv) == 1
            [error] = _errors(caplog)
            assert error.startswith(f"sweep 'fresh' is busy: another command is running it (pid {pid} on host "), error
        with dg.DagsterInstance.get() as instance:  # the UI's start: refused too
            result = defs.resolve_job_def("start_sweep").execute_in_process(
                instance=instance, run_config=start_run_config("fresh", {"num_images": 2}), raise_on_error=False)
        [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
        message = failure.step_failure_data.error.message.strip()
        assert f"sweep 'fresh' is busy: another command is running it (pid {pid} " in message
        assert message.endswith("wait for it to finish, then launch start_sweep again: finished images are kept")
    with held_elsewhere(cli_env, "done") as pid:
        for argv in (["rescore", "clip_score", "--sweep", "done"], ["remove", "done"], ["doctor", "--repair", "done"]):
            caplog.clear()
            assert cli.main(argv) == 1, argv
            [error] = _errors(caplog)
            assert error.startswith(f"sweep 'done' is busy: another command is running it (pid {pid} "), error
        caplog.clear()
        assert cli.main(["rescore", "clip_score", "--all"]) == 1
        assert "skipping sweep done: another command is running it (pid" in caplog.text
        assert _errors(caplog) == ["every sweep with images is being run by another command: wait for them to "
                                   "finish, then run the command again"]
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions("sweeps") == ["done"]
        assert len(instance.get_runs()) == runs + 1  # only the start_sweep run, failed
    assert sorted(p for p in cli_env.rglob("*") if p.is_file() and ".locks" not in p.parts) == before
    assert not store.sweep_dir("fresh").exists() and not store.images_dir("fresh").exists()

    assert cli.main(["remove", "done", "--no-export"]) == 0  # free again: removed, with its lock file
    assert not store.claim_path("done").exists()
