"""Score one sweep's images with one metric and build its score table."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from flexyface_pipeline.lib.export import SCORE_TABLES
from flexyface_pipeline.lib.metrics.base import Scorer
from flexyface_pipeline.lib.metrics.images import score_paths
from flexyface_pipeline.lib.store import SweepStore

logger = logging.getLogger(__name__)


def score_sweep(
    metric: str,
    sweep: str,
    store: SweepStore,
    scorer_factory: Callable[[], Scorer],
    *,
    batch_size: int,
    log: logging.Logger | None = None,
) -> pd.DataFrame:
    """Score every image of ``sweep`` with ``metric``; columns: image_id, metric, provenance.

    Missing images fail before the model is loaded.
    """
    log = log or logger
    params = store.read_table("parameters", sweep)
    images = store.read_table("images", sweep)
    rows = params[["image_id", "prompt"]].merge(images[["image_id", "image_path"]], on="image_id", validate="one_to_one")
    paths = [store.absolute(p) for p in rows["image_path"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"sweep {sweep!r}: {len(missing)} image(s) missing, e.g. {missing[0]}; materialize generated_images first"
        )
    scorer = scorer_factory()
    t0 = time.perf_counter()
    scores = score_paths(scorer, paths, list(rows["prompt"]), batch_size=batch_size, log=log)
    log.info("%s: scored %d images of %s in %.2f s", metric, len(paths), sweep, time.perf_counter() - t0)
    prefix = SCORE_TABLES[metric][1]
    table = pd.DataFrame({"image_id": rows["image_id"], metric: np.asarray(scores, dtype=np.float64)})
    for column, value in scorer.identity.as_columns(prefix).items():
        table[column] = value
    return table
