"""Contact sheets built from small PNGs written into a temporary directory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flexyface_pipeline.lib.grid import build_grid, iter_grids, write_grids

COLOURS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 220, 10),
}
EMPTY_GREY = (190, 190, 190)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, rgb in COLOURS.items():
        path = folder / f"{name}.png"
        Image.new("RGB", (32, 32), rgb).save(path)
        paths[name] = str(path)
    return paths


def _rows(n: int, pngs: dict[str, str], *, n_prompts: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = list(pngs)
    return pd.DataFrame(
        {
            "steps": rng.integers(4, 61, n),
            "guidance": np.round(rng.uniform(0.5, 12.0, n), 2),
            "prompt": [f"a photo of object {k}" for k in rng.integers(0, n_prompts, n)],
            "image_id": [f"sweep-{i:05d}" for i in range(n)],
            "image_path": [pngs[names[i % len(names)]] for i in range(n)],
            "clip_score": rng.normal(30, 2, n),
            "aesthetic_score": rng.normal(5.5, 0.3, n),
            "aes_v2_score": rng.normal(6.0, 0.3, n),
            "hps_v2_score": rng.normal(0.27, 0.01, n),
        }
    )


def _count(image: Image.Image, rgb: tuple[int, int, int]) -> int:
    return int(np.all(np.asarray(image.convert("RGB")) == rgb, axis=-1).sum())


def _dark_pixels(image: Image.Image) -> int:
    return int((np.asarray(image.convert("L")) < 80).sum())


def test_one_sheet_per_prompt_with_images_and_labels(pngs):
    rows = _rows(400, pngs)
    sheets = build_grid(rows, cell_px=96)
    names = [name for name, _ in sheets]
    assert len(sheets) == 3 and len(set(names)) == 3
    assert names[0].startswith("000_a-photo-of-object-")
    sizes = {im.size for _, im in sheets}
    assert len(sizes) == 1, "every prompt's sheet has the same bins and size"
    width, height = sizes.pop()
    # 6 columns of 96-px images plus padding and a label column; 6 rows plus title, header, labels.
    assert 6 * 96 < width < 6 * 96 + 200
    assert 6 * 96 < height < 6 * (96 + 80) + 150
    for _, sheet in sheets:
        # Every colour source image appears (upscaled to fill its cell).
        assert sum(_count(sheet, rgb) for rgb in COLOURS.values()) > 10 * 96 * 96
        # Labels: dark text under each cell's image (six rows × six cells of settings/score lines).
        assert _dark_pixels(sheet) > 36 * 100


def test_cell_shows_the_image_closest_to_the_cell_centre(pngs):
    rows = pd.DataFrame(
        {
            "steps": [10, 30, 50, 29],
            "guidance": [1.0, 5.0, 9.0, 8.9],
            "prompt": "p",
            "image_id": ["a", "b", "c", "d"],
            "image_path": [pngs["blue"], pngs["red"], pngs["green"], pngs["yellow"]],
            "clip_score": [20.0, 31.25, 25.0, 26.0],
        }
    )
    [(name, sheet)] = build_grid(rows, steps_bins=1, guidance_bins=1, cell_px=64)
    assert name == "000_p"
    # One cell spanning steps 10-50 and guidance 1-9: its centre (30, 5) is row "b" (red).
    assert _count(sheet, COLOURS["red"]) == 64 * 64
    assert _count(sheet, COLOURS["blue"]) == _count(sheet, COLOURS["green"]) == 0


def test_empty_cells_are_grey(pngs):
    rows = _rows(300, pngs, n_prompts=1)
    # Leave the high-steps, low-guidance corner empty.
    rows = rows[~((rows["steps"] > 50) & (rows["guidance"] < 3.0))]
    [(_, sheet)] = build_grid(rows, cell_px=64)
    assert _count(sheet, EMPTY_GREY) >= 64 * 64 * 0.8


def test_missing_file_is_marked_not_fatal(pngs, tmp_path):
    rows = _rows(60, pngs, n_prompts=1)
    rows["image_path"] = str(tmp_path / "gone.png")
    [(_, sheet)] = build_grid(rows, cell_px=64)
    assert sum(_count(sheet, rgb) for rgb in COLOURS.values()) == 0
    assert _count(sheet, EMPTY_GREY) > 0


def test_large_sweep_is_tiled_within_the_size_limit(pngs):
    rows = _rows(5000, pngs, n_prompts=2, seed=1)
    sheets = build_grid(rows, steps_bins=30, guidance_bins=30, cell_px=128, max_side_px=1024)
    assert all(im.width <= 1024 and im.height <= 1024 for _, im in sheets)
    per_prompt = {}
    for name, _ in sheets:
        base, tile = name.rsplit("_", 1)
        assert tile.startswith("r") and "c" in tile
        per_prompt.setdefault(base, []).append(tile)
    assert len(per_prompt) == 2
    tiles = next(iter(per_prompt.values()))
    assert len(tiles) > 1 and all(len(t) == len(tiles) for t in per_prompt.values())
    # Cells were first shrunk to the 64-px floor: 30 columns do not fit at that size either.
    assert "r1c1" in tiles and "r1c2" in tiles and "r2c1" in tiles


def test_moderate_sweep_is_downscaled_into_one_sheet(pngs):
    rows = _rows(800, pngs, n_prompts=1)
    [(name, sheet)] = build_grid(rows, steps_bins=6, guidance_bins=6, cell_px=256, max_side_px=900)
    assert "_r" not in name
    assert sheet.width <= 900 and sheet.height <= 900
    assert sheet.width < 6 * 256  # cells were shrunk from 256 px ...
    assert max(sheet.size) > 850  # ... only as far as the limit needs


def test_write_grids_writes_pngs_atomically(pngs, tmp_path):
    rows = _rows(200, pngs, n_prompts=2)
    out = tmp_path / "grids"
    paths = write_grids(rows, out, cell_px=64)
    assert [p.name for p in paths] == [f"{name}.png" for name, _ in iter_grids(rows, cell_px=64)]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 6 * 64
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)


def test_bad_input_is_rejected(pngs):
    rows = _rows(20, pngs)
    with pytest.raises(ValueError, match="image_path"):
        build_grid(rows.drop(columns=["image_path"]))
    with pytest.raises(ValueError, match="max_side_px"):
        build_grid(rows, max_side_px=100)
    with pytest.raises(ValueError, match="min_cell_px"):
        build_grid(rows, cell_px=32, min_cell_px=64)


@pytest.mark.parametrize("cell_px", [64, 96, 128, 200])
def test_every_cell_label_shows_every_score_at_its_widest(cell_px):
    """The label's lines are laid out for the widest values a score can print, so no score (HPS,
    the last one) falls off the cell, whatever the size."""
    from flexyface_pipeline.lib.analysis.stats import make_bins
    from flexyface_pipeline.lib.config import METRICS
    from flexyface_pipeline.lib.grid import _layout, cell_label

    s_bins = make_bins(pd.Series([4, 60]), 2, integer=True)
    g_bins = make_bins(pd.Series([0.5, 12.0]), 2, integer=False)
    layout = _layout(cell_px, list(METRICS), s_bins, g_bins)
    assert [c for group in layout.score_lines for c in group] == list(METRICS)
    for values in ([-0.000123] * 4, [-1.23e-05, 12.3456, -7.5, -0.0123], [0.25, 5.5, 6.25, 0.275], [None] * 4):
        row = pd.Series({"steps": 60, "guidance": 11.75, **dict(zip(METRICS, values))})
        lines = cell_label(row, 12, layout)
        assert len(lines) == layout.label_lines
        text = " ".join(lines)
        for abbreviation in ("clip", "aes", "av2", "hps"):
            assert f"{abbreviation} " in text, (cell_px, values, lines)
        # Nothing was cut: no line ends in an ellipsis.
        assert not any(line.endswith("…") for line in lines[1:]), lines
