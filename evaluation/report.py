"""Reports of RC-Bench grids (7 area bins x 5 aspect bins, NativeRes-LLaVA arXiv 2506.12776): per-cell CSV,
heatmap PNG, the files a run ends with (`write_reports`), the readable table of a run (`print_report`), two runs
side by side with their difference map (`compare`) and how a dataset spreads over the grid (`profile`).

Heatmaps are drawn with Pillow alone (matplotlib is not a nativevl dependency), using the font Pillow ships.
"""

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from nativevl.evaluation.data import EvalInputError, dataset_sizes
from nativevl.evaluation.metrics import AREA_BINS, AREA_EDGES, ASPECT_BINS, GRID_SHAPE, RCSummary, profile_dataset
from nativevl.runs import atomic_write


Grid = Sequence[Sequence[float | None]]

AREA_LABELS = ("<1", "1-2", "2-4", "4-8", "8-16", "16-24", ">=24")  # units of 384x384 px
ASPECT_LABELS = ("r<1/4", "1/4-1/2", "1/2-2", "2-4", "r>4")  # r = width / height
assert len(AREA_LABELS) == len(AREA_EDGES) + 1

_SEQUENTIAL = ((247, 251, 255), (107, 174, 214), (8, 48, 107))  # light to dark blue
_DIVERGING = ((178, 24, 43), (247, 247, 247), (33, 102, 172))  # negative red, zero white, positive blue
_EMPTY = (215, 215, 215)
SCORES, CELLS, HEATMAP = "scores.json", "cells.csv", "heatmap.png"  # the reports in a run folder


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


def write_reports(out_dir: Path, scores: dict, mode: str, blank_images: bool) -> None:
    """scores.json, the per-cell CSV and the heatmap of a run, each complete or absent."""
    atomic_write(out_dir / SCORES, lambda path: path.write_text(json.dumps(scores, indent=2) + "\n"))
    atomic_write(
        out_dir / CELLS, lambda path: write_cell_csv(scores["cell_accuracy"], path, counts=scores["cell_count"])
    )
    title = f"{out_dir.name}: Acc {scores['accuracy']:.1f} ({mode}{', blank images' if blank_images else ''})"
    atomic_write(
        out_dir / HEATMAP, lambda path: render_heatmap(scores["cell_accuracy"], path, title, vmin=0, vmax=100)
    )


def _fmt(value: float | None, width: int = 7, signed: bool = False) -> str:
    if value is None:
        return "-".rjust(width)
    return f"{value:+{width}.1f}" if signed else f"{value:{width}.1f}"


def _scores_dict(scores: Mapping | RCSummary) -> Mapping:
    return scores.to_dict() if isinstance(scores, RCSummary) else scores


def print_report(scores: Mapping | RCSummary) -> str:
    """A readable per-bin table of a scores.json dict (or an `RCSummary`): rows area bins A..G, columns aspect bins,
    each cell "accuracy (n)", with bin totals and Acc / ACV / RCV. Returns the text (the caller prints it)."""
    s = _scores_dict(scores)
    head = f"Acc {_fmt(s['accuracy'], 0)}  ACV {_fmt(s['acv'], 0)}  RCV {_fmt(s['rcv'], 0)}  ({s['count']} items)"
    lines = [head]
    if "mode" in s:
        key = {"native": "max_pixels", "fixed": "fixed_pixels", "crop": "crop_base_size"}[s["mode"]]
        setting = f"{key} {s.get(key)}"
        blank = ", blank images" if s.get("blank_images") else ""
        visual = f"{s['mean_visual_tokens']:.1f} visual tokens per item"
        lines.append(f"model {s.get('model')}  mode {s['mode']} ({setting}{blank}), {visual}")
    cell = 13
    lines.append("")
    lines.append("area (x384^2 px)".ljust(18) + "".join(a.rjust(cell) for a in ASPECT_BINS) + "all".rjust(cell))
    lines.append(" " * 18 + "".join(label.rjust(cell) for label in ASPECT_LABELS))

    def entry(acc, n):
        return (f"{_fmt(acc, 5)} ({n})" if n else "-").rjust(cell)

    for i, area in enumerate(AREA_BINS):
        cells = "".join(entry(acc, n) for acc, n in zip(s["cell_accuracy"][i], s["cell_count"][i]))
        total = entry(s["area_accuracy"][area], s["area_count"][area])
        lines.append(f"{area} {AREA_LABELS[i]:<16}" + cells + total)
    totals = "".join(entry(s["aspect_accuracy"][a], s["aspect_count"][a]) for a in ASPECT_BINS)
    lines.append("all".ljust(18) + totals + entry(s["accuracy"], s["count"]))
    if s.get("kind_accuracy"):
        kinds = ", ".join(f"{k} {s['kind_accuracy'][k]:.1f} ({s['kind_count'][k]})" for k in s["kind_accuracy"])
        lines.append(f"by kind: {kinds}")
    return "\n".join(lines)


def _load_scores(run: str | Path) -> dict:
    path = Path(run) / SCORES
    if not path.is_file():
        raise EvalInputError(f"no {SCORES} in {run}: is it the output folder of `nativevl eval run`?")
    try:
        scores = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{path} is not valid JSON ({err}); rerun `nativevl eval run` into {run}") from None
    if not isinstance(scores, dict) or "cell_accuracy" not in scores:
        raise EvalInputError(f"{path} is not the scores of `nativevl eval run` (no cell_accuracy)")
    return scores


def compare(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None) -> str:
    """Side-by-side table of two runs (Acc, ACV, RCV, every area and aspect bin and kind: A, B and A - B), and the
    A-minus-B cell heatmap (the paper's Native-minus-Crop figure) written to
    `out_dir / f"compare_{a}_vs_{b}.png"` (default `out_dir` = run_a's parent; a, b = the run folder names).
    Returns the table, whose last line names the PNG."""
    run_a, run_b = Path(run_a), Path(run_b)
    a, b = _load_scores(run_a), _load_scores(run_b)
    name_a, name_b = run_a.resolve().name, run_b.resolve().name
    width = max(9, len(name_a), len(name_b)) + 2
    rows: list[tuple[str, float | None, float | None]] = [
        ("Acc", a["accuracy"], b["accuracy"]),
        ("ACV", a["acv"], b["acv"]),
        ("RCV", a["rcv"], b["rcv"]),
    ]
    rows += [
        (f"area {k} {AREA_LABELS[i]}", a["area_accuracy"][k], b["area_accuracy"][k]) for i, k in enumerate(AREA_BINS)
    ]
    rows += [
        (f"aspect {k} {ASPECT_LABELS[j]}", a["aspect_accuracy"][k], b["aspect_accuracy"][k])
        for j, k in enumerate(ASPECT_BINS)
    ]
    for kind in sorted(set(a.get("kind_accuracy", {})) | set(b.get("kind_accuracy", {}))):
        rows.append((f"kind {kind}", a["kind_accuracy"].get(kind), b["kind_accuracy"].get(kind)))
    lines = [f"{'':<22}{name_a:>{width}}{name_b:>{width}}{'A - B':>{width}}"]
    for label, x, y in rows:
        diff = None if x is None or y is None else x - y
        lines.append(f"{label:<22}{_fmt(x, width)}{_fmt(y, width)}{_fmt(diff, width, signed=True)}")
    lines.append(f"{'items':<22}{a['count']:>{width}}{b['count']:>{width}}")
    for key in ("mean_visual_tokens",):
        if key in a and key in b:
            lines.append(f"{'visual tokens / item':<22}{_fmt(a[key], width)}{_fmt(b[key], width)}")
    if a["cell_count"] != b["cell_count"]:
        lines.append("note: the runs scored different items per cell; the difference mixes data and model effects")
    out_dir = Path(out_dir) if out_dir is not None else run_a.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"compare_{name_a}_vs_{name_b}.png"
    diff = grid_difference(a["cell_accuracy"], b["cell_accuracy"])
    render_heatmap(diff, png, f"{name_a} minus {name_b} (accuracy points)", diverging=True)
    lines.append(f"difference heatmap: {png}")
    return "\n".join(lines)


def profile(data_jsonl: str | Path, out_png: str | Path | None = None, allow_outside_paths: bool = False) -> str:
    """Area x aspect histogram of any JSONL dataset (sizes as in `dataset_sizes`) as a text table with row and
    column totals; also rendered to `out_png` (default: next to the data, `<stem>_profile.png`). Returns the table,
    whose last line names the PNG."""
    data_jsonl = Path(data_jsonl)
    sizes = dataset_sizes(data_jsonl, allow_outside_paths)
    counts = profile_dataset(sizes)
    cell = 9
    lines = [f"{data_jsonl}: {len(sizes)} images", ""]
    lines.append("area (x384^2 px)".ljust(18) + "".join(a.rjust(cell) for a in ASPECT_BINS) + "all".rjust(cell))
    lines.append(" " * 18 + "".join(label.rjust(cell) for label in ASPECT_LABELS))
    for i, area in enumerate(AREA_BINS):
        row = counts[i]
        lines.append(f"{area} {AREA_LABELS[i]:<16}" + "".join(f"{n:>{cell}}" for n in row) + f"{sum(row):>{cell}}")
    totals = [sum(row[j] for row in counts) for j in range(len(ASPECT_BINS))]
    lines.append("all".ljust(18) + "".join(f"{n:>{cell}}" for n in totals) + f"{len(sizes):>{cell}}")
    out_png = Path(out_png) if out_png is not None else data_jsonl.with_name(f"{data_jsonl.stem}_profile.png")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    render_heatmap(counts, out_png, f"{data_jsonl.name}: images per cell ({len(sizes)})")
    lines.append(f"heatmap: {out_png}")
    return "\n".join(lines)


__all__ = [
    "AREA_LABELS",
    "ASPECT_LABELS",
    "CELLS",
    "HEATMAP",
    "SCORES",
    "compare",
    "grid_difference",
    "print_report",
    "profile",
    "render_heatmap",
    "write_cell_csv",
    "write_reports",
]
