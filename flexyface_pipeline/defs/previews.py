"""Small inline previews for asset metadata and events."""

import base64
import io
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from flexyface_pipeline.lib.progress import Progress, format_duration


def png_markdown(path: Path, width: int = 900) -> str:
    """A markdown image of ``path`` scaled to at most ``width`` pixels wide, inlined as a data
    URL (the UI renders markdown images, not raw HTML; the scaling keeps the event log small)."""
    from PIL import Image

    path = Path(path)
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, max(1, round(image.height * width / image.width))), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"![{path.stem}](data:image/png;base64,{data})"


class ProgressObservations:
    """``AssetObservation`` events of a running generation (``generate_sweep``'s ``after_batch``):
    images done / total, images per second, ETA and the latest finished image as an inline
    preview, at most one every ``every`` seconds and always at the end."""

    def __init__(self, log_event: Callable[[dg.AssetObservation], None], asset: str, partition: str,
                 every: float = 5.0, preview_width: int = 256) -> None:
        self.log_event, self.asset, self.partition = log_event, asset, partition
        self.every, self.preview_width = every, preview_width
        self._last: float | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        last_batch = progress.done >= progress.total
        if not last_batch and self._last is not None and now - self._last < self.every:
            return
        self._last = now
        metadata = {
            "progress": dg.MetadataValue.text(progress.line("generated")),
            "done": dg.MetadataValue.int(progress.done),
            "total": dg.MetadataValue.int(progress.total),
            "images_per_second": dg.MetadataValue.float(round(progress.images_per_second, 4)),
            "eta": dg.MetadataValue.text(format_duration(progress.eta_seconds)),
        }
        if progress.latest is not None:
            metadata["latest_image"] = dg.MetadataValue.path(str(progress.latest))
            metadata["preview"] = dg.MetadataValue.md(png_markdown(progress.latest, self.preview_width))
        self.log_event(dg.AssetObservation(asset_key=self.asset, partition=self.partition, metadata=metadata))
