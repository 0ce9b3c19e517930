"""Where the glyphs of `benchmarks/invariance.py`'s items fall on the 14 px patch grid, per text shift and scale.

For each shift (right and down, as the benchmark; `--shift-axes x` or `y` for one direction) and each scale, prints
the share of the items whose text puts two glyph ink centres into one 14 px patch column (the sub-cell the first
tower's one-slot pre-training target left out of its loss, `training/pretrain_vision.py`'s `glyph_slots`), the
share with a centre within 1.5 px of a patch column border, and the share whose centres fall into more than one
28 px token row. No model is needed: the geometry is that of the benchmark's own items (after the processor's
resampling, for the scales).

    python experiments/reading/glyph_columns.py
    python experiments/reading/glyph_columns.py --items 140 --seed 0 --shift-axes x
"""

import argparse
import runpy
import sys
from pathlib import Path

from nativevl.demo import READING
from nativevl.evaluation.synth_rc import _font
from nativevl.processing import smart_resize
from nativevl.training.pretrain_vision import ink_centres


BENCH = runpy.run_path(str(Path(__file__).resolve().parents[2] / "benchmarks" / "invariance.py"))
PATCH, TOKEN = 14, 28


def centres(key: str, width: int, height: int, shift: int, axes: str) -> list[tuple[float, float]]:
    """The (x, y) ink centres, in px of the unscaled image, of the glyphs of item `key` at `shift`: from where the
    benchmark drew its text (`text_box`) and the font's metrics."""
    text_size = READING["text_size"]
    _, record = BENCH["shifted_item"](key, width, height, shift, text_size, READING["rc_contents"], axes)
    text, (x, y, _, _) = record["answers"][0], record["text_box"]
    font = _font(text_size)
    x0, y0, _, _ = font.getbbox(text)  # the text is drawn at (x - x0, y - y0) so that its ink starts at (x, y)
    return [(cx, cy) for _, cx, cy in ink_centres(font, text, (x - x0, y - y0))]


def shares(keys, shift: int, scale: float, axes: str) -> dict:
    """% of items with two centres in one patch column, a centre near a column border, centres in two token rows."""
    doubled = near = split = 0
    for key, w, h in keys:
        rh, rw = smart_resize(round(h * scale), round(w * scale), TOKEN, 784, 448 * 448)
        fx, fy = rw / w, rh / h  # the benchmark resizes by `scale`, the processor then to multiples of 28
        points = [(x * fx, y * fy) for x, y in centres(key, w, h, shift, axes)]
        columns = [int(x // PATCH) for x, _ in points]
        doubled += len(set(columns)) < len(columns)
        near += any(min(x % PATCH, PATCH - x % PATCH) < 1.5 for x, _ in points)
        split += len({int(y // TOKEN) for _, y in points}) > 1
    n = len(keys)
    return {"two_in_a_column": 100 * doubled / n, "near_a_border": 100 * near / n, "two_token_rows": 100 * split / n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=140)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift-axes", choices=("xy", "x", "y"), default="xy")
    args = parser.parse_args(argv)
    keys = BENCH["item_keys"](args.items, args.seed, READING["text_size"], READING["rc_contents"])
    print("setting | two centres in one 14 px column % | a centre within 1.5 px of a column border % | "
          "centres in two 28 px token rows %")  # fmt: skip
    settings = [(f"shift {d}", d, 1.0) for d in BENCH["SHIFTS"]] + [(f"scale {s}", 0, s) for s in BENCH["SCALES"]]
    for name, shift, scale in settings:
        s = shares(keys, shift, scale, args.shift_axes)
        print(f"{name} | {s['two_in_a_column']:.1f} | {s['near_a_border']:.1f} | {s['two_token_rows']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
