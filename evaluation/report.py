"""Per-cell CSV and heatmap PNG of RC-Bench grids (7 area bins x 5 aspect bins, NativeRes-LLaVA arXiv 2506.12776).

Heatmaps are drawn with Pillow alone (matplotlib is not a nativevl dependency), using the font Pillow ships.
"""

import csv
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from nativevl.evaluation.metrics import AREA_BINS, AREA_EDGES, ASPECT_BINS, GRID_SHAPE


Grid = Sequence[Sequence[float | None]]

AREA_LABELS = ("<1", "1-2", "2-4", "4-8", "8-16", "16-24", ">=24")  # units of 384x384 px
ASPECT_LABELS = ("r<1/4", "1/4-1/2", "1/2-2", "2-4", "r>4")  # r = width / height
assert len(AREA_LABELS) == len(AREA_EDGES) + 1

_SEQUENTIAL = ((247, 251, 255), (107, 174, 214), (8, 48, 107))  # light to dark blue
_DIVERGING = ((178, 24, 43), (247, 247, 247), (33, 102, 172))  # negative red, zero white, positive blue
_EMPTY = (215, 215, 215)


def _check_grid(grid: Grid) -> None:
    if len(grid) != GRID_SHAPE[0] or any(len(row) != GRID_SHAPE[1] for row in grid):
        shape = (len(grid), [len(row) for row in grid])
        raise ValueError(f"grid must be {GRID_SHAPE[0]} rows x {GRID_SHAPE[1]} columns, got {shape}")


def write_cell_csv(grid: Grid, path: str | Path, counts: Grid | None = None, value_name: str = "accuracy") -> None:
    """Writes one row per cell: area_bin, aspect_bin, `value_name` (empty for None)[, count]."""
    _check_grid(grid)
    if counts is not None:
        _check_grid(counts)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["area_bin", "aspect_bin", value_name] + (["count"] if counts is not None else []))
        for i, area in enumerate(AREA_BINS):
            for j, aspect in enumerate(ASPECT_BINS):
                value = grid[i][j]
                row = [area, aspect, "" if value is None else value]
                writer.writerow(row + ([counts[i][j]] if counts is not None else []))


def grid_difference(a: Grid, b: Grid) -> list[list[float | None]]:
    """Cellwise a - b (e.g. Native minus Crop), None where either cell is None."""
    _check_grid(a)
    _check_grid(b)
    return [[None if x is None or y is None else x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def _lerp(stops: tuple, t: float) -> tuple[int, int, int]:
    """Colour at t in [0, 1] on a 3-stop ramp."""
    t = min(max(t, 0.0), 1.0) * 2
    lo, hi, t = (stops[0], stops[1], t) if t <= 1 else (stops[1], stops[2], t - 1)
    return tuple(round(a + (b - a) * t) for a, b in zip(lo, hi))


def _format(value: float, diverging: bool) -> str:
    if isinstance(value, int):
        return f"{value:+d}" if diverging else str(value)
    return f"{value:+.1f}" if diverging else f"{value:.1f}"


def render_heatmap(
    grid_values: Grid,
    path: str | Path,
    title: str,
    diverging: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """Renders a 7x5 grid (rows AREA_BINS, columns ASPECT_BINS; None = empty cell, grey) as a PNG heatmap.

    Sequential (default): white to dark blue over [vmin, vmax], default [min(0, lowest), highest]; pass
    vmin=0, vmax=100 for accuracies so maps of different models compare. `diverging=True` is for difference maps
    (e.g. Native minus Crop): red below 0, white at 0, blue above, symmetric range default +-max|value|.
    """
    _check_grid(grid_values)
    values = [v for row in grid_values for v in row if v is not None]
    if diverging:
        bound = max([abs(v) for v in values] + [1e-9])
        vmin, vmax = (-bound if vmin is None else vmin), (bound if vmax is None else vmax)
    else:
        vmin = min(values + [0]) if vmin is None else vmin
        vmax = max(values + [vmin]) if vmax is None else vmax
    span = max(vmax - vmin, 1e-9)
    stops = _DIVERGING if diverging else _SEQUENTIAL

    cell_w, cell_h, left, top = 92, 42, 120, 64
    width, height = left + cell_w * GRID_SHAPE[1] + 20, top + cell_h * GRID_SHAPE[0] + 110
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small, bold = (ImageFont.load_default(size=s) for s in (15, 12, 18))
    draw.text((width // 2, 20), title, font=bold, fill="black", anchor="mm")
    draw.text((8, top - 8), "area (x384^2 px)", font=small, fill="black", anchor="ls")

    for i, area in enumerate(AREA_BINS):
        y = top + i * cell_h
        draw.text((8, y + cell_h // 2), f"{area}  {AREA_LABELS[i]}", font=font, fill="black", anchor="lm")
        for j, value in enumerate(grid_values[i]):
            x = left + j * cell_w
            colour = _EMPTY if value is None else _lerp(stops, (value - vmin) / span)
            draw.rectangle((x, y, x + cell_w - 2, y + cell_h - 2), fill=colour)
            luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
            text = "-" if value is None else _format(value, diverging)
            centre = (x + cell_w // 2 - 1, y + cell_h // 2 - 1)
            draw.text(centre, text, font=font, fill="white" if luminance < 128 else "black", anchor="mm")

    y = top + GRID_SHAPE[0] * cell_h + 4
    for j, aspect in enumerate(ASPECT_BINS):
        x = left + j * cell_w + cell_w // 2
        draw.text((x, y), aspect, font=font, fill="black", anchor="mt")
        draw.text((x, y + 18), ASPECT_LABELS[j], font=small, fill="black", anchor="mt")
    axis_title = "aspect ratio r = width / height"
    draw.text((left + cell_w * GRID_SHAPE[1] // 2, y + 38), axis_title, font=small, fill="black", anchor="mt")

    bar_y, bar_w = y + 62, cell_w * GRID_SHAPE[1]
    for k in range(bar_w):
        draw.line((left + k, bar_y, left + k, bar_y + 12), fill=_lerp(stops, k / (bar_w - 1)))
    draw.text((left, bar_y + 16), _format(vmin, diverging), font=small, fill="black", anchor="lt")
    draw.text((left + bar_w, bar_y + 16), _format(vmax, diverging), font=small, fill="black", anchor="rt")
    image.save(path)
