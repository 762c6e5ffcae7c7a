"""Pieces every model loader shares: runtime (device/dtype), weight locations, identity, errors."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from flexyface_pipeline.lib.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

T = TypeVar("T")

PROFILES = ("real", "tiny", "random_full")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class MissingWeightsError(RuntimeError):
    """Weights for a model cannot be found (offline, or a local path that does not exist)."""


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision models run. ``tf32``: whether float32 matrix products and
    convolutions may use TF32 (CUDA only; always False on a CPU)."""

    device: torch.device
    dtype: torch.dtype
    tf32: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def columns(self, prefix: str) -> dict[str, str | bool]:
        """Provenance columns of rows computed on this runtime: ``<prefix>_device``,
        ``<prefix>_dtype`` (the compute dtype: float32, bfloat16, float16) and ``<prefix>_tf32``."""
        return {f"{prefix}_device": str(self.device), f"{prefix}_dtype": str(self.dtype).removeprefix("torch."),
                f"{prefix}_tf32": bool(self.tf32 and self.is_cuda)}


@contextlib.contextmanager
def tf32_mode(runtime: Runtime) -> Iterator[None]:
    """Allow TF32 for float32 matrix products and convolutions exactly as ``runtime.tf32`` says
    (CUDA only), restoring torch's process-wide flags on exit."""
    if not runtime.is_cuda:
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = runtime.tf32
    torch.backends.cudnn.allow_tf32 = runtime.tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_runtime(device: str = "auto", dtype: str = "auto", tf32: bool = True) -> Runtime:
    """``auto`` picks CUDA when present; dtype ``auto`` is bf16 (fp16 without bf16) on GPU, fp32 on CPU."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {device!r}")
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype: expected auto, fp32, fp16 or bf16, got {dtype!r}")
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA device is available")
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.float32
    else:
        dt = _DTYPES[dtype]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return Runtime(device=dev, dtype=dt, tf32=bool(tf32 and dev.type == "cuda"))


def device_batch_size(runtime: Runtime, bytes_per_image: int, *, cpu: int, most: int) -> int:
    """Images per batch on ``runtime``: ``cpu`` on a CPU; on a CUDA device as many as fit in half
    of its free memory at ``bytes_per_image``, between 1 and ``most``."""
    if not runtime.is_cuda:
        return cpu
    free, _ = torch.cuda.mem_get_info(runtime.device)
    return int(max(1, min(most, free // 2 // max(1, bytes_per_image))))


def free_memory(device: torch.device | None = None) -> None:
    """Collect garbage and hand cached CUDA memory back, as between two metrics."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


_ALLOCATION_FAILURES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                        "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device ran out of memory: torch's allocator raises
    ``torch.OutOfMemoryError``; cuBLAS, cuDNN and kernel launches that fail to allocate outside
    it raise a plain ``RuntimeError`` that says so."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _ALLOCATION_FAILURES)


def fit_batch(call: Callable[[], T], size: int) -> tuple[bool, T | None]:
    """``(True, call())`` for a batch of ``size`` items, or ``(False, None)`` if the device ran
    out of memory on more than one item (the caller halves the batch). Any other error, and
    running out of memory on a single item, propagate. Returning, not raising, lets the failed
    call's tensors go with its traceback before the caller frees memory."""
    try:
        return True, call()
    except RuntimeError as exc:
        if size == 1 or not is_out_of_memory(exc):
            raise
    return False, None


def is_local(location: str) -> bool:
    return Path(location).expanduser().exists()


def check_location(model: str, location: str, setting: str) -> str:
    """Validate a model location before anything loads: an existing directory/file or a hub id."""
    if not location or not location.strip():
        raise MissingWeightsError(f"{model}: no model location configured (set {setting})")
    path = Path(location).expanduser()
    if path.exists():
        return str(path.resolve())
    if location.startswith((".", "/", "~")) or not _HUB_ID.match(location):
        raise MissingWeightsError(
            f"{model}: local path {location!r} does not exist; set {setting} to a directory holding the "
            "model's weights, or to a Hugging Face hub id"
        )
    return location


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a missing or unreachable checkpoint raises: huggingface_hub's HTTP, offline and
    not-cached errors are OSErrors, except ``EntryNotFoundError``."""
    from huggingface_hub.errors import EntryNotFoundError

    return (OSError, EntryNotFoundError)


def check_cached(model: str, location: str, setting: str) -> str:
    """Without loading or going online: ``location`` is an existing path, or a hub id whose snapshot is
    in the Hugging Face cache; MissingWeightsError naming ``setting`` otherwise. Returns the local path."""
    checked = check_location(model, location, setting)
    if is_local(checked):
        return checked
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(checked, local_files_only=True)
    except Exception as err:  # the hub raises several types for a missing snapshot
        raise missing_weights(model, location, setting, err) from err


def missing_weights(model: str, location: str, setting: str, cause: BaseException | None = None) -> MissingWeightsError:
    """The error users see when a hub id cannot be resolved offline."""
    extra = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    return MissingWeightsError(
        f"{model}: weights for {location!r} are not available offline{extra}. Download them once on a "
        f"machine with network access (hf download {location}) so they sit in the HF cache, "
        f"or point {setting} at a local directory with the weights."
    )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DigestCache:
    """SHA-256 digests remembered across runs in one JSON file, so unchanged weights are not hashed
    again at every load. A file's entry is keyed by its resolved path, size, inode and modification
    and change times (any write gives a new key); a digest derived from loaded weights is keyed by
    the identity of those weights. ``DigestCache(None)`` remembers nothing; an unreadable or
    unwritable file only costs the hashing."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, str] | None = None

    @staticmethod
    def file_key(path: Path) -> str:
        st = path.stat()
        return f"file|{path.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"

    def _read(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def get(self, key: str) -> str | None:
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(key)

    def put(self, entries: dict[str, str]) -> None:
        if not entries:
            return
        if self._entries is None:
            self._entries = self._read()
        self._entries.update(entries)
        if self.path is None:
            return
        merged = self._read() | self._entries  # keep what other processes added meanwhile
        try:
            atomic_write_bytes(self.path, json.dumps(merged, indent=1, sort_keys=True).encode())
        except OSError as err:
            logger.debug("cannot remember model digests in %s: %s", self.path, err)

    def remember(self, key: str, compute: Callable[[], str]) -> str:
        value = self.get(key)
        if value is None:
            value = compute()
            self.put({key: value})
        return value


def weights_digest(location: str, digests: DigestCache | None = None) -> str:
    """SHA-256 identity of a local checkpoint: the file's hash, or for a directory the hash of the
    sorted (relative path, file hash) list of its weight files. Files are hashed in parallel
    threads; ``digests`` remembers the hashes of unchanged files."""
    digests = digests or DigestCache(None)
    path = Path(location)
    root_is_file = path.is_file()
    files = [path] if root_is_file else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    keys = [DigestCache.file_key(f) for f in files]
    known = {key: digests.get(key) for key in keys}
    todo = [(f, key) for f, key in zip(files, keys) if known[key] is None]
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, len(todo)), thread_name_prefix="digest") as pool:
            hashed = dict(zip((key for _, key in todo), pool.map(sha256_file, (f for f, _ in todo))))
        digests.put(hashed)
        known |= hashed
    if root_is_file:
        return known[keys[0]]
    h = hashlib.sha256()
    for f, key in zip(files, keys):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(known[key].encode())
    return h.hexdigest()


def hub_revision(resolved_dir: str) -> str | None:
    """Commit hash of a snapshot in the Hugging Face cache (``.../snapshots/<hash>/``)."""
    parts = Path(resolved_dir).parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


@dataclass(frozen=True)
class ModelIdentity:
    """What a score row records about the model that produced it."""

    model_id: str  # hub id or local path
    revision: str  # hub commit hash, or sha256:<digest> of local weights

    def as_columns(self, prefix: str) -> dict[str, str]:
        return {f"{prefix}_model": self.model_id, f"{prefix}_model_revision": self.revision}

    def same_weights(self, model_id: str, revision: str) -> bool:
        """Whether a record of (``model_id``, ``revision``) names these weights. The revision is
        their content (a hub commit or the SHA-256 of the weight files), so the same weights at
        another path, or the clone moved, are the same model; only without a known revision does
        the location decide."""
        if self.revision != "unknown" and revision != "unknown":
            return revision == self.revision
        return (model_id, revision) == (self.model_id, self.revision)


def identify(location: str, resolved_path: str | None = None, digests: DigestCache | None = None) -> ModelIdentity:
    """Identity of a model loaded from ``location`` (hub id or local path)."""
    if is_local(location):
        return ModelIdentity(model_id=str(Path(location).resolve()),
                             revision="sha256:" + weights_digest(location, digests))
    rev = hub_revision(resolved_path) if resolved_path else None
    if rev is None and resolved_path and is_local(resolved_path):
        return ModelIdentity(model_id=location, revision="sha256:" + weights_digest(resolved_path, digests))
    return ModelIdentity(model_id=location, revision=rev or "unknown")
