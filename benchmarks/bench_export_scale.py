"""Merge + export of many result rows: ours vs the seed's way (a SQL table exported with ORDER BY).

    .venv/bin/python benchmarks/bench_export_scale.py --rows 1000000 --sweeps 500

Ours: per-sweep parameter/image/score tables (as the assets write them) → merge_tables → finalize →
Parquet + CSV. Baseline, same process and data: the rows in one SQLite table, exported with the
seed's `SELECT ... WHERE all scores NOT NULL ORDER BY steps, guidance` to CSV. Each side runs in a
fresh subprocess so peak memory (max RSS) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.config import METRICS
from flexyface_pipeline.lib.export import SCORE_TABLES, finalize, merge_tables, write_export


def synthesize(rows: int, sweeps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    per = np.full(sweeps, rows // sweeps)
    per[: rows % sweeps] += 1
    for s, n in enumerate(per):
        name = f"sweep-{s:04d}"
        ids = [f"{name}-{i:05d}" for i in range(n)]
        params = pd.DataFrame({
            "image_id": ids, "sweep": name, "index": np.arange(n), "prompt": rng.choice(["a", "b", "c"], n),
            "prompt_index": 0, "steps": rng.integers(4, 61, n), "guidance": np.round(rng.uniform(0.5, 12, n), 2),
            "seed": rng.integers(0, 2**31, n), "width": 512, "height": 512, "engine": "realvis_xl",
        })
        images = pd.DataFrame({
            "image_id": ids, "image_path": [f"images/{name}/{i}.png" for i in ids], "elapsed_ms": rng.uniform(500, 9000, n),
            "batch_size": 4, "engine_model": "SG161222/RealVisXL_V5.0", "engine_model_revision": "abc",
        })
        scores = {}
        for metric, (_, prefix) in SCORE_TABLES.items():
            scores[metric] = pd.DataFrame({"image_id": ids, metric: rng.uniform(0, 1, n),
                                           f"{prefix}_model": "m", f"{prefix}_model_revision": "r"})
        yield params, images, scores


def run_ours(rows: int, sweeps: int, out: Path) -> dict:
    data = list(synthesize(rows, sweeps))
    t0 = time.perf_counter()
    params = pd.concat([p for p, _, _ in data], ignore_index=True)
    images = pd.concat([i for _, i, _ in data], ignore_index=True)
    scores = {m: pd.concat([s[m] for _, _, s in data], ignore_index=True) for m in SCORE_TABLES}
    df = finalize([merge_tables(params, images, scores)])
    write_export(df, out)
    return {"seconds": time.perf_counter() - t0, "rows": len(df)}


def run_baseline(rows: int, sweeps: int, out: Path) -> dict:
    import sqlite3

    data = list(synthesize(rows, sweeps))
    t0 = time.perf_counter()
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE bench_run_results (steps INT, guidance REAL, clip_score REAL, aesthetic_score REAL, "
                "aes_v2_score REAL, hps_v2_score REAL, elapsed_ms REAL, seed INT)")
    for params, images, scores in data:
        merged = params.merge(images, on="image_id")
        for metric, table in scores.items():
            merged = merged.merge(table[["image_id", metric]], on="image_id")
        cols = ["steps", "guidance", *METRICS, "elapsed_ms", "seed"]
        con.executemany("INSERT INTO bench_run_results VALUES (?,?,?,?,?,?,?,?)",
                        merged[cols].itertuples(index=False, name=None))
    cur = con.execute("SELECT steps, guidance, clip_score, aesthetic_score, aes_v2_score, hps_v2_score, elapsed_ms, seed "
                      "FROM bench_run_results WHERE clip_score IS NOT NULL AND aesthetic_score IS NOT NULL "
                      "AND aes_v2_score IS NOT NULL AND hps_v2_score IS NOT NULL ORDER BY steps, guidance")
    import csv

    n = 0
    with open(out / "baseline.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([d[0] for d in cur.description])
        for row in cur:
            w.writerow(row)
            n += 1
    return {"seconds": time.perf_counter() - t0, "rows": n}


def _child(which: str, rows: int, sweeps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_ours if which == "ours" else run_baseline
        result = fn(rows, sweeps, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sweeps", type=int, default=500)
    parser.add_argument("--child", choices=["ours", "baseline"])
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(_child(args.child, args.rows, args.sweeps)) + "\n")
        return
    results = {}
    for which in ("ours", "baseline"):
        proc = subprocess.run([sys.executable, __file__, "--child", which, "--rows", str(args.rows),
                               "--sweeps", str(args.sweeps)], capture_output=True, text=True, check=True)
        results[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    o, b = results["ours"], results["baseline"]
    sys.stdout.write(
        f"merge+export of {args.rows:,} rows in {args.sweeps} sweeps (synthesis excluded from the time)\n"
        f"  ours (pandas merge → Parquet + CSV):      {o['seconds']:7.2f} s  peak RSS {o['peak_rss_mb']:7.0f} MB  rows {o['rows']:,}\n"
        f"  baseline (SQL table, ORDER BY → CSV):     {b['seconds']:7.2f} s  peak RSS {b['peak_rss_mb']:7.0f} MB  rows {b['rows']:,}\n"
        f"  ratio baseline/ours time: {b['seconds'] / o['seconds']:.2f}×   (targets: ≤ 30 s, ≤ 2048 MB)\n"
    )


if __name__ == "__main__":
    main()
