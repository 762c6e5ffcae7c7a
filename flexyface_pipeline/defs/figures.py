"""Figures shown on an asset's page in the Dagster UI, without a click.

Dagster has no image metadata kind. Its UI renders Markdown (``MetadataValue.md``) inline in the
metadata table only while the text is under 1,000 characters — an inlined PNG never is — and shows
anything longer behind a "[Show Markdown]" link. Column descriptions of the asset's column schema
(the ``dagster/column_schema`` metadata entry) are rendered as Markdown with no length limit in the
*Columns* section at the top of the asset's Overview page, each clipped at about 320 pixels high.
So each figure is published as one entry of that schema: the name is the figure's key, the type
``png`` and the description the figure itself (a data URL, scaled to fit the clip) with its title
and caption. The same PNGs are written to files (the HTML report, the contact sheets) at full size.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

COLUMN_SCHEMA_LABEL = "dagster/column_schema"
# The UI clips a column description at 320 px (a "Show more" button opens the rest): the image and
# about three lines of text below it stay under that.
MAX_HEIGHT_PX = 220
MAX_WIDTH_PX = 560


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    png: bytes


def _fit(png: bytes, max_width: int, max_height: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        scale = min(1.0, max_width / image.width, max_height / image.height)
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _md_text(text: str) -> str:
    """Plain text for Markdown: characters that would start markup or raw HTML are escaped."""
    for char in "\\`*_[]<>#|":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


def figure_markdown(figure: Figure, *, max_width: int = MAX_WIDTH_PX, max_height: int = MAX_HEIGHT_PX) -> str:
    data = base64.b64encode(_fit(figure.png, max_width, max_height)).decode("ascii")
    text = f"**{_md_text(figure.title)}.**" + (f" {_md_text(figure.caption)}" if figure.caption else "")
    return f"![{_md_text(figure.key)}](data:image/png;base64,{data})\n\n{text}"


def figures_schema(figures: Iterable[Figure]) -> dg.TableSchema:
    """The figures as a column schema (see the module docstring): one entry per figure."""
    return dg.TableSchema(
        columns=[dg.TableColumn(name=f.key, type="png", description=figure_markdown(f)) for f in figures]
    )


def figures_metadata(figures: Iterable[Figure]) -> dict[str, dg.TableSchemaMetadataValue]:
    return {COLUMN_SCHEMA_LABEL: dg.MetadataValue.table_schema(figures_schema(figures))}

