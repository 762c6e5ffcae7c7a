"""Contact sheets: per prompt, a steps × guidance grid of representative images.

Axes are binned over the whole table (every prompt's sheet has the same bins). Each cell shows
the image whose settings lie closest to the cell centre (distances in bin widths), labelled with
its steps, guidance and scores; a cell without images is grey. A sheet larger than
``max_side_px`` is first drawn with smaller cells (down to ``min_cell_px``) and then, if still too
large, split into tiles: a sweep of any size gives sheets within the limit.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from flexyface_pipeline.lib.analysis.stats import Bins, make_bins
from flexyface_pipeline.lib.atomic import atomic_path
from flexyface_pipeline.lib.config import METRICS

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("steps", "guidance", "prompt", "image_path")
SCORE_ABBREVIATIONS = {"clip_score": "clip", "aesthetic_score": "aes", "aes_v2_score": "av2", "hps_v2_score": "hps"}
MIN_SIDE_PX = 256

_BACKGROUND = (255, 255, 255)
_EMPTY = (190, 190, 190)
_IMAGE_BG = (40, 40, 40)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
_PAD = 4


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib, wide glyph coverage), else Pillow's default font."""
    try:
        from matplotlib import get_data_path

        return ImageFont.truetype(str(Path(get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class _Layout:
    cell_px: int
    font_px: int
    label_lines: int
    score_lines: tuple[tuple[str, ...], ...]  # score columns per label line, after the settings line
    line_px: int
    left_px: int
    title_px: int
    header_px: int

    @property
    def cell_w(self) -> int:
        return self.cell_px + 2 * _PAD

    @property
    def cell_h(self) -> int:
        return self.cell_px + self.label_lines * self.line_px + 2 * _PAD

    def size(self, cols: int, rows: int) -> tuple[int, int]:
        return self.left_px + cols * self.cell_w, self.title_px + self.header_px + rows * self.cell_h


def _layout(cell_px: int, score_columns: list[str], s_bins: Bins, g_bins: Bins) -> _Layout:
    font_px = max(8, min(14, cell_px // 10))
    font = _font(font_px)
    line_px = font_px + 3
    # Settings line, then scores packed into lines that fit the cell width. The packing is fixed
    # here, for the longest value a score can print (``.3g``: "-0.000123", "-1.23e-05"), so every
    # score has its line in every cell whatever its value.
    score_lines = _pack_columns(score_columns, font, cell_px)
    lines = 1 + len(score_lines)
    left = max(font.getlength(_steps_label(s_bins, i)) for i in range(len(s_bins))) + 2 * _PAD
    left = int(max(left, font.getlength("steps") + 2 * _PAD))
    return _Layout(
        cell_px=cell_px,
        font_px=font_px,
        label_lines=lines,
        score_lines=score_lines,
        line_px=line_px,
        left_px=left,
        title_px=3 * (font_px + 4) + _PAD,
        header_px=line_px + 2 * _PAD,
    )


def cell_label(row: pd.Series, n: int, layout: _Layout) -> list[str]:
    """A cell's label lines: its settings, then every score (``layout.label_lines`` lines)."""
    font = _font(layout.font_px)
    settings = f"{int(row['steps'])} st · g {float(row['guidance']):.2f} · n {n}"
    lines = [_fit_text(settings, font, layout.cell_px)]
    lines += [_fit_text("  ".join(_score_token(c, row.get(c)) for c in group), font, layout.cell_px)
              for group in layout.score_lines]
    return lines


def _score_token(column: str, value: object) -> str:
    text = f"{float(value):.3g}" if value is not None and pd.notna(value) else "–"
    return f"{SCORE_ABBREVIATIONS.get(column, column[:4])} {text}"


def _pack_columns(columns: list[str], font, width: int) -> tuple[tuple[str, ...], ...]:
    """Score columns grouped into label lines: as many per line as fit at their widest values."""
    lines: list[list[str]] = []
    widest = {c: _score_token(c, -0.000123) for c in columns}
    for column in columns:
        if lines and font.getlength("  ".join([*(widest[c] for c in lines[-1]), widest[column]])) <= width:
            lines[-1].append(column)
        else:
            lines.append([column])
    return tuple(tuple(line) for line in lines)


def _steps_label(bins: Bins, i: int) -> str:
    lo, hi = int(bins.lows[i]), int(bins.highs[i])
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _guidance_label(bins: Bins, i: int) -> str:
    lo, hi = bins.lows[i], bins.highs[i]
    return f"{lo:.1f}" if lo == hi else f"{lo:.1f}-{hi:.1f}"


def _fit_text(text: str, font, width: float) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    words = text.split()
    lines: list[str] = []
    for word in words:
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit_text(lines[-1] + " …", font, width)
    return [_fit_text(line, font, width) for line in lines]


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "prompt"


def _choose_layout(
    cell_px: int, min_cell_px: int, max_side_px: int, score_columns: list[str], s_bins: Bins, g_bins: Bins
) -> _Layout:
    """The largest cell size up to ``cell_px`` whose full sheet fits, else ``min_cell_px`` (tiled)."""
    size = cell_px
    while True:
        layout = _layout(size, score_columns, s_bins, g_bins)
        w, h = layout.size(len(g_bins), len(s_bins))
        if (w <= max_side_px and h <= max_side_px) or size <= min_cell_px:
            return layout
        shrink = min(max_side_px / w, max_side_px / h)
        size = max(min_cell_px, min(size - 1, int(size * shrink)))


class _ImageCache:
    """Cell-sized thumbnails, each file read once per call."""

    def __init__(self, root: Path | None):
        self.root = root
        self.cache: dict[tuple[str, int], Image.Image | None] = {}

    def get(self, path: str, px: int) -> Image.Image | None:
        key = (path, px)
        if key not in self.cache:
            p = Path(path)
            if self.root is not None and not p.is_absolute():
                p = self.root / p
            try:
                with Image.open(p) as im:
                    thumb = ImageOps.contain(im.convert("RGB"), (px, px), method=Image.Resampling.LANCZOS)
                self.cache[key] = thumb
            except (OSError, ValueError) as exc:
                logger.warning("contact sheet: cannot read %s (%s); the cell is marked missing", p, exc)
                self.cache[key] = None
        return self.cache[key]


def _representatives(rows: pd.DataFrame, s_bins: Bins, g_bins: Bins) -> dict[tuple[int, int], pd.Series]:
    """Per cell, the row closest to the cell centre (in bin widths); ties go to the smallest id."""
    s_codes = s_bins.assign(rows["steps"].to_numpy(dtype=float))
    g_codes = g_bins.assign(rows["guidance"].to_numpy(dtype=float))
    inside = (s_codes >= 0) & (g_codes >= 0)
    if not inside.any():
        return {}
    s_width = np.maximum(np.asarray(s_bins.highs) - np.asarray(s_bins.lows), 1.0)
    g_width = np.asarray(g_bins.highs) - np.asarray(g_bins.lows)
    g_width = np.where(g_width > 0, g_width, 1.0)
    si, gi = s_codes[inside], g_codes[inside]
    ds = (rows["steps"].to_numpy(dtype=float)[inside] - s_bins.centres[si]) / s_width[si]
    dg = (rows["guidance"].to_numpy(dtype=float)[inside] - g_bins.centres[gi]) / g_width[gi]
    frame = rows.loc[inside].assign(_s=si, _g=gi, _d=np.round(ds**2 + dg**2, 12))
    sort_key = "image_id" if "image_id" in frame.columns else "image_path"
    frame = frame.assign(_key=frame[sort_key].astype(str))
    best = frame.sort_values(["_s", "_g", "_d", "_key"], kind="stable").drop_duplicates(["_s", "_g"])
    return {(int(r["_s"]), int(r["_g"])): r for _, r in best.iterrows()}


def _draw_sheet(
    prompt: str,
    reps: dict[tuple[int, int], pd.Series],
    counts: dict[tuple[int, int], int],
    s_range: range,
    g_range: range,
    s_bins: Bins,
    g_bins: Bins,
    layout: _Layout,
    score_columns: list[str],
    images: _ImageCache,
    tile_note: str,
) -> Image.Image:
    width, height = layout.size(len(g_range), len(s_range))
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(layout.font_px)
    title_font = _font(layout.font_px + 1)
    # Title: prompt (up to two lines) and the axes legend.
    title_lines = _wrap(f"prompt: {prompt}", title_font, width - 2 * _PAD, 2)
    y = _PAD
    for line in title_lines:
        draw.text((_PAD, y), line, font=title_font, fill=_TEXT)
        y += layout.font_px + 4
    legend = _fit_text(f"rows: steps, columns: guidance scale{tile_note}", font, width - 2 * _PAD)
    draw.text((_PAD, layout.title_px - layout.font_px - 6), legend, font=font, fill=_MUTED)
    # Column headers (guidance) and the corner label.
    top = layout.title_px
    draw.text((_PAD, top + _PAD), _fit_text("steps", font, layout.left_px), font=font, fill=_MUTED)
    for c, j in enumerate(g_range):
        x = layout.left_px + c * layout.cell_w + _PAD
        label = _fit_text(f"g {_guidance_label(g_bins, j)}", font, layout.cell_px)
        draw.text((x, top + _PAD), label, font=font, fill=_TEXT)
    grid_top = top + layout.header_px
    for r, i in enumerate(s_range):
        y0 = grid_top + r * layout.cell_h
        draw.text((_PAD, y0 + _PAD), _steps_label(s_bins, i), font=font, fill=_TEXT)
        for c, j in enumerate(g_range):
            x0 = layout.left_px + c * layout.cell_w + _PAD
            box = (x0, y0 + _PAD, x0 + layout.cell_px - 1, y0 + _PAD + layout.cell_px - 1)
            row = reps.get((i, j))
            if row is None:
                draw.rectangle(box, fill=_EMPTY)
                draw.text((x0 + 3, y0 + _PAD + 3), "no image", font=font, fill=_MUTED)
                continue
            thumb = images.get(str(row["image_path"]), layout.cell_px)
            if thumb is None:
                draw.rectangle(box, fill=_EMPTY, outline=(160, 0, 0))
                draw.text((x0 + 3, y0 + _PAD + 3), "missing file", font=font, fill=(160, 0, 0))
            else:
                draw.rectangle(box, fill=_IMAGE_BG)
                sheet.paste(
                    thumb,
                    (x0 + (layout.cell_px - thumb.width) // 2, y0 + _PAD + (layout.cell_px - thumb.height) // 2),
                )
            label_y = y0 + _PAD + layout.cell_px + 1
            lines = cell_label(row, counts.get((i, j), 0), layout)
            for k, line in enumerate(lines):
                draw.text((x0, label_y + k * layout.line_px), line, font=font, fill=_TEXT)
    return sheet


def _validate(rows: pd.DataFrame, steps_bins: int, guidance_bins: int, cell_px: int, max_side_px: int,
              min_cell_px: int) -> None:
    if not isinstance(rows, pd.DataFrame):
        raise ValueError(f"contact sheets need a pandas DataFrame, got {type(rows).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"contact sheets need column(s) {missing}; the table has {list(rows.columns)}")
    if steps_bins < 1 or guidance_bins < 1:
        raise ValueError(f"steps_bins and guidance_bins must be at least 1, got {steps_bins} and {guidance_bins}")
    if not 16 <= min_cell_px <= cell_px:
        raise ValueError(f"need 16 <= min_cell_px <= cell_px, got min_cell_px={min_cell_px}, cell_px={cell_px}")
    if max_side_px < MIN_SIDE_PX:
        raise ValueError(f"max_side_px must be at least {MIN_SIDE_PX}, got {max_side_px}")


def iter_grids(
    rows: pd.DataFrame,
    *,
    steps_bins: int = 6,
    guidance_bins: int = 6,
    cell_px: int = 128,
    max_side_px: int = 4096,
    min_cell_px: int = 64,
    image_root: Path | None = None,
) -> Iterator[tuple[str, Image.Image]]:
    """Yield ``(name, sheet)`` one at a time; see :func:`build_grid`."""
    _validate(rows, steps_bins, guidance_bins, cell_px, max_side_px, min_cell_px)
    usable = rows.dropna(subset=["steps", "prompt"])
    if usable.empty:
        return
    guided = usable["guidance"].notna()
    s_bins = make_bins(usable["steps"], steps_bins, integer=True)
    # Engines without guidance (NaN) get one guidance column of their own.
    g_bins = make_bins(usable.loc[guided, "guidance"], guidance_bins, integer=False) if guided.any() else None
    no_guidance = Bins((0.0,), (0.0,), False)
    score_columns = [m for m in METRICS if m in usable.columns]
    layout = _choose_layout(cell_px, min_cell_px, max_side_px, score_columns, s_bins,
                             g_bins if g_bins is not None else no_guidance)
    cols_per_tile = max(1, (max_side_px - layout.left_px) // layout.cell_w)
    rows_per_tile = max(1, (max_side_px - layout.title_px - layout.header_px) // layout.cell_h)
    images = _ImageCache(Path(image_root) if image_root is not None else None)
    prompts = list(dict.fromkeys(usable["prompt"].astype(str)))
    # One sheet per (engine, scheduler, prompt): images of different engines or samplers never share a cell.
    group_columns = [c for c in ("engine", "scheduler") if c in usable.columns and usable[c].nunique(dropna=False) > 1]
    keys = usable[group_columns].astype(str) if group_columns else pd.DataFrame(index=usable.index)
    groups = list(dict.fromkeys(tuple(k) for k in keys.itertuples(index=False))) if group_columns else [()]
    for group in groups:
        in_group = (keys == list(group)).all(axis=1) if group_columns else pd.Series(True, index=usable.index)
        label = " · ".join(f"{c} {v}" for c, v in zip(group_columns, group))
        for p_index, prompt in enumerate(prompts):
            subset = usable[in_group & (usable["prompt"].astype(str) == prompt)]
            if subset.empty:
                continue
            sheet_g_bins = g_bins
            if subset["guidance"].isna().all():
                subset, sheet_g_bins = subset.assign(guidance=0.0), no_guidance
            subset = subset[subset["guidance"].notna()]
            reps = _representatives(subset, s_bins, sheet_g_bins)
            codes = zip(s_bins.assign(subset["steps"].to_numpy(dtype=float)),
                        sheet_g_bins.assign(subset["guidance"].to_numpy(dtype=float)))
            counts: dict[tuple[int, int], int] = {}
            for key in codes:
                counts[(int(key[0]), int(key[1]))] = counts.get((int(key[0]), int(key[1])), 0) + 1
            # Rows are drawn with the most steps on top, like the analysis heatmaps.
            s_order = list(range(len(s_bins)))[::-1]
            g_order = list(range(len(sheet_g_bins)))
            row_tiles = [s_order[k : k + rows_per_tile] for k in range(0, len(s_order), rows_per_tile)]
            col_tiles = [g_order[k : k + cols_per_tile] for k in range(0, len(g_order), cols_per_tile)]
            tiled = len(row_tiles) * len(col_tiles) > 1
            prefix = "".join(f"{_slug(v, 24)}_" for v in group)
            base = f"{p_index:03d}_{prefix}{_slug(prompt)}"
            title = f"{prompt} [{label}]" if label else prompt
            for a, s_part in enumerate(row_tiles):
                for b, g_part in enumerate(col_tiles):
                    note = f"; tile {a * len(col_tiles) + b + 1} of {len(row_tiles) * len(col_tiles)}" if tiled else ""
                    sheet = _draw_sheet(title, reps, counts, s_part, g_part, s_bins, sheet_g_bins, layout,
                                        score_columns, images, note)
                    name = f"{base}_r{a + 1}c{b + 1}" if tiled else base
                    yield name, sheet


def build_grid(
    rows: pd.DataFrame,
    *,
    steps_bins: int = 6,
    guidance_bins: int = 6,
    cell_px: int = 128,
    max_side_px: int = 4096,
    min_cell_px: int = 64,
    image_root: Path | None = None,
) -> list[tuple[str, Image.Image]]:
    """Per prompt, a steps × guidance contact sheet (or several tiles of one).

    ``rows`` needs ``steps``, ``guidance``, ``prompt`` and ``image_path`` (relative paths are read
    under ``image_root``); score columns among :data:`METRICS` are printed under each image. Names
    are ``<prompt number>_<prompt slug>`` with ``_r<i>c<j>`` appended for tiles. Unreadable image
    files are drawn as marked "missing file" cells and logged. Every sheet fits within
    ``max_side_px`` on both sides. For a long sweep over many prompts prefer :func:`iter_grids` or
    :func:`write_grids`, which hold one sheet at a time.
    """
    return list(
        iter_grids(
            rows, steps_bins=steps_bins, guidance_bins=guidance_bins, cell_px=cell_px,
            max_side_px=max_side_px, min_cell_px=min_cell_px, image_root=image_root,
        )
    )


def write_grids(rows: pd.DataFrame, out_dir: Path, **kwargs) -> list[Path]:
    """Write every contact sheet of :func:`iter_grids` as ``<name>.png`` under ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    paths = []
    for name, sheet in iter_grids(rows, **kwargs):
        target = out_dir / f"{name}.png"
        with atomic_path(target) as tmp:
            sheet.save(tmp, format="PNG", optimize=False)
        paths.append(target)
    logger.info("wrote %d contact sheet(s) under %s", len(paths), out_dir)
    return paths
