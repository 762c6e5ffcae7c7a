"""Images needed to get within a distance of the known Pareto front: adaptive vs Sobol vs random.

The objective is ``lib.tuning.SyntheticObjective`` (no model): quality is a known function of
steps and guidance plus per-image noise, time grows with steps, and its Pareto front (max quality,
min time) is known. After each round of ``--budget / --rounds`` images, a sweep's observed front
(settings no other observed setting beats on mean quality and mean time) is compared with the
true one: its distance is the mean quality gap of those settings below the front at equal time.
A design "reaches" the target at the first round whose distance is at most ``--target``; the
table gives the median over seeds of images needed (the budget + 1 round when never reached),
and the median distance at the full budget. All three designs run in the same process.

    .venv/bin/python benchmarks/bench_designs.py --seeds 10 --budget 240 --rounds 8 --target 0.01
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from flexyface_pipeline.lib.config import build_sweep_spec
from flexyface_pipeline.lib.sampling import sample_parameters
from flexyface_pipeline.lib.tuning import SyntheticObjective, grow, observed_front

PROMPTS = ["a", "b"]
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"


def distance(objective: SyntheticObjective, results: pd.DataFrame) -> float:
    front = observed_front(results)
    return float(objective.distance(front["steps"], front["guidance"]).mean())


def adaptive_curve(objective: SyntheticObjective, seed: int, budget: int, rounds: int) -> list[tuple[int, float]]:
    spec = build_sweep_spec(sweep=f"bench{seed}", num_images=budget, design="adaptive", rounds=rounds,
                            objective="clip_score", prompts=PROMPTS, prompts_dir=PROMPTS_DIR, base_seed=seed)
    storage = optuna.storages.InMemoryStorage()
    table, results, curve = None, None, []
    while True:
        table, step = grow(spec, table, results, storage)
        if step.done:
            return curve
        results = objective.evaluate(table, seed)
        curve.append((len(table), distance(objective, results)))


def sampled_curve(objective: SyntheticObjective, design: str, seed: int, budget: int,
                  rounds: int) -> list[tuple[int, float]]:
    """A random or Sobol sweep of the whole budget, read round by round (its first n rows)."""
    spec = build_sweep_spec(sweep=f"bench{seed}", num_images=budget, design=design, prompts=PROMPTS,
                            prompts_dir=PROMPTS_DIR, base_seed=seed)
    results = objective.evaluate(sample_parameters(spec), seed)
    step = budget // rounds
    return [(n, distance(objective, results.iloc[:n])) for n in range(step, budget + 1, step)]


def images_needed(curve: list[tuple[int, float]], target: float, budget: int, rounds: int) -> int:
    for n, d in curve:
        if d <= target:
            return n
    return budget + budget // rounds  # not reached within the budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.01, help="distance from the front to reach")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    objective = SyntheticObjective()
    needed: dict[str, list[int]] = {"adaptive": [], "sobol": [], "random": []}
    final: dict[str, list[float]] = {k: [] for k in needed}
    seconds: dict[str, float] = {k: 0.0 for k in needed}
    for seed in range(args.seeds):
        for design in needed:
            t0 = time.perf_counter()
            curve = (adaptive_curve(objective, seed, args.budget, args.rounds) if design == "adaptive"
                     else sampled_curve(objective, design, seed, args.budget, args.rounds))
            seconds[design] += time.perf_counter() - t0
            needed[design].append(images_needed(curve, args.target, args.budget, args.rounds))
            final[design].append(curve[-1][1])
    lines = [
        f"synthetic objective (g_best {objective.g_best}, s_peak {objective.s_peak}, noise {objective.noise}), "
        f"{len(PROMPTS)} prompts, budget {args.budget} images in {args.rounds} rounds, target distance "
        f"{args.target}, {args.seeds} seeds",
        "",
        "| design | median images to reach target | reached (seeds) | median distance at full budget | seconds (all seeds) |",
        "|---|---|---|---|---|",
    ]
    for design in needed:
        reached = sum(n <= args.budget for n in needed[design])
        lines.append(f"| {design} | {int(np.median(needed[design]))} | {reached}/{args.seeds} | "
                     f"{np.median(final[design]):.4f} | {seconds[design]:.1f} |")
    lines.append("")
    lines.append(f"(images to reach: {args.budget + args.budget // args.rounds} means not reached within the budget)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
