"""The four image metrics, keyed by their export column."""

from __future__ import annotations

from flexyface_pipeline.lib.metrics.aesthetic import AestheticV1Scorer, AestheticV2Scorer
from flexyface_pipeline.lib.metrics.base import ImageEmbedder, Scorer
from flexyface_pipeline.lib.metrics.clip_score import ClipScorer
from flexyface_pipeline.lib.metrics.hps import HpsV2Scorer
from flexyface_pipeline.lib.metrics.images import score_paths

SCORERS: dict[str, type[Scorer]] = {
    cls.metric: cls for cls in (ClipScorer, AestheticV1Scorer, AestheticV2Scorer, HpsV2Scorer)
}


def get_scorer(metric: str) -> type[Scorer]:
    """The scorer class for an export column name."""
    try:
        return SCORERS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(SCORERS)}") from None


__all__ = [
    "SCORERS",
    "AestheticV1Scorer",
    "AestheticV2Scorer",
    "ClipScorer",
    "HpsV2Scorer",
    "ImageEmbedder",
    "Scorer",
    "get_scorer",
    "score_paths",
]
