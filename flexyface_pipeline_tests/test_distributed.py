"""Generation and scoring on a Ray cluster (lib/distributed.py), against the in-process way.

One local Ray cluster (two CPUs, no dashboard) serves the module. Ray workers run torch on one
thread (Ray sets OMP_NUM_THREADS to an actor's CPUs), and float sums depend on how many threads
split them, so the in-process reference also runs on one thread: then pixels and scores are
bit-identical. Starting a stage's workers (a process, imports, the model) costs seconds per stage
here, so the Ray sweep is made once (module fixture) and the tests read what it left.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from flexyface_pipeline.defs.assets.sweep import SweepConfig
from flexyface_pipeline.lib import generation
from flexyface_pipeline.lib.engines import get_engine
from flexyface_pipeline.lib.export import SCORE_TABLES
from flexyface_pipeline.lib.generation import generate_sweep, read_png_record, verify_image
from flexyface_pipeline.lib.sampling import sample_parameters
from flexyface_pipeline.lib.store import SweepStore
from flexyface_pipeline_tests.helpers import REPO, file_hashes, run_sweep, tiny_defs, tiny_resources, torch_threads

SWEEP = "dist"
NUM_IMAGES = 8
# One image per batch: a resumed run plans the same batches as an uninterrupted one, so even the
# images regenerated after the crash below are bit-identical to the reference.
SETTINGS = {"generation_batch_size": 1, "scoring_batch_size": 3}
RAY = {"ray_address": "auto", "ray_actors": 2}
TIMING_COLUMNS = ["elapsed_ms"]


class _Crash(RuntimeError):
    pass


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _project(root: Path) -> Path:
    """A data directory with the prompt files, and an empty instance directory ``root/home``."""
    data = root / "data"
    shutil.copytree(REPO / "data" / "prompts", data / "prompts")
    (root / "home").mkdir()
    return data


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models_dir) -> Path:
    """The sweep made and scored in this process (torch on one thread), and its export."""
    root = tmp_path_factory.mktemp("reference")
    data = _project(root)
    defs = tiny_defs(data, tiny_models_dir, **SETTINGS)
    with torch_threads(1), dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        assert run_sweep(defs, instance, SWEEP, NUM_IMAGES).success
        assert defs.resolve_job_def("export_job").execute_in_process(instance=instance).success
    return data


@pytest.fixture(scope="module")
def on_ray(cluster, reference, tmp_path_factory, tiny_models_dir):
    """The same sweep on two Ray workers: generation with one worker killed after the first
    batch and the driver crashing after the third, resumed; then the whole graph on Ray."""
    root = tmp_path_factory.mktemp("ray")
    data = _project(root)
    store = SweepStore(data)
    for name in ("sweep.json", "parameters.parquet"):
        (store.sweep_dir(SWEEP)).mkdir(parents=True, exist_ok=True)
        shutil.copy(SweepStore(reference).sweep_dir(SWEEP) / name, store.sweep_dir(SWEEP) / name)
    params = store.read_table("parameters", SWEEP)
    models = tiny_resources(data, tiny_models_dir, **SETTINGS, **RAY)["models"]
    models.validate()
    backend = models.distributed()
    written: list[str] = []
    write = generation.atomic_write_bytes
    killed: list[int] = []
    batches = {"n": 0}

    def counting_write(path, data_bytes):
        written.append(Path(path).name)
        return write(path, data_bytes)

    def after_batch(progress) -> None:
        batches["n"] += 1
        if batches["n"] == 1:
            # The worker that delivered the first batch still holds its second one.
            [worker] = [w for w in backend._pool.workers if w.stats.batches == 1 and w.inflight]
            killed.append(worker.index)
            cluster.kill(worker.handle)
        if batches["n"] == 3:
            raise _Crash("the driver stops here")

    def no_local_engine():
        raise AssertionError("with a backend no engine loads in this process")

    log = logging.getLogger("flexyface.test.ray")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    mp = pytest.MonkeyPatch()
    mp.setattr(generation, "atomic_write_bytes", counting_write)
    try:
        with pytest.raises(_Crash):
            generate_sweep(params, store, no_local_engine, batch_size=models.generation_batch, log=log,
                           after_batch=after_batch, backend=backend)
        after_crash = sorted(p.name for p in store.images_dir(SWEEP).glob("*.png"))
        retried = backend.retried()
        workers = backend.worker_stats()
        resumed = generate_sweep(params, store, no_local_engine, batch_size=models.generation_batch, log=log,
                                 backend=backend)
    finally:
        mp.undo()
        log.removeHandler(handler)
        models.release()
    store.write_table("images", SWEEP, resumed.table)

    defs = tiny_defs(data, tiny_models_dir, **SETTINGS, **RAY)
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        result = run_sweep(defs, instance, SWEEP, NUM_IMAGES)
        assert result.success
        assert defs.resolve_job_def("export_job").execute_in_process(instance=instance).success
    return {"data": data, "home": root / "home", "defs": defs, "written": written, "killed": killed,
            "after_crash": after_crash, "retried": retried, "workers": workers, "resumed": resumed,
            "messages": [r.getMessage() for r in records], "result": result}


@pytest.mark.slow
def test_ray_sweep_gives_the_images_scores_and_export_of_the_in_process_way(reference, on_ray):
    ref_dir, ray_dir = SweepStore(reference).images_dir(SWEEP), SweepStore(on_ray["data"]).images_dir(SWEEP)
    names = sorted(p.name for p in ref_dir.glob("*.png"))
    assert len(names) == NUM_IMAGES and names == sorted(p.name for p in ray_dir.glob("*.png"))
    for name in names:
        assert np.array_equal(_pixels(ref_dir / name), _pixels(ray_dir / name)), name
        ours, theirs = read_png_record(ray_dir / name), read_png_record(ref_dir / name)
        assert {k: v for k, v in ours.items() if k != "elapsed_ms"} == {k: v for k, v in theirs.items() if k != "elapsed_ms"}
    for metric, (table, _) in SCORE_TABLES.items():
        ours = SweepStore(on_ray["data"]).read_table(table, SWEEP)
        theirs = SweepStore(reference).read_table(table, SWEEP)
        assert np.array_equal(ours[metric].to_numpy(), theirs[metric].to_numpy()), metric
        # The files scored differ only in the elapsed_ms of their settings chunk: so do their digests.
        pd.testing.assert_frame_equal(ours.drop(columns=["image_sha256"]), theirs.drop(columns=["image_sha256"]))
    ours = pd.read_parquet(on_ray["data"] / "exports" / "sweep_results.parquet").drop(columns=TIMING_COLUMNS)
    theirs = pd.read_parquet(reference / "exports" / "sweep_results.parquet").drop(columns=TIMING_COLUMNS)
    assert len(ours) == NUM_IMAGES
    pd.testing.assert_frame_equal(ours, theirs)
    # The run's metadata says what each worker of each score step did. The three CLIP ViT-L/14
    # metrics share image embeddings through the sweep's cache: the first of them to run embeds.
    images = {}
    for metric, (table, _) in SCORE_TABLES.items():
        [mat] = on_ray["result"].asset_materializations_for_node(table)
        workers = mat.metadata["ray_workers"].value
        assert {w["stage"] for w in workers} == {f"scorer:{metric}"}
        assert all(w["idle_seconds"] >= 0 and w["busy_seconds"] >= 0 for w in workers)
        images[metric] = sum(w["images"] for w in workers)
    assert images["hps_v2_score"] == NUM_IMAGES
    clip_family = [images[m] for m in ("clip_score", "aesthetic_score", "aes_v2_score")]
    assert set(clip_family) <= {0, NUM_IMAGES} and sum(clip_family) >= NUM_IMAGES, images
    [gen] = on_ray["result"].asset_materializations_for_node("generated_images")
    assert gen.metadata["reused_verified"].value == NUM_IMAGES  # made above, verified, kept


@pytest.mark.slow
def test_a_killed_worker_and_a_crashed_driver_lose_nothing(on_ray):
    written, after_crash, resumed = on_ray["written"], on_ray["after_crash"], on_ray["resumed"]
    # Every image was written exactly once, the killed worker's unfinished batch by the other.
    assert sorted(written) == sorted(f"{SWEEP}-{i:05d}.png" for i in range(NUM_IMAGES))
    [killed] = on_ray["killed"]
    # Its batch in flight, and one more if the driver handed it another before it heard of the death.
    assert 1 <= len(on_ray["retried"]) <= 2 and all(b.startswith("batch of 1") for b in on_ray["retried"])
    assert any(f"was not finished by worker {killed}: retrying it on the other workers" in m for m in on_ray["messages"])
    assert any(f"worker {killed} died" in m for m in on_ray["messages"])
    assert [w["died"] for w in on_ray["workers"]] == [w["worker"] == killed for w in on_ray["workers"]]
    # The crashed driver left complete images only; the resumed run kept them all.
    assert len(after_crash) == 3
    assert resumed.reused == 3 and resumed.generated == NUM_IMAGES - 3
    store = SweepStore(on_ray["data"])
    rows = {r["image_id"]: r for r in store.read_table("parameters", SWEEP).to_dict("records")}
    for image_id, row in rows.items():
        assert verify_image(store.image_path(SWEEP, image_id), row) is not None
    assert not list(store.images_dir(SWEEP).glob(".*"))  # no temporary file left behind
    assert any("(steps=" in m and "Ray worker" in m for m in on_ray["messages"])


@pytest.mark.slow
def test_rescoring_one_metric_on_ray_leaves_the_other_tables_untouched(on_ray):
    data = on_ray["data"]
    before = file_hashes(data / "images") | file_hashes(data / "sweeps")
    hps = data / "sweeps" / SWEEP / "hps_v2_scores.parquet"
    old = pd.read_parquet(hps)
    hps.unlink()
    with dg.instance_for_test(temp_dir=str(on_ray["home"])) as instance:
        result = on_ray["defs"].resolve_job_def("sweep_job").execute_in_process(
            instance=instance, partition_key=SWEEP, asset_selection=[dg.AssetKey("hps_v2_scores")])
        assert result.success
    after = file_hashes(data / "images") | file_hashes(data / "sweeps")
    assert set(before) == set(after)
    assert {k for k in before if before[k] != after[k]} <= {f"{SWEEP}/hps_v2_scores.parquet"}
    pd.testing.assert_frame_equal(pd.read_parquet(hps), old)
    [mat] = result.asset_materializations_for_node("hps_v2_scores")
    assert sum(w["images"] for w in mat.metadata["ray_workers"].value) == NUM_IMAGES


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_model_fails_the_step_with_that_error(cluster):
    from flexyface_pipeline.lib.distributed import RayBackend, WorkerSettings

    def loader(fields):  # pickled by value: the worker runs it
        raise FileNotFoundError(f"{fields['engine']}: no weights at /nowhere; set FLEXYFACE_REALVIS_XL_MODEL")

    row = {"image_id": "x-00000", "prompt": "a cat", "steps": 4, "guidance": 2.0, "seed": 1, "width": 64,
           "height": 64, "engine": "realvis_xl"}
    with RayBackend("auto", WorkerSettings(loader, {"engine": "realvis_xl"}), device="cpu", max_actors=1) as backend:
        with pytest.raises(FileNotFoundError, match=r"^realvis_xl: no weights at /nowhere; set FLEXYFACE_REALVIS_XL_MODEL$"):
            list(backend.generate("realvis_xl", [row], batch_size=1))
    assert backend.history[-1]["workers"][0]["images"] == 0


# -- the driver process killed with SIGKILL ------------------------------------------------------
KILLED_SWEEP = "sigkill"
KILLED_IMAGES = 12
KILL_AFTER = 3  # PNGs on disk when the driver is killed
# The temporary file of an atomic write (lib/atomic.py): ".<target name>.<random>.tmp", next to it.
TEMPORARY = re.compile(r"^\.(?P<target>.+\.png)\.[^.]+\.tmp$")

# A driver of its own: connects to the cluster at argv[3], generates the sweep's missing images on
# two Ray workers (one image per batch) and writes the images table, as generated_images does.
_DRIVER = r"""
import json, sys
from flexyface_pipeline.defs.resources import ModelResource, StorageResource
from flexyface_pipeline.lib.generation import generate_sweep

data_dir, models_dir, address, sweep = sys.argv[1:]
models = ModelResource(storage=StorageResource(data_dir=data_dir), models_dir=models_dir, profile="tiny",
                       device="cpu", generation_batch_size=1, ray_address=address, ray_actors=2)
models.validate()
store = models.storage.store()

def no_local_engine():
    raise AssertionError("with a backend no engine loads in the driver")

try:
    report = generate_sweep(store.read_table("parameters", sweep), store, no_local_engine,
                            batch_size=models.generation_batch, backend=models.distributed())
finally:
    models.release()
store.write_table("images", sweep, report.table)
print(json.dumps({"generated": report.generated, "reused": report.reused}))
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _job_state(ray, job_id: str) -> dict:
    """What the cluster's GCS says of a job and its actors, and whether their processes run.
    (Ray's state API, ``ray.util.state``, needs the dashboard, which this cluster does not start.)"""
    from ray._private import state

    [job] = [j for j in state.jobs() if j["JobID"] == job_id]
    actors = [a for a in state.actors().values() if a["JobID"] == job_id]
    return {"job_dead": job["IsDead"],
            "actors": [(a["ActorClassName"], a["State"], a["Pid"], _running(a["Pid"])) for a in actors],
            "free_cpus": ray.available_resources().get("CPU", 0.0), "cpus": ray.cluster_resources().get("CPU")}


def _ended(state: dict) -> bool:
    return (state["job_dead"] and all(s == "DEAD" and not running for _, s, _, running in state["actors"])
            and state["free_cpus"] == state["cpus"])


def _wait_until_ended(ray, job_id: str, seconds: float = 60.0) -> dict:
    deadline = time.monotonic() + seconds
    while not _ended(state := _job_state(ray, job_id)):
        assert time.monotonic() < deadline, f"job {job_id} still holds the cluster after {seconds:.0f} s: {state}"
        time.sleep(0.2)
    return state


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_mid_sweep_leaves_no_workers_and_its_images_are_kept(
        cluster, tmp_path, tiny_models_dir):
    """The driver process is killed (SIGKILL) while its two Ray workers generate; the cluster ends
    its workers, what it left on disk is complete images only, and a new driver finishes the sweep
    keeping them: the same files and images table as an uninterrupted run."""
    ray = cluster
    stores = {}
    for name in ("killed", "uninterrupted"):
        store = SweepStore(_project(tmp_path / name))
        spec = SweepConfig(num_images=KILLED_IMAGES, steps_min=4, steps_max=6, width=64, height=64,
                           prompt_files=["demo.txt"], base_seed=7, engine="realvis_xl").to_spec(KILLED_SWEEP, store)
        store.write_table("parameters", KILLED_SWEEP, sample_parameters(spec))
        stores[name] = store
    store, reference = stores["killed"], stores["uninterrupted"]
    params = store.read_table("parameters", KILLED_SWEEP)
    pd.testing.assert_frame_equal(params, reference.read_table("parameters", KILLED_SWEEP))
    rows = {row["image_id"]: row for row in params.to_dict("records")}
    expected = {f"{image_id}.png" for image_id in rows}

    # The tiny model, built here: the workers below only load it.
    models = tiny_resources(reference.root, tiny_models_dir, generation_batch_size=1)["models"]
    models.validate()
    models.location("realvis_xl", get_engine("realvis_xl"))

    # The driver, killed once KILL_AFTER images are on disk.
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-c", _DRIVER, str(store.root), str(tiny_models_dir), address, KILLED_SWEEP]
    images = store.images_dir(KILLED_SWEEP)
    log = tmp_path / "killed-driver.log"
    with open(log, "w") as out:
        victim = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(list(images.glob("*.png"))) < KILL_AFTER:
            assert victim.poll() is None, f"the driver ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {KILL_AFTER} images after 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    # The cluster notices: the job ends, its two workers die with their processes, their CPUs are free.
    from ray._private import state

    [job_id] = [j["JobID"] for j in state.jobs() if j["DriverPid"] == victim.pid]
    ended = _wait_until_ended(ray, job_id)
    assert [(name, s) for name, s, _, _ in ended["actors"]] == [("ModelWorker", "DEAD")] * 2, ended

    # What the killed driver left: complete images of their rows, and at most temporary files
    # whose names never end in .png (a run looks only for <image_id>.png).
    left = sorted(p.name for p in images.iterdir())
    kept = [name for name in left if name.endswith(".png")]
    temporary = [name for name in left if not name.endswith(".png")]
    assert KILL_AFTER <= len(kept) < KILLED_IMAGES, left
    for name in kept:
        assert verify_image(images / name, rows[name.removesuffix(".png")]) is not None, name
    for name in temporary:
        match = TEMPORARY.match(name)
        assert match is not None and match["target"] in expected, name
    before = {name: ((images / name).stat().st_ino, (images / name).stat().st_mtime_ns) for name in kept}

    # A new driver finishes the sweep: it keeps every finished image and makes only the others.
    # Meanwhile the uninterrupted run, in this process on one thread, into the other data directory.
    stdout, stderr = tmp_path / "rerun-driver.out", tmp_path / "rerun-driver.log"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        rerun = subprocess.Popen(command, stdout=out, stderr=err)
    try:
        try:
            with torch_threads(1):
                uninterrupted = generate_sweep(params, reference, lambda: models.engine("realvis_xl"), batch_size=1)
        finally:
            models.release()
        rerun.wait(timeout=180)
    finally:
        if rerun.poll() is None:
            rerun.kill()
            rerun.wait(timeout=30)
    assert uninterrupted.generated == KILLED_IMAGES
    assert rerun.returncode == 0, stdout.read_text()[-2000:] + stderr.read_text()[-3000:]
    assert json.loads(stdout.read_text().strip().splitlines()[-1]) == {
        "generated": KILLED_IMAGES - len(kept), "reused": len(kept)}
    after = {name: ((images / name).stat().st_ino, (images / name).stat().st_mtime_ns) for name in kept}
    assert after == before  # not rewritten: the same files, untouched
    [rerun_job] = [j["JobID"] for j in state.jobs() if j["DriverPid"] == rerun.pid]
    _wait_until_ended(ray, rerun_job)

    # Every image once, complete, of its row; no temporary file but those the kill left.
    assert {p.name for p in images.glob("*.png")} == expected
    for image_id, row in rows.items():
        assert verify_image(store.image_path(KILLED_SWEEP, image_id), row) is not None, image_id
    assert {p.name for p in images.iterdir()} - expected <= set(temporary)

    # The same images table, records and pixels as the uninterrupted run's (one image per batch,
    # one thread: bit-identical), timings aside.
    table = store.read_table("images", KILLED_SWEEP)
    assert table["image_id"].is_unique and table["elapsed_ms"].notna().all()
    pd.testing.assert_frame_equal(table.drop(columns=["elapsed_ms"]),
                                  uninterrupted.table.drop(columns=["elapsed_ms"]))
    ref_dir = reference.images_dir(KILLED_SWEEP)
    for name in sorted(expected):
        ours, theirs = read_png_record(images / name), read_png_record(ref_dir / name)
        assert {k: v for k, v in ours.items() if k != "elapsed_ms"} == {k: v for k, v in theirs.items() if k != "elapsed_ms"}
        assert np.array_equal(_pixels(images / name), _pixels(ref_dir / name)), name


_CHECK = r"""
import json, sys
from flexyface_pipeline.defs.resources import ModelResource, StorageResource
from flexyface_pipeline.lib import distributed, generation, scoring

def models(address):
    return ModelResource(storage=StorageResource(data_dir=sys.argv[1]), profile="tiny", device="cpu",
                         ray_address=address)

out = {}
m = models("")
m.validate()
out["backend"] = repr(m.distributed())
out["ray_imported_without_address"] = "ray" in sys.modules
def error(address):
    try:
        models(address).validate()
    except distributed.RayUnavailableError as err:
        return str(err)
    return None
out["unreachable"] = error("ray://127.0.0.1:1")
out["not_a_cluster"] = error("127.0.0.1:1")
sys.modules["ray"] = None  # Ray not installed
out["not_installed"] = error("auto")
print(json.dumps(out))
"""


def test_settings_errors_name_the_setting_and_no_address_never_imports_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXYFACE_", "RAY_"))}
    proc = subprocess.run([sys.executable, "-c", _CHECK, str(tmp_path / "data")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "None"
    assert out["ray_imported_without_address"] is False
    for key, words in [("unreachable", "no Ray cluster answers there"), ("not_a_cluster", "no Ray cluster answers"),
                       ("not_installed", "Ray is not installed")]:
        message = out[key]
        assert message is not None and "\n" not in message, (key, message)
        assert message.startswith("FLEXYFACE_RAY_ADDRESS=") and words in message, (key, message)
        assert "leave FLEXYFACE_RAY_ADDRESS empty" in message


def test_bad_ray_settings_fail_when_the_run_starts(tmp_path):
    for setting, fields, words in [
        ("FLEXYFACE_RAY_GPUS_PER_SCORER", {"ray_gpus_per_scorer": "2"}, "(0, 1]"),
        ("FLEXYFACE_RAY_GPUS_PER_SCORER", {"ray_gpus_per_scorer": "half"}, "'half'"),
        ("FLEXYFACE_RAY_ACTORS", {"ray_actors": -1}, "-1"),
    ]:
        models = tiny_resources(tmp_path / "data", tmp_path / "models", ray_address="ray://127.0.0.1:1", **fields)
        with pytest.raises(ValueError, match=rf"^{setting}=.*{__import__('re').escape(words)}"):
            models["models"].validate()


# -- deployment files ----------------------------------------------------------------------------
def test_kuberay_manifest_has_gpu_workers_and_the_data_volume_on_the_head_only():
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "ray-cluster.yaml").read_text()) if d]
    [cluster] = [d for d in docs if d.get("kind") == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    data_volumes = {v["name"] for v in head["volumes"] if "persistentVolumeClaim" in v}
    assert data_volumes
    head_mounts = {m["mountPath"]: m["name"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert head_mounts.get("/opt/flexyface/data") in data_volumes
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    [group] = cluster["spec"]["workerGroupSpecs"]
    worker = group["template"]["spec"]
    [container] = worker["containers"]
    assert container["image"] == head["containers"][0]["image"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert not any("persistentVolumeClaim" in v for v in worker.get("volumes", []))
    assert not any(m["mountPath"] == "/opt/flexyface/data" for m in container.get("volumeMounts", []))
    # The Dagster side, on the head with the data, reaches the cluster through Ray client.
    env = {e["name"]: e.get("value") for c in head["containers"] for e in c.get("env", [])}
    assert env["FLEXYFACE_RAY_ADDRESS"].startswith("ray://")


def test_compose_ray_head_service_is_an_opt_in_profile():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    head = compose["services"]["ray-head"]
    assert head["profiles"] == ["ray"]
    assert "ray" in head["command"][0] and "--head" in head["command"]
    [device] = head["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "all" and device["capabilities"] == ["gpu"]
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed: `docker compose config` not run (the YAML was checked above)")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("docker has no compose plugin: `docker compose config` not run (the YAML was checked above)")
    env = {**os.environ, "FLEXYFACE_PG_PASSWORD": "x", "FLEXYFACE_RAY_ADDRESS": "ray://ray-head:10001"}
    proc = subprocess.run([docker, "compose", "-f", str(REPO / "docker-compose.yml"), "--profile", "ray",
                           "config", "--format", "json"], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert "ray-head" in config["services"]
    assert config["services"]["code-server"]["environment"]["FLEXYFACE_RAY_ADDRESS"] == "ray://ray-head:10001"
