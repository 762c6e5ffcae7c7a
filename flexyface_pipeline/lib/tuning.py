"""Adaptive sweeps: an Optuna study proposes each round's settings from every score so far.

A tuned sweep is an ordinary sweep whose rows grow round by round. One *trial* is one setting
(steps, guidance, and the scheduler / size where the sweep has those axes) generated once per
prompt, each image with its own seed; its values are the mean quality of its images (maximised)
and their mean ``elapsed_ms`` (minimised). Quality is the sweep's ``objective``: ``combined``, the
mean of every metric's within-prompt z-score (z computed over all scored rows of the sweep), or the
mean of one metric.

Each round: trials whose images are all scored are told their values (once), then — when no trial
is still waiting for scores — the next round's trials are asked and their rows appended. Image ids
only grow, so earlier images are never generated again. The study lives in an RDB storage (the
Dagster instance's database: ``optuna.db`` beside a SQLite instance, the same PostgreSQL server
otherwise), so a killed run continues where it stopped: trials asked but never written get their
rows on the next round, trials told are never repeated.

No Dagster here: ``defs/assets/sweep.py`` calls :func:`grow` from ``sweep_parameters``,
``defs/tuning.py`` requests the rounds, and :func:`run_tuning` runs the same loop in-process
with any ``evaluate`` function (tests, benchmarks).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.config import METRICS, SweepSpec
from flexyface_pipeline.lib.designs import MAX_SEED, guidance_range, steps_range
from flexyface_pipeline.lib.sampling import image_id, parameter_columns

logger = logging.getLogger(__name__)

TRIAL_COLUMN = "trial"
STUDY_FILE = "optuna.db"


def study_name(sweep: str) -> str:
    return f"flexyface-{sweep}"


def sqlite_url(directory: str | Path) -> str:
    """The study database beside a SQLite Dagster instance: ``<directory>/optuna.db``."""
    return f"sqlite:///{Path(directory).expanduser().resolve() / STUDY_FILE}"


def postgres_url(settings: Mapping[str, str]) -> str:
    """The PostgreSQL server of the Dagster instance, from the ``FLEXYFACE_PG_*`` settings."""
    from sqlalchemy.engine import URL

    missing = [k for k in ("FLEXYFACE_PG_HOST", "FLEXYFACE_PG_USER", "FLEXYFACE_PG_DB") if not settings.get(k)]
    if missing:
        raise ValueError(f"the tuning study needs {', '.join(missing)} (the instance's PostgreSQL settings)")
    url = URL.create(
        "postgresql+psycopg2",
        username=settings["FLEXYFACE_PG_USER"],
        password=settings.get("FLEXYFACE_PG_PASSWORD") or None,
        host=settings["FLEXYFACE_PG_HOST"],
        port=int(settings.get("FLEXYFACE_PG_PORT") or 5432),
        database=settings["FLEXYFACE_PG_DB"],
    )
    return url.render_as_string(hide_password=False)


def round_sizes(spec: SweepSpec) -> list[int]:
    """Trials per round: the budget's trials (``num_images // prompts``) spread over the rounds."""
    total = spec.num_images // len(spec.prompts)
    bounds = [total * i // spec.rounds for i in range(spec.rounds + 1)]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


def trial_values(results: pd.DataFrame, objective: str) -> pd.DataFrame:
    """Per trial: ``quality`` (to maximise), ``elapsed_ms`` (to minimise) and ``complete``
    (every image of the trial has every needed value). ``results`` has columns trial, prompt,
    elapsed_ms and the metrics."""
    metrics = list(METRICS) if objective == "combined" else [objective]
    df = results.copy()
    needed = [*metrics, "elapsed_ms"]
    for column in needed:
        if column not in df:
            df[column] = np.nan
        df[column] = pd.to_numeric(df[column], errors="coerce")
    scored = np.isfinite(df[needed].to_numpy(dtype=float)).all(axis=1)
    df["_scored"] = scored
    if objective == "combined":
        z = []
        for metric in metrics:
            values = df[metric].where(scored)
            grouped = values.groupby(df["prompt"])
            std = grouped.transform("std").replace(0.0, np.nan)
            z.append(((values - grouped.transform("mean")) / std).fillna(0.0).where(scored))
        df["_quality"] = pd.concat(z, axis=1).mean(axis=1)
    else:
        df["_quality"] = df[metrics[0]].where(scored)
    out = df.groupby(TRIAL_COLUMN).agg(quality=("_quality", "mean"), elapsed_ms=("elapsed_ms", "mean"),
                                       complete=("_scored", "all"))
    return out


@dataclass
class Round:
    rows: pd.DataFrame  # rows to append (empty: nothing new)
    told: int  # trials told their values in this call
    asked: int  # trials newly asked in this call
    done: bool  # the budget is spent and every trial told


class Tuner:
    """The study of one adaptive sweep, in ``storage`` (an RDB URL or an optuna storage)."""

    def __init__(self, spec: SweepSpec, storage: object, engine_class: type | None = None) -> None:
        import optuna

        if engine_class is None:
            from flexyface_pipeline.lib.engines import get_engine

            engine_class = get_engine(spec.engine)
        self.spec = spec
        self.engine_class = engine_class
        self.sizes = round_sizes(spec)
        self.total = sum(self.sizes)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=spec.base_seed, n_startup_trials=self.sizes[0],
                                             multivariate=True, constant_liar=True)
        self.study = optuna.create_study(storage=storage, study_name=study_name(spec.sweep), sampler=sampler,
                                         directions=["maximize", "minimize"], load_if_exists=True)

    # -- the search space ------------------------------------------------------------------
    def distributions(self) -> dict:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        lo, hi = steps_range(self.spec, self.engine_class)
        space: dict = {"steps": IntDistribution(lo, hi)}
        g_range = guidance_range(self.spec, self.engine_class)
        if g_range is not None:
            space["guidance"] = FloatDistribution(g_range[0], g_range[1], step=0.01)
        if self.spec.schedulers:
            space["scheduler"] = CategoricalDistribution(list(self.spec.schedulers))
        if self.spec.sizes:
            space["size"] = CategoricalDistribution([f"{w}x{h}" for w, h in self.spec.sizes])
        return space

    def _seeds(self, trial: int) -> np.ndarray:
        """One seed per prompt, from the sweep's seed, name and the trial number."""
        key = int.from_bytes(hashlib.sha256(self.spec.sweep.encode("utf-8")).digest()[:8], "little")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.spec.base_seed, key, 1, trial])))
        return rng.integers(0, MAX_SEED, size=len(self.spec.prompts), dtype=np.int64)

    def trial_rows(self, trial: int, params: Mapping, start: int) -> pd.DataFrame:
        """The images of one trial: one per prompt, numbered from ``start``."""
        n = len(self.spec.prompts)
        width, height = self.spec.width, self.spec.height
        if "size" in params:
            width, height = (int(x) for x in str(params["size"]).split("x"))
        df = pd.DataFrame({
            "image_id": [image_id(self.spec.sweep, start + i) for i in range(n)],
            "sweep": self.spec.sweep,
            "index": np.arange(start, start + n, dtype=np.int64),
            "prompt": list(self.spec.prompts),
            "prompt_index": np.arange(n, dtype=np.int64),
            "steps": np.full(n, int(params["steps"]), dtype=np.int64),
            "guidance": np.full(n, round(float(params["guidance"]), 2) if "guidance" in params else np.nan),
            "seed": self._seeds(trial),
            "width": np.full(n, width, dtype=np.int64),
            "height": np.full(n, height, dtype=np.int64),
            "engine": self.spec.engine,
        })
        if self.spec.schedulers:
            df["scheduler"] = str(params["scheduler"])
        df[TRIAL_COLUMN] = np.int64(trial)
        return df[columns(self.spec)]

    # -- a round ---------------------------------------------------------------------------
    def _trials(self, *states) -> list:
        return self.study.get_trials(deepcopy=False, states=states)

    def tell(self, results: pd.DataFrame) -> int:
        """Tell every waiting trial whose images are all scored; returns how many were told."""
        from optuna.trial import TrialState

        if results.empty:
            return 0
        values = trial_values(results, self.spec.objective)
        counts = results.groupby(TRIAL_COLUMN).size()
        told = 0
        for trial in self._trials(TrialState.RUNNING):
            n = trial.number
            if n not in values.index or counts.get(n, 0) < len(self.spec.prompts) or not values.at[n, "complete"]:
                continue
            quality, elapsed = float(values.at[n, "quality"]), float(values.at[n, "elapsed_ms"])
            if np.isfinite(quality) and np.isfinite(elapsed):
                self.study.tell(n, [quality, elapsed], skip_if_finished=True)
            else:
                self.study.tell(n, state=TrialState.FAIL, skip_if_finished=True)
            told += 1
        return told

    def finished(self) -> int:
        from optuna.trial import TrialState

        return len(self._trials(TrialState.COMPLETE, TrialState.FAIL))

    def next_round(self, table: pd.DataFrame, results: pd.DataFrame) -> Round:
        """Tell what is scored, then the rows to append: those of asked trials that have none
        yet (a run stopped between asking and writing), else the next round's trials, else none
        (a round is still waiting for scores, or the budget is spent)."""
        from optuna.trial import TrialState

        told = self.tell(results)
        have = set(table[TRIAL_COLUMN].astype(int)) if TRIAL_COLUMN in table and len(table) else set()
        start = len(table)
        running = self._trials(TrialState.RUNNING)
        new_rows, asked = [], 0
        if running:
            for trial in running:
                if trial.number not in have:
                    new_rows.append(self.trial_rows(trial.number, trial.params, start))
                    start += len(new_rows[-1])
        else:
            finished = self.finished()
            cumulative = np.cumsum(self.sizes)
            later = cumulative[cumulative > finished]
            if len(later):
                space = self.distributions()
                for _ in range(int(later[0] - finished)):
                    trial = self.study.ask(space)
                    asked += 1
                    new_rows.append(self.trial_rows(trial.number, trial.params, start))
                    start += len(new_rows[-1])
        rows = pd.concat(new_rows, ignore_index=True) if new_rows else empty_table(self.spec)
        done = not running and not asked and self.finished() >= self.total
        return Round(rows=rows, told=told, asked=asked, done=done)

    def best(self) -> list:
        """The Pareto-optimal trials so far."""
        return self.study.best_trials


def columns(spec: SweepSpec) -> list[str]:
    return [*parameter_columns(spec), TRIAL_COLUMN]


def empty_table(spec: SweepSpec) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("index", "prompt_index", "steps", "seed", "width",
                                                           "height", TRIAL_COLUMN) else
                                      "float64" if c == "guidance" else "object") for c in columns(spec)})


def grow(spec: SweepSpec, table: pd.DataFrame | None, results: pd.DataFrame | None, storage: object,
         engine_class: type | None = None) -> tuple[pd.DataFrame, Round]:
    """One round for ``sweep_parameters``: the sweep's table with the new rows appended."""
    table = empty_table(spec) if table is None else table
    results = pd.DataFrame() if results is None else results
    step = Tuner(spec, storage, engine_class).next_round(table, results)
    grown = pd.concat([table, step.rows], ignore_index=True) if len(step.rows) else table
    return grown, step


def run_tuning(spec: SweepSpec, storage: object, evaluate: Callable[[pd.DataFrame], pd.DataFrame], *,
               engine_class: type | None = None, table: pd.DataFrame | None = None,
               max_rounds: int | None = None) -> pd.DataFrame:
    """The tuning loop in-process: grow, ``evaluate`` (rows → results with trial, prompt,
    elapsed_ms and the metrics), until the budget is spent or ``max_rounds`` rounds ran.
    ``table`` continues an earlier run's rows. Returns the sweep's rows."""
    table = empty_table(spec) if table is None else table
    results = evaluate(table) if len(table) else pd.DataFrame()
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        table, step = grow(spec, table, results, storage, engine_class)
        if step.done:
            break
        if len(step.rows) == 0 and not step.told:
            raise RuntimeError("tuning made no progress: a trial's rows are not scored")
        results = evaluate(table)
        rounds += 1
    return table


@dataclass(frozen=True)
class SyntheticObjective:
    """A known objective for checking tuners without models: quality is a smooth function of
    steps and guidance (best guidance ``g_best``; quality rises with steps up to ``s_peak`` and
    falls slowly after it) plus per-image noise; ``elapsed_ms`` grows with steps. Its Pareto front
    (max quality, min time) is every step count up to ``s_peak`` at ``g_best``."""

    g_best: float = 5.5
    s_peak: int = 30
    noise: float = 0.05
    ms_per_step: float = 20.0

    def quality(self, steps, guidance) -> np.ndarray:
        s = np.asarray(steps, dtype=float)
        g = np.asarray(guidance, dtype=float)
        rise = 1.0 - np.exp(-np.minimum(s, self.s_peak) / 10.0)
        fall = 0.004 * np.maximum(s - self.s_peak, 0.0)
        return rise - fall - 0.02 * (g - self.g_best) ** 2

    def distance(self, steps, guidance) -> np.ndarray:
        """How far below the front a setting lies: the best quality reachable in no more time,
        minus its quality (0 on the front)."""
        s = np.asarray(steps, dtype=float)
        return self.quality(np.minimum(s, self.s_peak), self.g_best) - self.quality(s, guidance)

    def evaluate(self, table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
        """Scores of every row: the same noise for the same image id and seed."""
        out = table.copy()
        rng_of = [np.random.default_rng([seed, int(s) % MAX_SEED, int(i)]) for s, i in zip(table["seed"], table["index"])]
        noise = np.array([r.normal() for r in rng_of]) * self.noise
        quality = self.quality(table["steps"], table["guidance"]) + noise
        for metric in METRICS:
            out[metric] = quality
        out["elapsed_ms"] = self.ms_per_step * table["steps"].to_numpy(dtype=float)
        return out


def observed_front(results: pd.DataFrame, by: str = TRIAL_COLUMN, quality: str = "clip_score") -> pd.DataFrame:
    """The settings no other setting beats on both mean quality and mean time (observed values)."""
    keys = [by] if by in results else ["index"]
    means = results.groupby(keys).agg(steps=("steps", "first"), guidance=("guidance", "first"),
                                      q=(quality, "mean"), t=("elapsed_ms", "mean")).reset_index(drop=True)
    keep = [not ((means["q"] >= r.q) & (means["t"] <= r.t) & ((means["q"] > r.q) | (means["t"] < r.t))).any()
            for r in means.itertuples()]
    return means[keep]
