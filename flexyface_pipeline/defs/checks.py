"""Asset checks on the merged export (score-table checks run inside their assets)."""


import dagster as dg
import pandas as pd

from flexyface_pipeline.lib.checks import check_export
from flexyface_pipeline.defs.assets.results import sweep_results
from flexyface_pipeline.defs.resources import StorageResource

EXPORT_CHECKS = ["clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score", "images_exist", "metrics_agree"]


_RANGE = "No missing or non-finite {metric} in the export, every value in its plausible range, one row per image."
CHECK_DESCRIPTIONS = {
    "clip_score": _RANGE.format(metric="clip_score") + " CLIP score is a clipped cosine similarity: 0–1.",
    "aesthetic_score": _RANGE.format(metric="aesthetic_score") + " Above 10 means unnormalised embeddings.",
    "aes_v2_score": _RANGE.format(metric="aes_v2_score") + " Above 10 means unnormalised embeddings.",
    "hps_v2_score": _RANGE.format(metric="hps_v2_score") + " HPS v2.1 lies in [-1, 1].",
    "images_exist": "Every exported row's image file exists and is a complete PNG.",
    "metrics_agree": "Warning only: lists images that one metric ranks near the top of their prompt and another "
    "near the bottom (rank gap of 80 % or more). Real metrics disagree on some images; the random-weight models of "
    "the tiny profile (the demo) are unrelated to each other, so on a demo sweep this warns every time.",
}


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(f"export_{name}", asset=sweep_results, description=CHECK_DESCRIPTIONS[name])
           for name in EXPORT_CHECKS],
    description="Scores finite and in range, every image file present; wild metric disagreements as warnings.",
)
def export_checks(context: dg.AssetCheckExecutionContext, storage: StorageResource):
    store = storage.store()
    df = pd.read_parquet(store.exports_dir / "sweep_results.parquet")
    for name, outcome in zip(EXPORT_CHECKS, check_export(df, store.root), strict=True):
        yield dg.AssetCheckResult(
            check_name=f"export_{name}",
            asset_key=sweep_results.key,
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.WARN if outcome.warn_only else dg.AssetCheckSeverity.ERROR,
            description=outcome.description,
            metadata={k: dg.MetadataValue.json(v) if isinstance(v, list | dict) else v
                      for k, v in outcome.metadata.items()},
        )
