"""Text-to-image engines, by the name a sweep's ``engine`` column uses.

Adding an engine: one module with an ``Engine`` subclass, and one line in ``ENGINES``.
"""

from __future__ import annotations

from flexyface_pipeline.lib.engines.base import Engine, ImageRequest
from flexyface_pipeline.lib.engines.realvis_xl import RealVisXLEngine

ENGINES: dict[str, type[Engine]] = {
    RealVisXLEngine.name: RealVisXLEngine,
}


def get_engine(name: str) -> type[Engine]:
    """The engine class registered under ``name``."""
    try:
        return ENGINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}") from None


__all__ = ["ENGINES", "Engine", "ImageRequest", "RealVisXLEngine", "get_engine"]
