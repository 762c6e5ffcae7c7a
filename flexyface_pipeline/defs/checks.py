"""Asset checks on the merged export (score-table checks run inside their assets)."""


import dagster as dg
import pandas as pd

from flexyface_pipeline.lib.checks import check_export
from flexyface_pipeline.defs.assets.results import sweep_results
from flexyface_pipeline.defs.resources import StorageResource

EXPORT_CHECKS = ["clip_score", "aesthetic_score", "aes_v2_score", "hps_v2_score", "images_exist", "metrics_agree"]


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(f"export_{name}", asset=sweep_results) for name in EXPORT_CHECKS],
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
