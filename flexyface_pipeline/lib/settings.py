"""Every ``FLEXYFACE_*`` setting, checked once, before anything is written or any model loads.

The ``flexyface`` command, the Dagster resources (``defs/resources.py``) and the ``make`` targets
(through ``flexyface check``) share these checks. Each failure is a ``SettingError`` whose one-line
message names the setting, the bad value and what is accepted or how to fix it.

Nothing here reads the environment on import: callers pass the mapping to check (``os.environ``
after ``.env`` was read, or a resource's own fields by setting name).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Each setting of the model resource (defs/resources.py ModelResource) by environment variable.
MODEL_SETTINGS: dict[str, str] = {
    "FLEXYFACE_MODEL_PROFILE": "profile",
    "FLEXYFACE_MODELS_DIR": "models_dir",
    "FLEXYFACE_DEVICE": "device",
    "FLEXYFACE_DTYPE": "dtype",
    "FLEXYFACE_SCORING_DTYPE": "scoring_dtype",
    "FLEXYFACE_CPU_OFFLOAD": "cpu_offload",
    "FLEXYFACE_REALVIS_XL_MODEL": "realvis_xl_model",
    "FLEXYFACE_FLUX1_SCHNELL_MODEL": "flux1_schnell_model",
    "FLEXYFACE_SD35_MODEL": "sd35_model",
    "FLEXYFACE_HIDREAM_MODEL": "hidream_model",
    "FLEXYFACE_HIDREAM_LLAMA_MODEL": "hidream_llama_model",
    "FLEXYFACE_FLUX2_DEV_MODEL": "flux2_dev_model",
    "FLEXYFACE_CLIP_MODEL": "clip_model",
    "FLEXYFACE_AESTHETIC_V1_MODEL": "aesthetic_v1_model",
    "FLEXYFACE_AESTHETIC_V2_MODEL": "aesthetic_v2_model",
    "FLEXYFACE_HPS_V2_MODEL": "hps_v2_model",
    "FLEXYFACE_RAY_ADDRESS": "ray_address",
    "FLEXYFACE_RAY_GPUS_PER_SCORER": "ray_gpus_per_scorer",
    "FLEXYFACE_RAY_ACTORS": "ray_actors",
}
# The model each location setting points at: an engine or a metric (registry keys), or HiDream's Llama.
LOCATION_SETTINGS: dict[str, str] = {
    "FLEXYFACE_REALVIS_XL_MODEL": "realvis_xl",
    "FLEXYFACE_FLUX1_SCHNELL_MODEL": "flux1_schnell",
    "FLEXYFACE_SD35_MODEL": "sd35",
    "FLEXYFACE_HIDREAM_MODEL": "hidream",
    "FLEXYFACE_HIDREAM_LLAMA_MODEL": "hidream_llama",
    "FLEXYFACE_FLUX2_DEV_MODEL": "flux2_dev",
    "FLEXYFACE_CLIP_MODEL": "clip_score",
    "FLEXYFACE_AESTHETIC_V1_MODEL": "aesthetic_score",
    "FLEXYFACE_AESTHETIC_V2_MODEL": "aes_v2_score",
    "FLEXYFACE_HPS_V2_MODEL": "hps_v2_score",
}
NIGHTLY_SETTINGS: dict[str, str] = {
    "num_images": "FLEXYFACE_NIGHTLY_IMAGES",
    "width": "FLEXYFACE_NIGHTLY_WIDTH",
    "height": "FLEXYFACE_NIGHTLY_HEIGHT",
    "prompt_files": "FLEXYFACE_NIGHTLY_PROMPT_FILE",
    "engine": "FLEXYFACE_NIGHTLY_ENGINE",
}
POSTGRES_SETTINGS = ("FLEXYFACE_PG_HOST", "FLEXYFACE_PG_PORT", "FLEXYFACE_PG_USER", "FLEXYFACE_PG_PASSWORD",
                     "FLEXYFACE_PG_DB")
# Read by make and docker compose, or by the browser walkthrough; not by the Python code location.
OTHER_SETTINGS = ("FLEXYFACE_DATA_DIR", "FLEXYFACE_INSTANCE", "FLEXYFACE_WEB_PORT", "FLEXYFACE_UI_SHOTS")
KNOWN_SETTINGS = frozenset((*MODEL_SETTINGS, *NIGHTLY_SETTINGS.values(), *POSTGRES_SETTINGS, *OTHER_SETTINGS))

DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")
BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}
# How long the checks wait for a server (PostgreSQL, a Ray head) to answer, in seconds.
CONNECT_TIMEOUT = 3
_FIX = "edit it in .env (make setup writes one from .env.example) or export it"


class SettingError(ValueError):
    """A setting holds a value that cannot work. ``setting`` names it; the message is one line."""

    def __init__(self, setting: str, message: str):
        self.setting = setting
        super().__init__(message)


def _bad(setting: str, value: object, expected: str) -> SettingError:
    return SettingError(setting, f"{setting}={value!r}: {expected}")


@dataclass(frozen=True)
class Settings:
    """The checked settings of a process (see ``check_environment``)."""

    data_dir: Path
    profile: str
    device: str
    offline: bool
    locations: dict[str, str] = field(default_factory=dict)  # model key -> configured location


# -- single settings ---------------------------------------------------------------------------
def check_profile(value: str) -> str:
    from flexyface_pipeline.lib.models.common import PROFILES

    if value not in PROFILES:
        raise _bad("FLEXYFACE_MODEL_PROFILE", value, f"expected one of {', '.join(PROFILES)} (tiny: the offline "
                   "demo's small random-weight models; real: the weights the model settings name)")
    return value


def check_device(value: str, *, local: bool = True) -> str:
    """``value`` if it names a device; with ``local``, also one this machine has (a device for a Ray
    cluster's workers is not checked here)."""
    setting = "FLEXYFACE_DEVICE"
    index = value.removeprefix("cuda:") if value.startswith("cuda:") else None
    if value not in ("auto", "cpu", "cuda") and not (index is not None and index.isdigit()):
        raise _bad(setting, value, f"expected {DEVICES}")
    if not local or value in ("auto", "cpu"):
        return value
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a build without CUDA")
        raise _bad(setting, value, f"this machine has no usable CUDA device ({build}); set {setting}=auto "
                   "(CUDA when present, else the CPU) or cpu")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise _bad(setting, value, f"this machine has {torch.cuda.device_count()} CUDA device(s), "
                   f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return value


def check_dtype(value: str, device: str = "auto", *, local: bool = True) -> str:
    setting = "FLEXYFACE_DTYPE"
    if value not in DTYPES:
        raise _bad(setting, value, "expected auto (bf16 on a GPU that has it, else fp16; fp32 on a CPU), fp32, "
                   "fp16 or bf16")
    if local and value in ("bf16", "bfloat16") and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise _bad(setting, value, "this GPU has no bfloat16; set it to auto or fp16")
    return value


def check_scoring_dtype(value: str) -> str:
    from flexyface_pipeline.lib.metrics.base import SCORING_DTYPES

    if value not in SCORING_DTYPES:
        raise _bad("FLEXYFACE_SCORING_DTYPE", value, f"expected one of {', '.join(SCORING_DTYPES)} (reference: "
                   "each metric as its reference library computes it)")
    return value


def check_boolean(setting: str, value: object) -> bool:
    text = str(value).strip().lower()
    if text not in BOOLEANS:
        raise _bad(setting, value, "expected true or false (also 1/0, yes/no)")
    return BOOLEANS[text]


def check_gpu_share(value: object) -> float:
    try:
        share = float(str(value).strip() or "1")
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:
        raise _bad("FLEXYFACE_RAY_GPUS_PER_SCORER", value, "expected a GPU share in (0, 1] such as 1, 0.5 or 0.25")
    return share


def check_whole(setting: str, value: object, *, least: int) -> int:
    text = str(value).strip()
    try:
        number = int(text)
    except ValueError:
        raise _bad(setting, value, f"expected a whole number of at least {least}") from None
    if number < least:
        raise _bad(setting, value, f"expected a whole number of at least {least}")
    return number


def check_ray_address(value: str, *, reachable: bool = True) -> str:
    """Empty (no cluster), ``auto``, ``ray://HOST:PORT`` or ``HOST:PORT``; with ``reachable``, Ray is
    installed and an explicit address accepts connections."""
    setting = "FLEXYFACE_RAY_ADDRESS"
    value = value.strip()
    if not value:
        return value
    if value != "auto":
        host, sep, port = value.removeprefix("ray://").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in host:
            raise _bad(setting, value, "expected auto, ray://HOST:PORT (Ray client, port 10001) or HOST:PORT "
                       "(the head's GCS, port 6379); leave it empty to run every model in this process")
    if reachable:
        from flexyface_pipeline.lib.distributed import RayUnavailableError, check_address

        try:
            check_address(value, timeout=CONNECT_TIMEOUT)
        except RayUnavailableError as err:
            raise SettingError(setting, str(err)) from None
    return value


def check_location_setting(setting: str, value: str) -> str:
    """A model location (real profile): a Hugging Face hub id or an existing path."""
    from flexyface_pipeline.lib.models.common import MissingWeightsError, check_location

    try:
        return check_location(LOCATION_SETTINGS[setting], value, setting)
    except MissingWeightsError as err:
        raise SettingError(setting, f"{setting}={value!r}: {str(err).split(': ', 1)[-1]}") from None


def check_directory(setting: str, value: str, *, must_exist: bool) -> Path:
    if not value.strip():
        raise SettingError(setting, f"{setting} is not set: {_FIX}")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise _bad(setting, value, "is a file, not a directory")
    if must_exist and not path.is_dir():
        raise _bad(setting, value, "no such directory: create it, or run `make setup` (it creates data/ and "
                   "writes .env)")
    return path


# -- groups ------------------------------------------------------------------------------------
def check_model_settings(values: Mapping[str, object]) -> str:
    """The model resource's settings (``MODEL_SETTINGS`` names; absent ones take no part); returns
    the device models run on here: with a Ray cluster the device is the workers', and this process
    runs no model (``cpu``)."""
    def text(name: str, default: str = "") -> str:
        value = values.get(name, default)
        return default if value is None else str(value).strip()

    profile = check_profile(text("FLEXYFACE_MODEL_PROFILE", "real"))
    ray = check_ray_address(text("FLEXYFACE_RAY_ADDRESS"), reachable=False)
    device = check_device(text("FLEXYFACE_DEVICE", "auto"), local=not ray)
    check_dtype(text("FLEXYFACE_DTYPE", "auto"), device, local=not ray)
    check_scoring_dtype(text("FLEXYFACE_SCORING_DTYPE", "reference"))
    check_boolean("FLEXYFACE_CPU_OFFLOAD", text("FLEXYFACE_CPU_OFFLOAD", "false"))
    check_gpu_share(text("FLEXYFACE_RAY_GPUS_PER_SCORER", "1"))
    check_whole("FLEXYFACE_RAY_ACTORS", text("FLEXYFACE_RAY_ACTORS", "0") or "0", least=0)
    models_dir = text("FLEXYFACE_MODELS_DIR")
    if models_dir:
        check_directory("FLEXYFACE_MODELS_DIR", models_dir, must_exist=False)
    if profile == "real":
        for setting in LOCATION_SETTINGS:
            if setting in values:
                check_location_setting(setting, text(setting))
    return "cpu" if ray else device


NIGHTLY_DEFAULTS = {"num_images": 200, "width": 512, "height": 512, "prompt_files": ["portraits.txt"],
                    "engine": "realvis_xl"}
NIGHTLY_TINY_DEFAULTS = {"num_images": 96, "width": 64, "height": 64, "prompt_files": ["demo.txt"],
                         "engine": "realvis_xl", "steps_min": 4, "steps_max": 10}


def nightly_settings(environ: Mapping[str, str]) -> dict:
    """The ``sweep_parameters`` settings of a scheduled sweep from ``FLEXYFACE_NIGHTLY_*`` (empty:
    the default; with the tiny profile the demo's small sweep)."""
    tiny = environ.get("FLEXYFACE_MODEL_PROFILE", "").strip() == "tiny"
    settings = dict(NIGHTLY_TINY_DEFAULTS if tiny else NIGHTLY_DEFAULTS)
    for key, setting in NIGHTLY_SETTINGS.items():
        raw = environ.get(setting, "").strip()
        if not raw:
            continue
        if key in ("num_images", "width", "height"):
            settings[key] = check_whole(setting, raw, least=1)
        elif key == "prompt_files":
            settings[key] = [name.strip() for name in raw.split(",") if name.strip()]
        else:
            from flexyface_pipeline.lib.engines import ENGINES

            if raw not in ENGINES:
                raise _bad(setting, raw, f"expected an engine: {', '.join(ENGINES)}")
            settings[key] = raw
    return settings


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``FLEXYFACE_*`` variable no part of the project reads (a misspelt name), with the
    closest known name."""
    lines = []
    for name in sorted(n for n in environ if n.startswith("FLEXYFACE_") and n not in KNOWN_SETTINGS):
        close = difflib.get_close_matches(name, KNOWN_SETTINGS, n=1)
        lines.append(f"{name} is not a setting of this project" + (f" (did you mean {close[0]}?)" if close else ""))
    return lines


def check_environment(environ: Mapping[str, str]) -> Settings:
    """Every ``FLEXYFACE_*`` setting of ``environ`` (the data directory, the models, the Ray cluster,
    the nightly sweep); the instance is ``check_instance``'s. A misspelt name is logged as a warning."""
    for line in unknown_settings(environ):
        logger.warning("%s", line)
    # The code location reads each model setting from the environment when a run starts: an unset
    # one would fail the run after its sweep was added.
    unset = [name for name in MODEL_SETTINGS if name not in environ]
    if unset:
        raise SettingError(unset[0], f"{unset[0]} is not set: run `make setup` (it adds the settings of .env.example "
                           "that .env lacks, keeping your values) or export it")
    data_dir = check_directory("FLEXYFACE_DATA_DIR", environ.get("FLEXYFACE_DATA_DIR", ""), must_exist=True)
    values = {name: environ[name] for name in MODEL_SETTINGS if name in environ}
    device = check_model_settings(values)
    check_ray_address(environ.get("FLEXYFACE_RAY_ADDRESS", ""), reachable=True)
    nightly_settings(environ)
    profile = values.get("FLEXYFACE_MODEL_PROFILE", "real").strip()
    locations = {LOCATION_SETTINGS[name]: values[name].strip() for name in LOCATION_SETTINGS if name in values}
    return Settings(data_dir=data_dir.resolve(), profile=profile, device=device,
                    offline=profile != "real" or hub_offline(environ), locations=locations)


def hub_offline(environ: Mapping[str, str]) -> bool:
    """Whether Hugging Face downloads are off: ``HF_HUB_OFFLINE`` in ``environ``, or as the hub
    library read it."""
    from huggingface_hub import constants

    return environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE") or bool(
        constants.HF_HUB_OFFLINE)


# -- weights -----------------------------------------------------------------------------------
def check_weights_available(locations: Mapping[str, str], engines: Iterable[str], metrics: Iterable[str]) -> None:
    """With real weights and downloads off: the weights of ``engines`` and ``metrics`` are on this
    machine (a local directory, or the Hugging Face cache). A ``SettingError`` names the first
    model that is missing, its setting and how to get it; nothing is loaded."""
    from flexyface_pipeline.lib.engines import get_engine
    from flexyface_pipeline.lib.metrics import get_scorer
    from flexyface_pipeline.lib.models.common import MissingWeightsError

    from flexyface_pipeline.lib.models.common import is_local

    wanted = [(get_engine(e), e) for e in dict.fromkeys(engines)] + [(get_scorer(m), m) for m in dict.fromkeys(metrics)]
    for cls, key in wanted:
        location = locations.get(key) or cls.default_model
        try:
            cls.check_available(location, locations=locations)
        except MissingWeightsError as err:
            if is_local(location):
                raise SettingError(cls.setting, str(err)) from None
            setting = next((s for s in (cls.setting, "FLEXYFACE_HIDREAM_LLAMA_MODEL") if s in str(err)), cls.setting)
            missing = location
            if setting != cls.setting:  # HiDream's second weights
                from flexyface_pipeline.lib.engines.hidream import DEFAULT_LLAMA

                missing = locations.get("hidream_llama") or DEFAULT_LLAMA
            raise SettingError(setting, f"{setting}={missing!r}: {key}'s weights are not on this machine and "
                               f"downloads are off (HF_HUB_OFFLINE): download them once where there is network "
                               f"(hf download {missing}), or set {setting} to a local directory holding them"
                               ) from None


# -- the Dagster instance ----------------------------------------------------------------------
def check_instance(environ: Mapping[str, str]) -> str:
    """``DAGSTER_HOME`` holds a ``dagster.yaml`` and the storage it names answers: a PostgreSQL
    server is tried once with a short timeout instead of Dagster's own retries. Returns a short
    description of the storage."""
    home_text = environ.get("DAGSTER_HOME", "").strip()
    if not home_text:
        raise SettingError("DAGSTER_HOME", "DAGSTER_HOME is not set: run `make setup` (it writes .env) or export "
                           "DAGSTER_HOME to a directory holding dagster.yaml")
    home = Path(home_text).expanduser()
    config_file = home / "dagster.yaml"
    if not config_file.is_file():
        raise SettingError("DAGSTER_HOME", f"DAGSTER_HOME={home_text} holds no dagster.yaml, so runs would go to a "
                           "default instance without the gpu pool limit and the sweep list: run `make setup`, or "
                           "point DAGSTER_HOME at the project's instance (data/dagster)")
    import yaml

    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SettingError("DAGSTER_HOME", f"{config_file} is not valid YAML{where}: fix it, or link the project's "
                           "again with `make instance FLEXYFACE_INSTANCE=sqlite`") from None
    if not isinstance(config, dict):
        raise SettingError("DAGSTER_HOME", f"{config_file} holds no settings (expected a mapping): run "
                           "`make instance FLEXYFACE_INSTANCE=sqlite`")
    postgres = _postgres_settings(config)
    if postgres is None:
        return f"SQLite under {home}"
    return _check_postgres(postgres, environ)


def _postgres_settings(config: dict) -> dict | None:
    """The ``postgres_db`` (or ``postgres_url``) section of an instance's settings, or None."""
    sections = [config.get("storage", {}).get("postgres") if isinstance(config.get("storage"), dict) else None]
    for key in ("run_storage", "event_log_storage", "schedule_storage"):
        section = config.get(key)
        if isinstance(section, dict) and "postgres" in str(section.get("module", "")):
            sections.append(section.get("config"))
    for section in sections:
        if isinstance(section, dict):
            return section
    return None


def _resolve_value(value: object, environ: Mapping[str, str], what: str) -> str:
    if isinstance(value, dict) and "env" in value:
        name = str(value["env"])
        if name not in environ:
            raise SettingError(name, f"{name} is not set, and the instance's PostgreSQL {what} comes from it: "
                               f"{_FIX}")
        return environ[name]
    return "" if value is None else str(value)


def _check_postgres(section: dict, environ: Mapping[str, str]) -> str:
    if "postgres_url" in section:
        url = _resolve_value(section["postgres_url"], environ, "url")
        target = dict(dsn=url)
        where = url.rsplit("@", 1)[-1]
        settings = "its postgres_url"
    else:
        db = section.get("postgres_db") or {}
        host = _resolve_value(db.get("hostname"), environ, "host") or "localhost"
        port_value = db.get("port", 5432)
        port_text = _resolve_value(port_value, environ, "port").strip() or "5432"
        port_setting = port_value["env"] if isinstance(port_value, dict) and "env" in port_value else "port"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _bad(port_setting, port_text, "expected a TCP port number (1-65535)")
        target = dict(host=host, port=int(port_text), user=_resolve_value(db.get("username"), environ, "user"),
                      password=_resolve_value(db.get("password"), environ, "password"),
                      dbname=_resolve_value(db.get("db_name"), environ, "database"))
        where = f"{host}:{port_text}/{target['dbname']}"
        settings = ", ".join(v["env"] for v in db.values() if isinstance(v, dict) and "env" in v) or "dagster.yaml"
    import psycopg2

    try:
        connection = psycopg2.connect(connect_timeout=CONNECT_TIMEOUT, **target)
    except psycopg2.Error as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        cause = lines[0] if lines else type(err).__name__
        fix = (f"create it (createdb -h {target.get('host')} -p {target.get('port')} -U {target.get('user')} "
               f"{target.get('dbname')})" if "does not exist" in cause else
               "start the server or fix the settings, or use the SQLite instance: `make setup FLEXYFACE_INSTANCE=sqlite`")
        raise SettingError("FLEXYFACE_PG_HOST", f"the instance's PostgreSQL at {where} ({settings}) cannot be used: "
                           f"{cause[:200]}; {fix}") from None
    connection.close()
    return f"PostgreSQL at {where}"

