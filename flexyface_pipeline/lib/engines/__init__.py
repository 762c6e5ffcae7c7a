"""Text-to-image engines, by the name a sweep's ``engine`` column uses.

Adding an engine: one module with an ``Engine`` subclass, and one line in ``ENGINES``.
"""

from __future__ import annotations

from flexyface_pipeline.lib.engines.base import Engine, ImageRequest
from flexyface_pipeline.lib.engines.flux1_schnell import Flux1SchnellEngine
from flexyface_pipeline.lib.engines.flux2_dev import Flux2DevEngine
from flexyface_pipeline.lib.engines.hidream import HiDreamEngine
from flexyface_pipeline.lib.engines.realvis_xl import RealVisXLEngine
from flexyface_pipeline.lib.engines.sd35 import SD35Engine

ENGINES: dict[str, type[Engine]] = {
    RealVisXLEngine.name: RealVisXLEngine,
    Flux1SchnellEngine.name: Flux1SchnellEngine,
    SD35Engine.name: SD35Engine,
    HiDreamEngine.name: HiDreamEngine,
    Flux2DevEngine.name: Flux2DevEngine,
}


def get_engine(name: str) -> type[Engine]:
    """The engine class registered under ``name``."""
    try:
        return ENGINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}") from None


__all__ = [
    "ENGINES", "Engine", "Flux1SchnellEngine", "Flux2DevEngine", "HiDreamEngine", "ImageRequest",
    "RealVisXLEngine", "SD35Engine", "get_engine",
]
