"""Sweep specification: the validated, model-free description of one sweep.

Everything here runs before any model is loaded: a bad sweep fails with a ``SweepConfigError``
that names the offending field.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

STEPS_LIMITS = (4, 60)
DEFAULT_STEPS = (8, 48)
GUIDANCE_LIMITS = (0.5, 12.0)
DEFAULT_GUIDANCE = (1.0, 8.0)
RESOLUTION_LIMITS = (64, 2048)
MAX_IMAGES = 100_000
MAX_PROMPT_CHARS = 2_000

METRICS: tuple[str, ...] = ("clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score")

_SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_SWEEP_NAME = 64


class SweepConfigError(ValueError):
    """A sweep setting is invalid. ``field`` names the setting."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def validate_sweep_name(name: object) -> str:
    """Return ``name`` if it is usable as a sweep (partition) name and directory name."""
    if not isinstance(name, str) or not name.strip():
        raise SweepConfigError("sweep", "the sweep name is empty")
    if "\x00" in name:
        raise SweepConfigError("sweep", "the sweep name contains a NUL character")
    if len(name) > MAX_SWEEP_NAME:
        raise SweepConfigError("sweep", f"the sweep name is {len(name)} characters long (at most {MAX_SWEEP_NAME})")
    if "/" in name or "\\" in name or ".." in name or not _SWEEP_NAME.match(name):
        raise SweepConfigError(
            "sweep",
            f"{name!r} is not a valid sweep name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no path separators, no '..')",
        )
    return name


def validate_metrics(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise SweepConfigError("metrics", f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    if not names:
        raise SweepConfigError("metrics", "no metric selected")
    return tuple(dict.fromkeys(names))


def _check_range(name: str, lo: float, hi: float, limits: tuple[float, float]) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SweepConfigError(name, f"min and max must be finite numbers, got [{lo}, {hi}]")
    if lo > hi:
        raise SweepConfigError(name, f"the range is inverted: min {lo} > max {hi}")
    if lo < limits[0] or hi > limits[1]:
        raise SweepConfigError(name, f"[{lo}, {hi}] is outside the allowed range [{limits[0]}, {limits[1]}]")


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def resolve_prompts(prompt_files: list[str], prompts: list[str], prompts_dir: Path) -> list[str]:
    """Prompts from files under ``prompts_dir`` followed by inline prompts, duplicates removed."""
    out: list[str] = []
    root = prompts_dir.resolve()
    for name in prompt_files:
        candidate = (root / name).resolve()
        if root not in candidate.parents:
            raise SweepConfigError("prompt_files", f"{name!r} is not a file under {prompts_dir}")
        if not candidate.is_file():
            raise SweepConfigError("prompt_files", f"prompt file {name!r} not found under {prompts_dir}")
        from_file = read_prompt_file(candidate)
        if not from_file:
            raise SweepConfigError("prompt_files", f"prompt file {name!r} holds no prompt")
        out.extend(from_file)
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise SweepConfigError("prompts", f"inline prompt #{i} is empty")
        out.append(p.strip())
    out = list(dict.fromkeys(out))
    if not out:
        raise SweepConfigError("prompts", "no prompt given: set prompt_files and/or prompts")
    for p in out:
        if len(p) > MAX_PROMPT_CHARS:
            raise SweepConfigError("prompts", f"a prompt is {len(p)} characters long (at most {MAX_PROMPT_CHARS})")
    return out


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep. Build it with :func:`build_sweep_spec`."""

    sweep: str
    num_images: int
    steps_min: int
    steps_max: int
    guidance_min: float
    guidance_max: float
    width: int
    height: int
    prompts: tuple[str, ...]
    base_seed: int
    engine: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompts"] = list(self.prompts)
        return d


def build_sweep_spec(
    *,
    sweep: str,
    num_images: int,
    steps_min: int = DEFAULT_STEPS[0],
    steps_max: int = DEFAULT_STEPS[1],
    guidance_min: float = DEFAULT_GUIDANCE[0],
    guidance_max: float = DEFAULT_GUIDANCE[1],
    width: int = 512,
    height: int = 512,
    prompt_files: list[str] | tuple[str, ...] = (),
    prompts: list[str] | tuple[str, ...] = (),
    prompts_dir: Path,
    base_seed: int = 0,
    engine: str = "realvis_xl",
    known_engines: tuple[str, ...] | None = None,
) -> SweepSpec:
    """Validate every field and return a :class:`SweepSpec`. Raises :class:`SweepConfigError`."""
    validate_sweep_name(sweep)
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise SweepConfigError("num_images", f"must be a positive integer, got {num_images!r}")
    if num_images > MAX_IMAGES:
        raise SweepConfigError("num_images", f"{num_images} images is more than the {MAX_IMAGES} one sweep allows")
    for name, value in (("steps_min", steps_min), ("steps_max", steps_max)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SweepConfigError(name, f"must be an integer, got {value!r}")
    _check_range("steps", steps_min, steps_max, STEPS_LIMITS)
    _check_range("guidance", float(guidance_min), float(guidance_max), GUIDANCE_LIMITS)
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SweepConfigError(name, f"must be an integer, got {value!r}")
        if value % 8:
            raise SweepConfigError(name, f"{value} is not a multiple of 8")
        if not RESOLUTION_LIMITS[0] <= value <= RESOLUTION_LIMITS[1]:
            raise SweepConfigError(name, f"{value} is outside [{RESOLUTION_LIMITS[0]}, {RESOLUTION_LIMITS[1]}]")
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or not 0 <= base_seed < 2**63:
        raise SweepConfigError("base_seed", f"must be an integer in [0, 2**63), got {base_seed!r}")
    if known_engines is None:
        from flexyface_pipeline.lib.engines import ENGINES

        known_engines = tuple(ENGINES)
    if engine not in known_engines:
        raise SweepConfigError("engine", f"unknown engine {engine!r}; known: {list(known_engines)}")
    resolved = resolve_prompts(list(prompt_files), list(prompts), prompts_dir)
    return SweepSpec(
        sweep=sweep,
        num_images=num_images,
        steps_min=steps_min,
        steps_max=steps_max,
        guidance_min=float(guidance_min),
        guidance_max=float(guidance_max),
        width=width,
        height=height,
        prompts=tuple(resolved),
        base_seed=base_seed,
        engine=engine,
    )
