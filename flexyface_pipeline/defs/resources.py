"""Resources: where data lives, and the one model slot that GPU assets share."""


import fcntl
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from flexyface_pipeline.lib.config import METRICS
from flexyface_pipeline.lib.models.common import DigestCache, ModelIdentity, Runtime, free_memory, resolve_runtime
from flexyface_pipeline.lib.metrics.base import scoring_runtime
from flexyface_pipeline.lib.settings import (
    LOCATION_SETTINGS,
    MODEL_SETTINGS,
    check_boolean,
    check_directory,
    check_gpu_share,
    check_model_settings,
    check_weights_available,
)
from flexyface_pipeline.lib.store import SweepStore

logger = logging.getLogger(__name__)


class StorageResource(dg.ConfigurableResource):
    """The data directory: prompts, sweeps, images, exports, built models."""

    data_dir: str = "data"

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # The check the flexyface command runs (lib/settings.py); a run creates a missing folder.
        check_directory("FLEXYFACE_DATA_DIR", self.data_dir, must_exist=False)

    def store(self) -> SweepStore:
        return SweepStore(self.data_dir)


class ModelResource(dg.ConfigurableResource):
    """Loads engines and scorers by name and holds at most one model at a time.

    ``profile`` decides where weights come from: ``real`` (hub ids, the HF cache or local
    directories, below), ``tiny`` (small random-weight models of the same classes, built by the
    project under ``<data_dir>/models/tiny``) or ``random_full`` (full-size architectures with
    random weights, for benchmarks). Every profile loads through the same ``from_pretrained`` /
    checkpoint path.

    ``dtype`` and ``tf32`` are the generation engine's precision. Scoring has its own,
    ``scoring_dtype``: ``reference`` (each metric as its reference library computes it: CLIP and
    the aesthetic predictors in float32, HPS under float16 autocast on CUDA as hpsv2 does, float32
    on a CPU; TF32 off), ``bf16`` (bfloat16 autocast, TF32 on: the fast option), ``fp32`` or
    ``fp16``. Scoring sets torch's TF32 flags for its duration and restores them after.
    """

    storage: StorageResource
    profile: str = "real"
    device: str = "auto"
    dtype: str = "auto"
    tf32: bool = True  # generation only; scoring follows scoring_dtype
    scoring_dtype: str = "reference"
    offline: bool = False
    compile_unet: bool = False
    models_dir: str = ""  # where random-weight profiles are built; empty: <data_dir>/models
    # Images per diffusers call (same step count). 0: automatic, per image size: 1 on CPU, where
    # batching gains nothing (benchmarks/bench_generation.py: batch 4 was 17 % slower than 1 on the
    # tiny model); on CUDA what fits in half the free memory, at most 16 (Engine.batch_size_for).
    generation_batch_size: int = 0
    scoring_batch_size: int = 0  # images per scoring batch; 0: sized to the device (16 on CPU)
    realvis_xl_model: str = "SG161222/RealVisXL_V5.0"
    flux1_schnell_model: str = "black-forest-labs/FLUX.1-schnell"
    sd35_model: str = "stabilityai/stable-diffusion-3.5-large"
    hidream_model: str = "HiDream-ai/HiDream-I1-Full"
    hidream_llama_model: str = "meta-llama/Llama-3.1-8B-Instruct"  # HiDream-I1's text_encoder_4
    flux2_dev_model: str = "black-forest-labs/FLUX.2-dev"
    # "true": on CUDA, each model of an engine comes onto the GPU only for its own forward pass
    # (diffusers' enable_model_cpu_offload): less GPU memory, slower. No effect on a CPU. Text (an
    # EnvVar): true/false, 1/0, yes/no.
    cpu_offload: str = "false"
    clip_model: str = "openai/clip-vit-large-patch14"
    aesthetic_v1_model: str = "shunk031/aesthetics-predictor-v1-vit-large-patch14"
    aesthetic_v2_model: str = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    hps_v2_model: str = "xswu/HPSv2"
    # A Ray cluster for generation and scoring (lib/distributed.py): "auto", "ray://host:10001" or
    # "host:6379"; empty: models run in this process and Ray is never imported.
    ray_address: str = ""
    ray_gpus_per_scorer: str = "1"  # GPU share of one scorer worker (0.25: four per GPU); text: an EnvVar
    ray_actors: int = 0  # workers per stage at most; 0: one per GPU (one per CPU without GPUs)

    _runtime: Runtime | None = PrivateAttr(default=None)
    _backend: Any = PrivateAttr(default=None)
    _slot_key: str | None = PrivateAttr(default=None)
    _slot: Any = PrivateAttr(default=None)

    # -- lifecycle ---------------------------------------------------------------------------
    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release()

    def validate(self) -> None:
        """Check the settings without loading anything: the checks of ``lib/settings.py`` that the
        ``flexyface`` command also runs, each failure one line naming the setting."""
        if self.generation_batch_size < 0 or self.scoring_batch_size < 0:
            raise ValueError("generation_batch_size and scoring_batch_size must be >= 0 (0: automatic)")
        # With a Ray cluster the models run on its workers: this process needs no GPU, only the cluster.
        device = check_model_settings(self.settings())
        self._runtime = resolve_runtime("cpu", "fp32") if self.ray_address else resolve_runtime(device, self.dtype, self.tf32)
        if self.ray_address:
            from flexyface_pipeline.lib.distributed import connect

            connect(self.ray_address)  # one line naming FLEXYFACE_RAY_ADDRESS when Ray or the cluster is missing

    def settings(self) -> dict[str, Any]:
        """This resource's settings by the environment variable that sets each (lib/settings.py)."""
        return {name: getattr(self, field) for name, field in MODEL_SETTINGS.items()}

    def check_available(self, engines: list[str] | tuple[str, ...]) -> None:
        """With real weights and downloads off: the weights of ``engines`` and of every metric are on
        this machine (``SettingError`` naming the first missing one); nothing is loaded."""
        if self.profile != "real" or not self.is_offline:
            return
        locations = {key: self.configured_location(key) for key in LOCATION_SETTINGS.values()}
        check_weights_available(locations, engines, METRICS)

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self.validate()
        assert self._runtime is not None
        return self._runtime

    @property
    def offload(self) -> bool:
        """``cpu_offload`` as a boolean."""
        return check_boolean("FLEXYFACE_CPU_OFFLOAD", self.cpu_offload)

    @property
    def generation_batch(self) -> int | None:
        """Images per diffusers call, or None: the engine sizes batches to the device and image size."""
        return self.generation_batch_size or None

    @property
    def is_offline(self) -> bool:
        if self.profile != "real" or self.offline:
            return True
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)

    # -- locations ---------------------------------------------------------------------------
    def configured_location(self, key: str) -> str:
        return {
            "realvis_xl": self.realvis_xl_model,
            "flux1_schnell": self.flux1_schnell_model,
            "sd35": self.sd35_model,
            "hidream": self.hidream_model,
            "hidream_llama": self.hidream_llama_model,
            "flux2_dev": self.flux2_dev_model,
            "clip_score": self.clip_model,
            "aesthetic_score": self.aesthetic_v1_model,
            "aes_v2_score": self.aesthetic_v2_model,
            "hps_v2_score": self.hps_v2_model,
        }[key]

    def _built_location(self, key: str) -> Path:
        root = Path(self.models_dir) if self.models_dir else self.storage.store().models_dir
        return root / self.profile / key

    def location(self, key: str, builder: Any) -> str:
        """Where the weights for ``key`` are, building random-weight models on first use."""
        if self.profile == "real":
            return self.configured_location(key)
        target = self._built_location(key)
        if not (target / ".complete").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            # One builder at a time, also across processes; the others wait and load its result.
            with open(target.parent / f".{key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (target / ".complete").is_file():
                    self._build(key, builder, target)
        return str(target)

    def _build(self, key: str, builder: Any, target: Path) -> None:
        build = builder.build_tiny if self.profile == "tiny" else builder.build_random_full
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
        logger.info("building %s model %s under %s", self.profile, key, target)
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)  # an unfinished build
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @property
    def digests(self) -> DigestCache:
        """Weight hashes remembered between runs (data/cache/model_digests.json)."""
        return DigestCache(self.storage.store().root / "cache" / "model_digests.json")

    # -- the model slot ----------------------------------------------------------------------
    def _take(self, key: str, load: Any) -> Any:
        if self._slot_key == key and self._slot is not None:
            return self._slot
        self.release()
        self._slot = load()
        self._slot_key = key
        return self._slot

    def engine(self, name: str):
        """The generation engine ``name``, loaded (any other model is released first)."""
        from flexyface_pipeline.lib.engines import get_engine

        cls = get_engine(name)

        def load():
            location = self.location(name, cls)
            # Second weight locations (HiDream's Llama): configured ones for real weights; the
            # random-weight profiles build the whole pipeline in one directory.
            extra = {arg: self.configured_location(key) for arg, key in getattr(cls, "extra_locations", {}).items()
                     if self.profile == "real"}
            return cls.load(location, self.runtime, offline=self.is_offline, compile=self.compile_unet,
                            digests=self.digests, cpu_offload=self.offload, **extra)

        return self._take(f"engine:{name}", load)

    def engine_identity(self, name: str) -> ModelIdentity | None:
        """The identity of the weights the engine ``name`` would load, without loading (or building)
        them; None when it cannot be told here."""
        from flexyface_pipeline.lib.engines import get_engine

        if self.profile == "real":
            location = self.configured_location(name)
        else:
            target = self._built_location(name)
            if not (target / ".complete").is_file():
                return None
            location = str(target)
        return get_engine(name).identify_weights(location, digests=self.digests)

    def scoring_runtime(self, metric: str) -> Runtime:
        """Where and in which precision ``metric`` scores: the device of ``runtime``, the
        precision of ``scoring_dtype``."""
        from flexyface_pipeline.lib.metrics import get_scorer

        return scoring_runtime(get_scorer(metric), self.runtime.device, self.scoring_dtype)

    def scorer(self, metric: str):
        """The scorer for ``metric``, loaded (any other model is released first)."""
        from flexyface_pipeline.lib.metrics import get_scorer
        from flexyface_pipeline.lib.models.scorer_builders import scorer_builder

        cls = get_scorer(metric)

        def load():
            location = self.location(metric, scorer_builder(metric))
            return cls.load(location, self.scoring_runtime(metric), offline=self.is_offline, digests=self.digests)

        return self._take(f"scorer:{metric}", load)

    # -- a Ray cluster ------------------------------------------------------------------------
    def distributed(self):
        """The ``distributed.RayBackend`` that runs this step's models on the cluster at
        ``ray_address``, or None without one (models run in this process). ``release`` kills its
        workers."""
        if not self.ray_address:
            return None
        if self._backend is None:
            from flexyface_pipeline.lib.distributed import RayBackend, WorkerSettings

            settings = WorkerSettings(loader=worker_models, fields=self.worker_fields())
            self._backend = RayBackend(self.ray_address, settings, device=self.device,
                                       gpus_per_scorer=self.gpus_per_scorer, max_actors=self.ray_actors)
        return self._backend

    def distributed_metadata(self) -> dict[str, dg.MetadataValue]:
        """Metadata on what this step's Ray workers did, per worker (node, GPUs, images, images/s,
        busy and idle seconds, model load), and the batches that dying workers left to others.
        Call once, after ``release``, at the end of the step; empty without Ray."""
        if self._backend is None:
            return {}
        stages = self._backend.history
        workers = [{"stage": st["stage"], **w} for st in stages for w in st["workers"]]
        retried = [f"{st['stage']}: {b}" for st in stages for b in st["retried"]]
        self._backend.history.clear()  # reported once, by the step that ran them
        return {
            "ray_workers": dg.MetadataValue.json(workers),
            "ray_images_per_second": dg.MetadataValue.float(float(round(sum(w["images_per_second"] for w in workers), 4))),
            "ray_retried_batches": dg.MetadataValue.json(retried),
        }

    @property
    def gpus_per_scorer(self) -> float:
        """``ray_gpus_per_scorer`` as a number in (0, 1]."""
        return check_gpu_share(self.ray_gpus_per_scorer)

    def worker_fields(self) -> dict[str, Any]:
        """This resource's settings as plain values for a Ray worker's own loader
        (``worker_models``): every model setting, the data directory, no cluster address. A
        worker sees its GPU as ``cuda``."""
        fields = {name: getattr(self, name) for name in type(self).model_fields
                  if name != "storage" and not name.startswith("ray_")}
        if fields["device"].startswith("cuda:"):
            fields["device"] = "cuda"
        fields["data_dir"] = self.storage.data_dir
        return fields

    def release(self) -> None:
        """Drop the loaded model and return its memory (CUDA cache included); with a Ray
        cluster, end the step's workers."""
        if self._backend is not None:
            self._backend.release()
        if self._slot is not None:
            close = getattr(self._slot, "close", None)
            if callable(close):
                close()
            logger.info("released %s", self._slot_key)
        self._slot = None
        self._slot_key = None
        free_memory(self._runtime.device if self._runtime else None)

    @property
    def loaded(self) -> str | None:
        return self._slot_key


def worker_models(fields: dict[str, Any]) -> ModelResource:
    """The model loader of a Ray worker, from ``ModelResource.worker_fields``."""
    fields = dict(fields)
    storage = StorageResource(data_dir=fields.pop("data_dir"))
    models = ModelResource(storage=storage, **fields)
    models.validate()
    return models
