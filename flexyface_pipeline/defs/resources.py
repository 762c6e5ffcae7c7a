"""Resources: where data lives, and the one model slot that GPU assets share."""


import fcntl
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from flexyface_pipeline.lib.models.common import (
    PROFILES,
    DigestCache,
    check_location,
    ModelIdentity,
    Runtime,
    free_memory,
    resolve_runtime,
)
from flexyface_pipeline.lib.store import SweepStore

logger = logging.getLogger(__name__)


class StorageResource(dg.ConfigurableResource):
    """The data directory: prompts, sweeps, images, exports, built models."""

    data_dir: str = "data"

    def store(self) -> SweepStore:
        return SweepStore(self.data_dir)


class ModelResource(dg.ConfigurableResource):
    """Loads engines and scorers by name and holds at most one model at a time.

    ``profile`` decides where weights come from: ``real`` (hub ids, the HF cache or local
    directories, below), ``tiny`` (small random-weight models of the same classes, built by the
    project under ``<data_dir>/models/tiny``) or ``random_full`` (full-size architectures with
    random weights, for benchmarks). Every profile loads through the same ``from_pretrained`` /
    checkpoint path.
    """

    storage: StorageResource
    profile: str = "real"
    device: str = "auto"
    dtype: str = "auto"
    tf32: bool = True
    offline: bool = False
    compile_unet: bool = False
    models_dir: str = ""  # where random-weight profiles are built; empty: <data_dir>/models
    # Images per diffusers call (same step count). 0: automatic, per image size: 1 on CPU, where
    # batching gains nothing (benchmarks/bench_generation.py: batch 4 was 17 % slower than 1 on the
    # tiny model); on CUDA what fits in half the free memory, at most 16 (Engine.batch_size_for).
    generation_batch_size: int = 0
    scoring_batch_size: int = 0  # images per scoring batch; 0: sized to the device (16 on CPU)
    realvis_xl_model: str = "SG161222/RealVisXL_V5.0"
    clip_model: str = "openai/clip-vit-large-patch14"
    aesthetic_v1_model: str = "shunk031/aesthetics-predictor-v1-vit-large-patch14"
    aesthetic_v2_model: str = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
    hps_v2_model: str = "xswu/HPSv2"

    _runtime: Runtime | None = PrivateAttr(default=None)
    _slot_key: str | None = PrivateAttr(default=None)
    _slot: Any = PrivateAttr(default=None)

    # -- lifecycle ---------------------------------------------------------------------------
    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.release()

    def validate(self) -> None:
        """Check the settings without loading anything."""
        if self.profile not in PROFILES:
            raise ValueError(f"profile: expected one of {list(PROFILES)}, got {self.profile!r}")
        if self.generation_batch_size < 0 or self.scoring_batch_size < 0:
            raise ValueError("generation_batch_size and scoring_batch_size must be >= 0 (0: automatic)")
        self._runtime = resolve_runtime(self.device, self.dtype, self.tf32)
        if self.profile == "real":
            self.check_locations()

    def check_locations(self) -> None:
        """Every configured model location is a hub id or an existing path (MissingWeightsError
        naming the model and its setting otherwise), checked when a run starts."""
        from flexyface_pipeline.lib.engines import ENGINES
        from flexyface_pipeline.lib.metrics import SCORERS

        for key, cls in {**ENGINES, **SCORERS}.items():
            check_location(getattr(cls, "title", key), self.configured_location(key), cls.setting)

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            self.validate()
        assert self._runtime is not None
        return self._runtime

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
            return cls.load(location, self.runtime, offline=self.is_offline, compile=self.compile_unet,
                            digests=self.digests)

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

    def scorer(self, metric: str):
        """The scorer for ``metric``, loaded (any other model is released first)."""
        from flexyface_pipeline.lib.metrics import get_scorer

        cls = get_scorer(metric)

        def load():
            location = self.location(metric, cls)
            return cls.load(location, self.runtime, offline=self.is_offline, digests=self.digests)

        return self._take(f"scorer:{metric}", load)

    def release(self) -> None:
        """Drop the loaded model and return its memory (CUDA cache included)."""
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
