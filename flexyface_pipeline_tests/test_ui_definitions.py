"""What the UI shows about the definitions: descriptions of checks, assets, jobs and automation, and
inline figures sized to what the asset page shows without a click."""

import base64
import io
import re

import dagster as dg
from PIL import Image

from flexyface_pipeline.definitions import defs
from flexyface_pipeline.defs.figures import (
    COLUMN_SCHEMA_LABEL,
    MAX_HEIGHT_PX,
    MAX_WIDTH_PX,
    Figure,
    figure_markdown,
    figures_metadata,
)

# Text the UI's Markdown would take for an HTML tag and drop (it renders no raw HTML): `<sweep>`.
_TAG_OUTSIDE_CODE = re.compile(r"<[A-Za-z][^>]*>")


def _outside_code(text: str) -> str:
    return re.sub(r"`[^`]*`", "", text)


def test_every_check_has_a_description():
    graph = defs.resolve_asset_graph()
    keys = list(graph.asset_check_keys)
    assert len(keys) >= 11  # four score tables, the images, six on the export
    missing = [key.to_user_string() for key in keys if not (graph.get_check_spec(key).description or "").strip()]
    assert missing == []


def test_descriptions_read_as_markdown_keep_their_text():
    graph = defs.resolve_asset_graph()
    texts = {node.key.to_user_string(): node.description or "" for node in graph.asset_nodes}
    repo = defs.get_repository_def()
    texts |= {f"job {job.name}": job.description or "" for job in repo.get_all_jobs() if not job.name.startswith("__")}
    texts |= {f"sensor {s.name}": s.description or "" for s in repo.sensor_defs}
    texts |= {f"schedule {s.name}": s.description or "" for s in repo.schedule_defs}
    assert all(text.strip() for text in texts.values()), [k for k, v in texts.items() if not v.strip()]
    assert {k: v for k, v in texts.items() if _TAG_OUTSIDE_CODE.search(_outside_code(v))} == {}


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def test_a_figure_is_an_inline_image_that_fits_the_unclipped_height():
    text = figure_markdown(Figure("clip_score_heatmap", "clip_score: steps × guidance <cells>",
                                  "Colour: mean z; text_with_underscores *not emphasis*", _png(1600, 900)))
    [data] = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert image.width <= MAX_WIDTH_PX and image.height <= MAX_HEIGHT_PX
        assert abs(image.width / image.height - 16 / 9) < 0.02  # scaled, not distorted
    caption = text.split("\n\n", 1)[1]
    assert "\\<cells\\>" in caption and "text\\_with\\_underscores" in caption and "\\*not emphasis\\*" in caption
    # A small figure is not enlarged.
    small = figure_markdown(Figure("k", "t", "", _png(100, 50)))
    [data] = re.findall(r"base64,([A-Za-z0-9+/=]+)\)", small)
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert image.size == (100, 50)


def test_figures_are_published_as_the_column_schema():
    figures = [Figure("overview", "Overview", "all metrics", _png(400, 200)),
               Figure("correlations", "Correlations", "", _png(300, 300))]
    metadata = figures_metadata(figures)
    assert list(metadata) == [COLUMN_SCHEMA_LABEL] == ["dagster/column_schema"]
    schema = metadata[COLUMN_SCHEMA_LABEL].schema
    assert isinstance(schema, dg.TableSchema)
    assert [(c.name, c.type) for c in schema.columns] == [("overview", "png"), ("correlations", "png")]
    assert all(c.description.startswith("![") for c in schema.columns)
