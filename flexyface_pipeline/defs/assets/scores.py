"""One score table per metric. Each can be materialized alone (re-scoring one metric)."""


import dagster as dg
import pandas as pd
from pydantic import Field

from flexyface_pipeline.lib.checks import check_scores
from flexyface_pipeline.lib.export import SCORE_TABLES
from flexyface_pipeline.lib.scoring import score_sweep
from flexyface_pipeline.defs.assets.sweep import generated_images
from flexyface_pipeline.defs.partitions import require_tables, sweep_keys, sweeps_partitions
from flexyface_pipeline.defs.resources import ModelResource, StorageResource

DESCRIPTIONS = {
    "clip_score": "CLIP ViT-L/14 cosine similarity of image and prompt, clipped at 0 (0–1).",
    "aesthetic_score": "LAION aesthetic predictor v1 (simple-aesthetics-predictor V1) on the CLIP ViT-L/14 embedding.",
    "aes_v2_score": "Aesthetics predictor v2, sac+logos+ava1 linear MSE head (simple-aesthetics-predictor).",
    "hps_v2_score": "Human Preference Score v2.1 (hpsv2's ViT-H-14 with the v2.1 checkpoint).",
}


class ScoreConfig(dg.Config):
    """Which images to score."""

    rescore_all: bool = Field(
        default=False,
        description="Score every image again. By default an image keeps its score when its bytes, the metric's "
        "weights, device, precision and the scoring code are those it was scored with.")


def build_score_asset(metric: str) -> dg.AssetsDefinition:
    table_name, prefix = SCORE_TABLES[metric]

    @dg.asset(
        name=table_name,
        partitions_def=sweeps_partitions,
        deps=[generated_images],
        group_name="scores",
        kinds={"pytorch", "parquet"},
        pool="gpu",
        backfill_policy=dg.BackfillPolicy.single_run(),
        description=DESCRIPTIONS[metric],
        check_specs=[dg.AssetCheckSpec("scores_valid", asset=table_name,
                                        description="No missing/non-finite score, values in range, one row per image.")],
    )
    def _score_asset(context: dg.AssetExecutionContext, config: ScoreConfig, storage: StorageResource,
                     models: ModelResource) -> dg.MaterializeResult:
        sweeps = sweep_keys(context)
        store = storage.store()
        require_tables(store, sweeps, ("parameters", "images"), table_name)
        tables, outcomes = [], []
        try:
            for sweep in sweeps:
                table = score_sweep(metric, sweep, store, lambda: models.scorer(metric),
                                    batch_size=models.scoring_batch_size, log=context.log,
                                    backend=models.distributed(), rescore_all=config.rescore_all)
                store.write_table(table_name, sweep, table)
                tables.append(table)
                outcomes.append(check_scores(table, metric, len(store.read_table("parameters", sweep))))
        finally:
            models.release()
        values = pd.concat(tables)[metric]
        check = dg.AssetCheckResult(
            check_name="scores_valid",
            passed=all(o.passed for o in outcomes),
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(f"{k}: {o.description}" for k, o in zip(context.partition_keys, outcomes)),
            metadata={"bad_image_ids": [i for o in outcomes for i in o.metadata["bad_image_ids"]][:20]},
        )
        return dg.MaterializeResult(
            check_results=[check],
            metadata={
                "num_images": dg.MetadataValue.int(len(values)),
                "dagster/row_count": dg.MetadataValue.int(len(values)),
                f"mean_{metric}": dg.MetadataValue.float(float(values.mean())),
                f"min_{metric}": dg.MetadataValue.float(float(values.min())),
                f"max_{metric}": dg.MetadataValue.float(float(values.max())),
                "model": dg.MetadataValue.text(str(tables[0][f"{prefix}_model"].iloc[0])),
                "model_revision": dg.MetadataValue.text(str(tables[0][f"{prefix}_model_revision"].iloc[0])),
                "precision": dg.MetadataValue.text(
                    f"{tables[0][f'{prefix}_device'].iloc[0]}, {tables[0][f'{prefix}_dtype'].iloc[0]}, "
                    f"TF32 {'on' if bool(tables[0][f'{prefix}_tf32'].iloc[0]) else 'off'}"),
                **models.distributed_metadata(),
            }
        )

    return _score_asset


score_assets = [build_score_asset(metric) for metric in SCORE_TABLES]
