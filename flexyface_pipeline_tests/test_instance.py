"""Instance configuration (dagster.yaml, deploy/dagster-postgres.yaml) and deployment files."""

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance import InstanceRef
from dagster._core.instance.config import PoolGranularity
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.event_log import SqliteEventLogStorage
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.utils import pg_url_from_config
from dotenv import dotenv_values
from sqlalchemy.engine import make_url

from flexyface_pipeline_tests.pg import (
    POSTGRES_INSTANCE_YAML,
    environ,
    open_instance,
    postgres_dagster_home,
    require_postgres,
    temporary_database,
)

REPO = Path(__file__).resolve().parents[1]
SQLITE_INSTANCE_YAML = REPO / "dagster.yaml"
SHARED_SECTIONS = ("telemetry", "run_queue", "concurrency", "run_monitoring")


def _home_linked_to(home: Path, config: Path) -> Path:
    """A DAGSTER_HOME laid out as `make` does it: dagster.yaml is a link to a file in the repository."""
    home.mkdir(parents=True)
    (home / "dagster.yaml").symlink_to(config)
    return home


def _assert_gpu_pool_limited_to_one(instance: dg.DagsterInstance) -> None:
    concurrency = instance.get_concurrency_config()
    # Steps claim the pool's slots, in launched runs and in-process executions alike.
    assert concurrency.pool_config.pool_granularity == PoolGranularity.OP
    assert concurrency.pool_config.default_pool_limit == 1
    assert concurrency.run_queue_config is not None
    assert concurrency.run_queue_config.max_concurrent_runs == 4
    assert concurrency.run_queue_config.should_block_op_concurrency_limited_runs
    assert concurrency.run_queue_config.op_concurrency_slot_buffer == 0
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    # The daemon frees the slots that a finished (or force-canceled) run still holds.
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 30
    assert "MONITORING" in instance.get_required_daemon_types()

    storage = instance.event_log_storage
    assert storage.supports_global_concurrency_limits
    assert "gpu" not in storage.get_concurrency_keys()
    # What a step (or the run queue) does the first time it meets the pool.
    assert storage.initialize_concurrency_limit_to_default("gpu")
    info = storage.get_concurrency_info("gpu")
    assert (info.slot_count, info.limit, info.using_default_limit) == (1, 1, True)
    # What `dagster instance concurrency set gpu 1` (run by `make instance`) stores.
    storage.set_concurrency_slots("gpu", 1)
    info = storage.get_concurrency_info("gpu")
    assert (info.slot_count, info.using_default_limit) == (1, False)
    # One slot: a second claimant waits until the first frees it.
    assert storage.claim_concurrency_slot("gpu", "run-a", "generated_images").is_claimed
    assert not storage.claim_concurrency_slot("gpu", "run-b", "hps_v2_scores").is_claimed
    storage.free_concurrency_slot_for_step("run-a", "generated_images")
    assert storage.claim_concurrency_slot("gpu", "run-b", "hps_v2_scores").is_claimed
    storage.free_concurrency_slots_for_run("run-b")
    assert storage.get_concurrency_info("gpu").claimed_slots == []


def test_sqlite_instance_from_repository_config(tmp_path):
    home = _home_linked_to(tmp_path / "dagster", SQLITE_INSTANCE_YAML)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, SqliteRunStorage)
        assert isinstance(instance.event_log_storage, SqliteEventLogStorage)
        assert isinstance(instance.schedule_storage, SqliteScheduleStorage)
        assert instance.run_coordinator.dequeue_interval_seconds == 2
        assert instance.telemetry_enabled is False
        _assert_gpu_pool_limited_to_one(instance)
        assert Path(instance.root_directory) == home
    # Storage lands under DAGSTER_HOME, nowhere else.
    assert (home / "history" / "runs.db").is_file()
    assert (home / "schedules" / "schedules.db").is_file()


def test_postgres_config_resolves_connection_from_environment(tmp_path):
    home = _home_linked_to(tmp_path / "dagster", POSTGRES_INSTANCE_YAML)
    settings = {
        "FLEXYFACE_PG_HOST": "db.example.internal",
        "FLEXYFACE_PG_PORT": "6543",
        "FLEXYFACE_PG_USER": "flexy face",
        "FLEXYFACE_PG_PASSWORD": "p@ss/word",
        "FLEXYFACE_PG_DB": "sweeps",
    }
    with environ(settings):
        ref = InstanceRef.from_dir(str(home))
        storage_config = process_config(
            DagsterPostgresStorage.config_type(), yaml.safe_load(ref.storage_data.config_yaml)
        )
    assert storage_config.success, storage_config.errors
    url = make_url(pg_url_from_config(storage_config.value))
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
        "postgresql+psycopg2", "flexy face", "p@ss/word", "db.example.internal", 6543, "sweeps",
    )
    assert (ref.storage_data.module_name, ref.storage_data.class_name) == (
        "dagster_postgres", "DagsterPostgresStorage",
    )
    assert ref.run_storage_data.class_name == "PostgresRunStorage"
    assert ref.event_storage_data.class_name == "PostgresEventLogStorage"
    assert ref.schedule_storage_data.class_name == "PostgresScheduleStorage"
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"
    assert ref.settings["telemetry"] == {"enabled": False}
    assert ref.settings["concurrency"]["pools"] == {"granularity": "op", "default_limit": 1}
    # No value of the connection settings is written in the file.
    connection = yaml.safe_load(POSTGRES_INSTANCE_YAML.read_text())["storage"]["postgres"]["postgres_db"]
    for key in ("hostname", "port", "username", "password", "db_name"):
        assert connection[key].keys() == {"env"}


def test_postgres_config_without_its_variables_is_refused(tmp_path, monkeypatch):
    home = _home_linked_to(tmp_path / "dagster", POSTGRES_INSTANCE_YAML)
    for name in ("FLEXYFACE_PG_HOST", "FLEXYFACE_PG_PORT", "FLEXYFACE_PG_USER", "FLEXYFACE_PG_PASSWORD", "FLEXYFACE_PG_DB"):
        monkeypatch.delenv(name, raising=False)
    ref = InstanceRef.from_dir(str(home))
    result = process_config(DagsterPostgresStorage.config_type(), yaml.safe_load(ref.storage_data.config_yaml))
    assert not result.success
    assert "FLEXYFACE_PG_HOST" in " ".join(error.message for error in result.errors)


def test_sqlite_and_postgres_configs_share_queue_and_pool_settings():
    sqlite = yaml.safe_load(SQLITE_INSTANCE_YAML.read_text())
    postgres = yaml.safe_load(POSTGRES_INSTANCE_YAML.read_text())
    assert "storage" not in sqlite  # DAGSTER_HOME decides where SQLite storage goes
    assert {key: sqlite[key] for key in SHARED_SECTIONS} == {key: postgres[key] for key in SHARED_SECTIONS}
    assert set(sqlite) == set(SHARED_SECTIONS)
    assert set(postgres) == {*SHARED_SECTIONS, "storage"}


@pytest.mark.postgres
def test_postgres_instance_round_trip(tmp_path):
    settings = require_postgres()
    sweeps = dg.DynamicPartitionsDefinition(name="sweeps")

    @dg.asset(partitions_def=sweeps)
    def image_count(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"sweep": context.partition_key, "images": 12})

    with postgres_dagster_home(tmp_path / "dagster", settings) as home:
        dbname = os.environ["FLEXYFACE_PG_DB"]
        with open_instance(home) as instance:
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
            assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
            _assert_gpu_pool_limited_to_one(instance)
            instance.add_dynamic_partitions("sweeps", ["sweep-a", "sweep-b"])
            result = dg.materialize([image_count], instance=instance, partition_key="sweep-b")
            assert result.success
            run_id = result.run_id

        # A new instance object on the same database sees everything.
        with open_instance(home) as reopened:
            run = reopened.get_run_by_id(run_id)
            assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
            assert reopened.get_dynamic_partitions("sweeps") == ["sweep-a", "sweep-b"]
            event = reopened.get_latest_materialization_event(dg.AssetKey("image_count"))
            assert event is not None and event.run_id == run_id
            materialization = event.asset_materialization
            assert materialization.partition == "sweep-b"
            assert materialization.metadata["images"].value == 12
            assert reopened.get_materialized_partitions(dg.AssetKey("image_count")) == {"sweep-b"}
            assert reopened.event_log_storage.get_concurrency_info("gpu").slot_count == 1

        # The rows are in PostgreSQL, not in a file under DAGSTER_HOME.
        with settings.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute("SELECT run_id, status FROM runs")
            assert cur.fetchall() == [(run_id, "SUCCESS")]
            cur.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'sweeps' ORDER BY id")
            assert [row[0] for row in cur.fetchall()] == ["sweep-a", "sweep-b"]
        conn.close()
        assert not list(home.rglob("*.db"))


# -- `make instance` -----------------------------------------------------------------------------

def _checkout(root: Path) -> Path:
    """A directory laid out like the repository for the Makefile's `instance` target."""
    root.mkdir()
    (root / ".venv").symlink_to(REPO / ".venv")
    shutil.copy(REPO / ".env.example", root / ".env.example")
    (root / "dagster.yaml").symlink_to(SQLITE_INSTANCE_YAML)
    (root / "deploy").mkdir()
    (root / "deploy" / "dagster-postgres.yaml").symlink_to(POSTGRES_INSTANCE_YAML)
    return root


def _make_instance(checkout: Path, choice: str | None = None) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXYFACE_", "DAGSTER_", "MAKE"))}
    # -o: the virtualenv stamp counts as up to date (the checkout shares the repository's .venv).
    command = ["make", "-f", str(REPO / "Makefile"), "-C", str(checkout), "-o", ".venv/.installed", "instance"]
    if choice is not None:
        command.append(f"FLEXYFACE_INSTANCE={choice}")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _gpu_limit(home: Path) -> tuple[int, bool]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info("gpu")
        return info.limit, info.using_default_limit


def test_make_instance_links_sqlite_settings_and_sets_the_gpu_limit(tmp_path):
    checkout = _checkout(tmp_path / "checkout")
    done = _make_instance(checkout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Set concurrency limit for gpu to 1." in done.stdout
    home = checkout / "data" / "dagster"
    assert os.readlink(home / "dagster.yaml") == "../../dagster.yaml"
    # .env came from .env.example with this checkout's path; `dotenv run` gave its DAGSTER_HOME to
    # `dagster instance concurrency set`, which stored the limit in this instance.
    assert dotenv_values(checkout / ".env")["DAGSTER_HOME"] == str(home)
    assert (home / "history" / "runs.db").is_file()
    assert _gpu_limit(home) == (1, False)

    refused = _make_instance(checkout, "mysql")
    assert refused.returncode != 0
    assert "FLEXYFACE_INSTANCE must be sqlite or postgres, not 'mysql'" in refused.stderr
    assert os.readlink(home / "dagster.yaml") == "../../dagster.yaml"


@pytest.mark.postgres
def test_make_instance_switches_to_postgres_and_back(tmp_path):
    settings = require_postgres()
    checkout = _checkout(tmp_path / "checkout")
    home = checkout / "data" / "dagster"
    with temporary_database(settings) as dbname:
        # Every setting of .env.example (as `make setup` writes .env), with this database.
        values = {k: (v or "").replace("@@REPO@@", str(checkout))
                  for k, v in dotenv_values(REPO / ".env.example").items()}
        values |= {"DAGSTER_HOME": str(home), **settings.instance_env(dbname)}
        (checkout / ".env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))

        done = _make_instance(checkout, "postgres")
        assert done.returncode == 0, done.stdout + done.stderr
        assert os.readlink(home / "dagster.yaml") == "../../deploy/dagster-postgres.yaml"
        with settings.connect(dbname) as conn, conn.cursor() as cur:
            cur.execute('SELECT concurrency_key, "limit", using_default_limit FROM concurrency_limits')
            assert cur.fetchall() == [("gpu", 1, False)]
        conn.close()
        assert not list(home.rglob("*.db"))

        # Without FLEXYFACE_INSTANCE the current choice stays.
        kept = _make_instance(checkout)
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert os.readlink(home / "dagster.yaml") == "../../deploy/dagster-postgres.yaml"

        back = _make_instance(checkout, "sqlite")
        assert back.returncode == 0, back.stdout + back.stderr
        assert os.readlink(home / "dagster.yaml") == "../../dagster.yaml"
        assert _gpu_limit(home) == (1, False)


def test_make_clean_demo_removes_the_demo_sweep_only(tmp_path):
    checkout = _checkout(tmp_path / "checkout")
    done = _make_instance(checkout)
    assert done.returncode == 0, done.stdout + done.stderr
    data, home = checkout / "data", checkout / "data" / "dagster"
    kept = {}
    for sweep in ("demo", "other", "demo2"):
        for path in (data / "sweeps" / sweep / "sweep.json", data / "images" / sweep / "0001.png",
                     data / "exports" / "grids" / sweep / "prompt-0.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{sweep} {path.name}")
            if sweep != "demo":
                kept[path] = path.read_text()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("sweeps", ["demo", "other", "demo2"])
        earlier = instance.add_run(dg.DagsterRun(job_name="sweep_job", run_id="0" * 36, tags={"dagster/partition": "other"}))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEXYFACE_", "DAGSTER_", "MAKE"))}
    command = ["make", "-f", str(REPO / "Makefile"), "-C", str(checkout), "clean-demo"]
    cleaned = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert "sweep partition demo removed from the instance" in cleaned.stdout
    for path in (data / "sweeps" / "demo", data / "images" / "demo", data / "exports" / "grids" / "demo"):
        assert not path.exists()
    assert {path: path.read_text() for path in kept} == kept
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions("sweeps") == ["other", "demo2"]
        runs = instance.get_runs()
        assert earlier.run_id in {r.run_id for r in runs}  # run history stays
        [export] = [r for r in runs if r.job_name == "export_job"]
        assert export.status == dg.DagsterRunStatus.SUCCESS
    assert (data / "exports" / "sweep_results.parquet").is_file()  # rebuilt without the demo

    refused = subprocess.run([*command, "DEMO_SWEEP="], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "DEMO_SWEEP must be a sweep name" in refused.stderr
    assert all(path.exists() for path in kept)


# -- Deployment files --------------------------------------------------------------------------

def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_file_is_valid(tmp_path):
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env_file = tmp_path / "compose.env"
    env_file.write_text("FLEXYFACE_PG_PASSWORD=not-a-real-password\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLEXYFACE_", "COMPOSE_"))}
    base = [*compose, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml"), "--env-file", str(env_file)]
    checked = subprocess.run([*base, "config", "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr

    rendered = subprocess.run([*base, "config"], env=env, capture_output=True, text=True, timeout=60)
    services = yaml.safe_load(rendered.stdout)["services"]
    assert services["code-server"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for name in ("code-server", "webserver", "daemon"):
        assert services[name]["environment"]["FLEXYFACE_PG_PASSWORD"] == "not-a-real-password"
        assert services[name]["environment"]["FLEXYFACE_PG_HOST"] == "postgres"
    # The code server executes the runs: every variable the resources read has a non-empty value.
    environment = services["code-server"]["environment"]
    unset = sorted(name for name in _resource_env_vars() if not environment.get(name))
    assert not unset, f"not set for code-server: {unset}"
    assert environment["FLEXYFACE_MODELS_DIR"] == "/opt/flexyface/data/models"

    # Without a password compose refuses to render: no default secret is written anywhere.
    env_file.write_text("FLEXYFACE_PG_USER=flexyface\n")
    missing = subprocess.run([*base, "config", "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0
    assert "FLEXYFACE_PG_PASSWORD" in missing.stderr


def _resource_env_vars() -> set[str]:
    """The names of the environment variables (dg.EnvVar) in the code location's resources."""
    from flexyface_pipeline.definitions import env_resources

    names: set[str] = set()

    def walk(value) -> None:
        if isinstance(value, dg.EnvVar):
            names.add(value.env_var_name)
        elif isinstance(value, dg.ConfigurableResource):
            for field in type(value).model_fields:
                walk(getattr(value, field))

    for resource in env_resources().values():
        walk(resource)
    return names


def test_compose_code_server_sets_every_variable_the_resources_read():
    """Runs execute in the code server's container; an EnvVar unset there fails every run at launch."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    environment = compose["services"]["code-server"]["environment"]  # `<<:` merges resolved by the loader
    read = _resource_env_vars()
    assert {"FLEXYFACE_DATA_DIR", "FLEXYFACE_MODELS_DIR", "FLEXYFACE_MODEL_PROFILE", "FLEXYFACE_HPS_V2_MODEL"} <= read
    assert not read - environment.keys(), f"not set for code-server: {sorted(read - environment.keys())}"
    # Paths are the container's: the data directory is the ./data mount, the built models lie inside it.
    data_mount = next(v.split(":")[1] for v in compose["services"]["code-server"]["volumes"] if v.startswith("./data:"))
    assert environment["FLEXYFACE_DATA_DIR"] == data_mount
    assert Path(environment["FLEXYFACE_MODELS_DIR"]).parent == Path(data_mount)
    # The image sets the same paths for commands run in it outside compose.
    dockerfile = (REPO / "Dockerfile").read_text()
    for name in ("FLEXYFACE_DATA_DIR", "FLEXYFACE_MODELS_DIR"):
        assert f"{name}={environment[name]}" in dockerfile


def test_docker_services_agree_on_the_code_server():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    workspace = yaml.safe_load((REPO / "deploy" / "workspace.docker.yaml").read_text())
    (location,) = workspace["load_from"]
    grpc = location["grpc_server"]
    command = compose["services"]["code-server"]["command"]
    assert grpc["host"] == "code-server"
    assert command[command.index("--port") + 1] == str(grpc["port"])
    assert command[command.index("--location-name") + 1] == grpc["location_name"] == "flexyface_pipeline"
    assert command[command.index("--module-name") + 1] == "flexyface_pipeline.definitions"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "COPY deploy/dagster-postgres.yaml ${DAGSTER_HOME}/dagster.yaml" in dockerfile
    assert "COPY deploy/workspace.docker.yaml /opt/flexyface/workspace.yaml" in dockerfile
    for name in ("webserver", "daemon"):
        assert "--workspace /opt/flexyface/workspace.yaml" in " ".join(compose["services"][name]["command"])
    assert "dagster instance concurrency set gpu 1 && " in " ".join(compose["services"]["daemon"]["command"])


def test_local_workspace_matches_pyproject():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"]
    (location,) = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"]
    module = location["python_module"]
    assert module["module_name"] == tool["module_name"]
    assert module["location_name"] == tool["code_location_name"]
    assert module["working_directory"] == "."


def test_env_example_documents_every_setting():
    values = dotenv_values(REPO / ".env.example")
    assert values["DAGSTER_HOME"] == "@@REPO@@/data/dagster"
    assert values["FLEXYFACE_DATA_DIR"] == "@@REPO@@/data"
    expected = {
        "FLEXYFACE_MODEL_PROFILE", "FLEXYFACE_DEVICE", "FLEXYFACE_DTYPE", "FLEXYFACE_SCORING_DTYPE",
        "FLEXYFACE_REALVIS_XL_MODEL",
        "FLEXYFACE_CLIP_MODEL", "FLEXYFACE_AESTHETIC_V1_MODEL", "FLEXYFACE_AESTHETIC_V2_MODEL",
        "FLEXYFACE_HPS_V2_MODEL", "FLEXYFACE_PG_HOST", "FLEXYFACE_PG_PORT", "FLEXYFACE_PG_USER",
        "FLEXYFACE_PG_PASSWORD", "FLEXYFACE_PG_DB",
    }
    assert expected <= values.keys()
    # Every ${VAR} that docker-compose.yml interpolates is documented here.
    compose_text = (REPO / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", compose_text))
    assert interpolated <= values.keys(), interpolated - values.keys()
    # Every environment variable the code location reads (dg.EnvVar in its resources) is set here.
    read = _resource_env_vars()
    assert read and read <= values.keys(), read - values.keys()
