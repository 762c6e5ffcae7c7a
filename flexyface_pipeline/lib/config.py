"""Sweep specification: the validated, model-free description of one sweep.

Everything here runs before any model is loaded: a bad sweep fails with a ``SweepConfigError``
that names the offending field.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

STEPS_LIMITS = (4, 60)
DEFAULT_STEPS = (8, 48)
GUIDANCE_LIMITS = (0.5, 12.0)
DEFAULT_GUIDANCE = (1.0, 8.0)
RESOLUTION_LIMITS = (64, 2048)
MAX_IMAGES = 100_000
MAX_PROMPT_CHARS = 2_000

METRICS: tuple[str, ...] = ("clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score")

_SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # matched against the whole name (fullmatch)
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
    if "/" in name or "\\" in name or ".." in name or not _SWEEP_NAME.fullmatch(name):
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


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_prompt_file(path: Path, name: str | None = None) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped.

    The file must be UTF-8 text. A directory, a file that is not UTF-8 text (a binary file, or
    text in another encoding) or one that cannot be read raises :class:`SweepConfigError` naming
    the file (``name``, default its path), what is wrong and the fix.
    """
    label = repr(name if name is not None else str(path))
    fix = "save it as UTF-8 text, one prompt per line"
    if path.is_dir():
        raise SweepConfigError("prompt_files", f"prompt file {label} is a directory: name a text file with one "
                               "prompt per line")
    if not path.is_file():
        raise SweepConfigError("prompt_files", f"prompt file {label} is not a regular file: name a text file with "
                               "one prompt per line")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise SweepConfigError("prompt_files", f"prompt file {label} cannot be read (permission denied): "
                               f"make it readable, e.g. `chmod a+r {path}`") from None
    except OSError as err:
        raise SweepConfigError("prompt_files", f"prompt file {label} cannot be read "
                               f"({err.strerror or type(err).__name__}): check the file and its disk") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SweepConfigError("prompt_files", f"prompt file {label} is not UTF-8 text: byte 0x{data[err.start]:02x} "
                               f"at offset {err.start} (line {_line_of(data, err.start)}) is not valid UTF-8; "
                               f"{fix}") from None
    if "\x00" in text:
        offset = data.index(b"\x00")
        raise SweepConfigError("prompt_files", f"prompt file {label} is not text: it holds a NUL byte at offset "
                               f"{offset} (line {_line_of(data, offset)}); {fix}")
    lines = text.splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def resolve_prompts(prompt_files: list[str], prompts: list[str], prompts_dir: Path) -> list[str]:
    """Prompts from files under ``prompts_dir`` followed by inline prompts, duplicates removed."""
    out: list[str] = []
    root = prompts_dir.resolve()
    for name in prompt_files:
        candidate = (root / name).resolve()
        if root not in candidate.parents:
            raise SweepConfigError("prompt_files", f"{name!r} is not a file under {prompts_dir}")
        if not candidate.exists():
            raise SweepConfigError("prompt_files", f"prompt file {name!r} not found under {prompts_dir}")
        from_file = read_prompt_file(candidate, name)
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


TUNE_OBJECTIVES: tuple[str, ...] = ("combined", *METRICS)


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep. Build it with :func:`build_sweep_spec`.

    Fields added after the first release have defaults, so a ``sweep.json`` written before them
    still loads (:meth:`from_dict`). A range left ``None`` means "each engine's own default"
    (``Engine.default_steps`` / ``default_guidance``); a single-engine sweep stores the resolved
    numbers.
    """

    sweep: str
    num_images: int  # images per engine (the paired set every engine gets); adaptive: the budget
    steps_min: int | None
    steps_max: int | None
    guidance_min: float | None
    guidance_max: float | None
    width: int
    height: int
    prompts: tuple[str, ...]
    base_seed: int
    engine: str  # the first engine (sweeps stored before ``engines`` existed have only this)
    engines: tuple[str, ...] = ()  # every engine, paired: same prompts and seeds; () = (engine,)
    design: str = "random"  # a name of lib/designs.py DESIGNS
    steps_values: tuple[int, ...] = ()  # grid axis values
    guidance_values: tuple[float, ...] = ()  # grid axis values
    sizes: tuple[tuple[int, int], ...] = ()  # the size axis; () = ((width, height),)
    schedulers: tuple[str, ...] = ()  # the scheduler axis; () = each engine's own scheduler
    seeds_per_cell: int = 1  # grid: seeds per (prompt, cell), the same in every cell of a prompt
    rounds: int = 0  # adaptive: rounds of trials
    objective: str = ""  # adaptive: "combined" or a metric

    def __post_init__(self) -> None:
        if not self.engines:
            object.__setattr__(self, "engines", (self.engine,))

    @property
    def size_axis(self) -> tuple[tuple[int, int], ...]:
        return self.sizes or ((self.width, self.height),)

    @property
    def scheduler_axis(self) -> tuple[str | None, ...]:
        return self.schedulers or (None,)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("prompts", "engines", "steps_values", "guidance_values", "schedulers"):
            d[key] = list(d[key])
        d["sizes"] = [list(s) for s in self.sizes]
        return d

    @classmethod
    def from_dict(cls, stored: dict) -> SweepSpec:
        """A spec from ``to_dict``'s output (``sweep.json``), including files written before the
        later fields existed."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in stored.items() if k in known}
        for key in ("prompts", "engines", "steps_values", "guidance_values", "schedulers"):
            if key in d:
                d[key] = tuple(d[key])
        if "sizes" in d:
            d["sizes"] = tuple(tuple(int(x) for x in s) for s in d["sizes"])
        return cls(**d)


def parse_size(text: object) -> tuple[int, int]:
    """``"512x768"`` (or ``"512X768"``) as (width, height)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SweepConfigError("sizes", f"{text!r} is not a size: write WIDTHxHEIGHT, e.g. 512x768")
    return int(parts[0]), int(parts[1])


def parse_axis(name: str, texts: list[str], *, integer: bool) -> list:
    """Axis values from the command line: numbers, or ``START:STOP:COUNT`` (COUNT evenly spaced
    values from START to STOP, both included; steps rounded to integers, guidance to 0.01)."""
    values: list = []
    for text in texts:
        parts = str(text).split(":")
        try:
            if len(parts) == 3:
                start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
                if count < 1:
                    raise SweepConfigError(name, f"{text!r}: the count must be at least 1")
                points = [start] if count == 1 else list(np.linspace(start, stop, count))
                values += [int(round(p)) if integer else round(float(p), 2) for p in points]
            elif len(parts) == 1:
                number = float(text)
                if integer and number != int(number):
                    raise SweepConfigError(name, f"{text!r} is not a whole number")
                values.append(int(number) if integer else number)
            else:
                raise ValueError(text)
        except ValueError:
            raise SweepConfigError(name, f"{text!r} is neither a number nor START:STOP:COUNT") from None
    return values


def _whole(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepConfigError(name, f"must be an integer, got {value!r}")
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepConfigError(name, f"must be a number, got {value!r}")
    return float(value)


def _engine_classes(engines: list[str], engine_classes: dict | None, field_name: str) -> dict:
    if engine_classes is None:
        from flexyface_pipeline.lib.engines import ENGINES

        engine_classes = ENGINES
    if not engines:
        raise SweepConfigError("engines", f"no engine selected; known: {list(engine_classes)}")
    for name in engines:
        if not isinstance(name, str) or name not in engine_classes:
            raise SweepConfigError(field_name, f"unknown engine {name!r}; known: {list(engine_classes)}")
    duplicates = sorted({e for e in engines if engines.count(e) > 1})
    if duplicates:
        raise SweepConfigError("engines", f"engine(s) {duplicates} selected more than once")
    return {name: engine_classes[name] for name in engines}


def _check_values(name: str, values: list, limits_of: dict[str, tuple[float, float]], integer: bool) -> tuple:
    """Axis values: not empty, no duplicates, each within every engine's limits."""
    if not values:
        raise SweepConfigError(name, "the axis is empty: give at least one value")
    out = tuple(_whole(name, v) if integer else _number(name, v) for v in values)
    if not integer and not all(math.isfinite(v) for v in out):
        raise SweepConfigError(name, f"values must be finite numbers, got {list(values)}")
    dupes = sorted({v for v in out if out.count(v) > 1})
    if dupes:
        raise SweepConfigError(name, f"duplicate value(s) {dupes}: give each value once")
    for engine, (lo, hi) in limits_of.items():
        outside = [v for v in out if not lo <= v <= hi]
        if outside:
            raise SweepConfigError(name, f"value(s) {outside} are outside engine {engine}'s range [{lo}, {hi}]")
    return tuple(sorted(out))


def _check_engine_range(name: str, lo: float, hi: float, limits_of: dict[str, tuple[float, float]]) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SweepConfigError(name, f"min and max must be finite numbers, got [{lo}, {hi}]")
    if lo > hi:
        raise SweepConfigError(name, f"the range is inverted: min {lo} > max {hi}")
    for engine, limits in limits_of.items():
        if lo < limits[0] or hi > limits[1]:
            raise SweepConfigError(
                name, f"[{lo}, {hi}] is outside the allowed range [{limits[0]}, {limits[1]}] of engine {engine}")


def _check_size(name: str, value: object, classes: dict) -> int:
    value = _whole(name, value)
    for engine, cls in classes.items():
        multiple = int(getattr(cls, "size_multiple", 8))
        if value % multiple:
            raise SweepConfigError(name, f"{value} is not a multiple of {multiple} (engine {engine})")
    if not RESOLUTION_LIMITS[0] <= value <= RESOLUTION_LIMITS[1]:
        raise SweepConfigError(name, f"{value} is outside [{RESOLUTION_LIMITS[0]}, {RESOLUTION_LIMITS[1]}]")
    return value


def _pair(name: str, lo: object, hi: object, default: tuple | None) -> tuple[object, object] | None:
    """A given range; a missing end comes from ``default`` (the single engine's default range)."""
    if lo is None and hi is None:
        return None
    if lo is None or hi is None:
        if default is None:
            raise SweepConfigError(name, f"give both min and max (or neither: each engine's default), got [{lo}, {hi}]")
        lo = default[0] if lo is None else lo
        hi = default[1] if hi is None else hi
    return lo, hi


def build_sweep_spec(
    *,
    sweep: str,
    num_images: int | None,
    steps_min: int | None = None,
    steps_max: int | None = None,
    guidance_min: float | None = None,
    guidance_max: float | None = None,
    width: int = 512,
    height: int = 512,
    prompt_files: list[str] | tuple[str, ...] = (),
    prompts: list[str] | tuple[str, ...] = (),
    prompts_dir: Path,
    base_seed: int = 0,
    engine: str | None = None,
    engines: list[str] | tuple[str, ...] = (),
    design: str = "random",
    steps_values: list[int] | tuple[int, ...] = (),
    guidance_values: list[float] | tuple[float, ...] = (),
    sizes: list | tuple = (),
    schedulers: list[str] | tuple[str, ...] = (),
    seeds_per_cell: int = 1,
    rounds: int = 0,
    objective: str = "",
    known_engines: tuple[str, ...] | None = None,
    engine_classes: dict | None = None,
) -> SweepSpec:
    """Validate every field and return a :class:`SweepSpec`. Raises :class:`SweepConfigError`.

    ``engines`` (or the single ``engine``; default ``realvis_xl``) are checked one by one: a
    given steps or guidance range must fit each engine's limits, an engine without guidance
    takes no guidance value, sizes must be multiples of each engine's ``size_multiple``,
    scheduler names must be known to each engine.
    """
    from flexyface_pipeline.lib.designs import get_design

    validate_sweep_name(sweep)
    try:
        design_obj = get_design(design)
    except ValueError as err:
        raise SweepConfigError("design", str(err)) from None
    selected = list(engines) if engines else [engine or "realvis_xl"]
    if engines and engine is not None and engine != selected[0]:
        raise SweepConfigError("engine", f"give engines or engine, not both (engine {engine!r}, engines {selected})")
    if known_engines is not None and engine_classes is None:
        from flexyface_pipeline.lib.engines import ENGINES

        engine_classes = {k: v for k, v in ENGINES.items() if k in known_engines}
    classes = _engine_classes(selected, engine_classes, "engines" if len(selected) > 1 else "engine")
    guided = {n: c for n, c in classes.items() if getattr(c, "guidance_kind", "cfg") != "none"}

    # Sizes: an axis of (width, height) pairs, or the single width × height.
    size_axis: list[tuple[int, int]] = []
    for i, size in enumerate(sizes):
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise SweepConfigError("sizes", f"size #{i} must be [width, height], got {size!r}")
        size_axis.append((_check_size("width", size[0], classes), _check_size("height", size[1], classes)))
    if size_axis:
        dupes = sorted({s for s in size_axis if size_axis.count(s) > 1})
        if dupes:
            raise SweepConfigError("sizes", f"duplicate size(s) {[f'{w}x{h}' for w, h in dupes]}: give each size once")
        width, height = size_axis[0]
        stored_sizes = tuple(size_axis) if len(size_axis) > 1 else ()
    else:
        width, height = _check_size("width", width, classes), _check_size("height", height, classes)
        stored_sizes = ()

    # Schedulers: names every selected engine knows.
    sched = list(schedulers)
    for name in sched:
        for engine_name, cls in classes.items():
            known = list(getattr(cls, "schedulers", {}) or {})
            if name not in known:
                raise SweepConfigError(
                    "schedulers",
                    f"unknown scheduler {name!r} for engine {engine_name}; known: {known or '(none: only its default)'}")
    dupes = sorted({s for s in sched if sched.count(s) > 1})
    if dupes:
        raise SweepConfigError("schedulers", f"duplicate scheduler(s) {dupes}: give each once")

    single = next(iter(classes.values())) if len(classes) == 1 else None
    steps_pair = _pair("steps", steps_min, steps_max, single.default_steps if single else None)
    guidance_pair = _pair("guidance", guidance_min, guidance_max,
                          single.default_guidance if single and guided else None)
    steps_vals: tuple[int, ...] = ()
    guidance_vals: tuple[float, ...] = ()
    if design_obj.axis_values:
        if steps_pair is not None or guidance_pair is not None:
            raise SweepConfigError("design", f"the {design} design takes axis values (steps_values, guidance_values), "
                                   "not min/max ranges")
        steps_vals = _check_values("steps_values", list(steps_values),
                                   {n: tuple(c.steps_limits) for n, c in classes.items()}, integer=True)
        if guided:
            guidance_vals = _check_values("guidance_values", list(guidance_values),
                                          {n: tuple(c.guidance_limits) for n, c in guided.items()}, integer=False)
        elif guidance_values:
            raise SweepConfigError("guidance_values", f"engine {selected[0]} takes no guidance "
                                   f"(guidance_kind 'none'); leave the guidance axis out")
        if isinstance(seeds_per_cell, bool) or not isinstance(seeds_per_cell, int) or seeds_per_cell < 1:
            raise SweepConfigError("seeds_per_cell", f"must be a positive integer, got {seeds_per_cell!r}")
        steps_min = steps_max = guidance_min = guidance_max = None
    else:
        if steps_values or guidance_values:
            raise SweepConfigError("steps_values", f"axis values are for the grid design; the {design} design "
                                   "takes min/max ranges")
        if seeds_per_cell != 1:
            raise SweepConfigError("seeds_per_cell", f"is for the grid design, not {design}")
        if steps_pair is not None:
            lo, hi = (_whole("steps_min", steps_pair[0]), _whole("steps_max", steps_pair[1]))
            _check_engine_range("steps", lo, hi, {n: tuple(c.steps_limits) for n, c in classes.items()})
            steps_min, steps_max = lo, hi
        elif len(classes) == 1:
            steps_min, steps_max = tuple(next(iter(classes.values())).default_steps)
        if guidance_pair is not None:
            if not guided:
                raise SweepConfigError("guidance", f"engine {selected[0]} takes no guidance (guidance_kind 'none'); "
                                       "leave the guidance range out")
            lo_f, hi_f = _number("guidance_min", guidance_pair[0]), _number("guidance_max", guidance_pair[1])
            _check_engine_range("guidance", lo_f, hi_f, {n: tuple(c.guidance_limits) for n, c in guided.items()})
            guidance_min, guidance_max = lo_f, hi_f
        elif len(classes) == 1 and guided:
            guidance_min, guidance_max = (float(x) for x in next(iter(guided.values())).default_guidance)
        else:
            guidance_min = guidance_max = None

    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or not 0 <= base_seed < 2**63:
        raise SweepConfigError("base_seed", f"must be an integer in [0, 2**63), got {base_seed!r}")
    resolved = resolve_prompts(list(prompt_files), list(prompts), prompts_dir)

    if design_obj.axis_values:
        cells = len(steps_vals) * max(1, len(guidance_vals)) * len(size_axis or [0]) * len(sched or [None])
        derived = cells * len(resolved) * seeds_per_cell
        if num_images is not None and num_images != derived:
            raise SweepConfigError(
                "num_images", f"the grid has {derived} images per engine ({cells} cells x {len(resolved)} prompts x "
                f"{seeds_per_cell} seeds); leave num_images out or set it to {derived}")
        num_images = derived
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise SweepConfigError("num_images", f"must be a positive integer, got {num_images!r}")
    if num_images * len(classes) > MAX_IMAGES:
        raise SweepConfigError("num_images", f"{num_images * len(classes)} images is more than the {MAX_IMAGES} "
                               "one sweep allows")
    if design_obj.adaptive:
        if len(classes) != 1:
            raise SweepConfigError("engines", f"an adaptive sweep tunes one engine, got {selected}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise SweepConfigError("rounds", f"must be a positive integer, got {rounds!r}")
        if objective not in TUNE_OBJECTIVES:
            raise SweepConfigError("objective", f"unknown objective {objective!r}; known: {list(TUNE_OBJECTIVES)}")
        per_round = num_images // rounds
        if per_round < len(resolved):
            raise SweepConfigError(
                "num_images", f"a budget of {num_images} images over {rounds} rounds is {per_round} per round, less than "
                f"one round (one trial needs an image per prompt: {len(resolved)}); raise the budget or lower the rounds")
    elif rounds or objective:
        raise SweepConfigError("rounds", f"rounds and objective are for the adaptive design, not {design}")
    return SweepSpec(
        sweep=sweep,
        num_images=num_images,
        steps_min=steps_min,
        steps_max=steps_max,
        guidance_min=None if guidance_min is None else float(guidance_min),
        guidance_max=None if guidance_max is None else float(guidance_max),
        width=width,
        height=height,
        prompts=tuple(resolved),
        base_seed=base_seed,
        engine=selected[0],
        engines=tuple(selected),
        design=design,
        steps_values=steps_vals,
        guidance_values=guidance_vals,
        sizes=stored_sizes,
        schedulers=tuple(sched),
        seeds_per_cell=seeds_per_cell,
        rounds=rounds,
        objective=objective,
    )
