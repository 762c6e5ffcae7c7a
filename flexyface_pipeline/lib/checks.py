"""Data-quality checks on score tables and the export (pure functions; Dagster wraps them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.config import METRICS

# Plausible ranges. CLIP score is a clipped cosine similarity; the aesthetic predictors rate on a
# 1–10 scale, and a value above 10 means the embedding was not L2-normalised (a known trap).
RANGES: dict[str, tuple[float, float]] = {
    "clip_score": (0.0, 1.0),
    "aesthetic_score": (-10.0, 10.0),
    "aes_v2_score": (-10.0, 10.0),
    "hps_v2_score": (-1.0, 1.0),
}
# |rank difference| above this (as a fraction of the rows) marks two metrics as disagreeing.
DISAGREEMENT_RANK_GAP = 0.8


@dataclass
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict = field(default_factory=dict)
    warn_only: bool = False


def check_scores(table: pd.DataFrame, metric: str, expected_rows: int) -> CheckOutcome:
    """No missing or non-finite score, values in range, one row per image of the sweep."""
    values = pd.to_numeric(table[metric], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    lo, hi = RANGES[metric]
    out_of_range = np.isfinite(values) & ((values < lo) | (values > hi))
    problems = []
    if bad.any():
        problems.append(f"{int(bad.sum())} missing or non-finite")
    if out_of_range.any():
        problems.append(f"{int(out_of_range.sum())} outside [{lo}, {hi}]"
                        + (" (above 10: unnormalised embeddings?)" if metric != "clip_score" and (values > 10).any() else ""))
    if len(table) != expected_rows:
        problems.append(f"{len(table)} rows, the sweep has {expected_rows} images")
    if table["image_id"].duplicated().any():
        problems.append("duplicate image ids")
    ids = table.loc[bad | out_of_range, "image_id"].astype(str).tolist()[:20]
    return CheckOutcome(
        passed=not problems,
        description="; ".join(problems) or f"{len(table)} finite {metric} values in [{lo}, {hi}]",
        metadata={"rows": len(table), "expected_rows": expected_rows, "bad_image_ids": ids},
    )


def _png_damaged(path: Path) -> bool:
    """Whether an existing file is not a complete PNG: ``verify`` reads every chunk and checks its
    CRC (a truncated or overwritten file fails) without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError):
        return True
    return False


def check_images_exist(image_paths: list[Path]) -> CheckOutcome:
    """Every image file exists and is a complete PNG. A missing or damaged image is regenerated
    by running its sweep again (finished images are verified and kept)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [Path(p) for p in image_paths]
    missing = [str(p) for p in paths if not p.is_file()]
    present = [p for p in paths if p.is_file()]
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="verify") as pool:
        damaged = [str(p) for p, bad in zip(present, pool.map(_png_damaged, present)) if bad]
    problems = []
    if missing:
        problems.append(f"{len(missing)} image file(s) missing (first: {missing[0]})")
    if damaged:
        problems.append(f"{len(damaged)} image file(s) damaged (first: {damaged[0]})")
    if problems:
        description = "; ".join(problems) + ": run the sweep again (`flexyface sweep NAME`) to regenerate them"
    else:
        description = f"all {len(paths)} image files exist and are complete PNGs"
    return CheckOutcome(
        passed=not problems,
        description=description,
        metadata={"missing": missing[:20], "num_missing": len(missing),
                  "damaged": damaged[:20], "num_damaged": len(damaged)},
    )


def find_disagreements(df: pd.DataFrame, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Images that one metric ranks near the top and another near the bottom (within a prompt)."""
    if len(df) < 10:
        return pd.DataFrame(columns=["image_id", "high_metric", "low_metric", "rank_gap"])
    ranks = df.groupby("prompt")[list(metrics)].rank(pct=True)
    rows = []
    for i, a in enumerate(metrics):
        for b in metrics[i + 1 :]:
            gap = ranks[a] - ranks[b]
            for idx in gap.index[gap.abs() >= DISAGREEMENT_RANK_GAP]:
                high, low = (a, b) if gap[idx] > 0 else (b, a)
                rows.append({"image_id": df.at[idx, "image_id"], "high_metric": high, "low_metric": low,
                             "rank_gap": round(float(abs(gap[idx])), 3)})
    return pd.DataFrame(rows, columns=["image_id", "high_metric", "low_metric", "rank_gap"])


def check_export(df: pd.DataFrame, data_dir: Path) -> list[CheckOutcome]:
    """Export-wide checks: each metric valid, image files exist; disagreements as a warning."""
    outcomes = [check_scores(df, m, len(df)) for m in METRICS]
    outcomes.append(check_images_exist([data_dir / p for p in df["image_path"]]))
    disagreements = find_disagreements(df)
    outcomes.append(
        CheckOutcome(
            passed=disagreements.empty,
            warn_only=True,
            description=f"{disagreements['image_id'].nunique()} image(s) where metrics disagree wildly"
            if len(disagreements) else "no image where the metrics disagree wildly",
            metadata={"disagreements": disagreements.head(50).to_dict("records")},
        )
    )
    return outcomes
