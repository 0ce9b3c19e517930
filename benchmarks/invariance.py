"""Does a model read text wherever it sits? RC accuracy on the same items with the text shifted and the image scaled.

Items: the demo's reading items (`demo.READING`: a short number, code or word, font size 20, capitals 14 px tall)
in images of the demo's 35 cells at its 1/8 scale, sides rounded to multiples of 28 px. At shift 0 the text starts
TEXT_MARGIN px inside a random 28 px merged-token cell (the demo's `rc_placement="grid"`); shift d moves the same
text by d px right and d px down on the same background (cells and texts are chosen so that every shift fits, so
each shift scores the same items). Scale s resizes the shift-0 image by s (bicubic) before the processor, which
then resamples it to multiples of 28 px, as a photo a few px larger or smaller would be.

Prints accuracy per shift and per scale and max - min of each (a reader that does not depend on the placement: at
most 15 points), and writes them to `--out/invariance.json`.

    python benchmarks/invariance.py --model nativevl-demo/train/final --out /tmp/inv
    python benchmarks/invariance.py --model nativevl-demo/train/final --out /tmp/inv --shifts 0 7 14 21 --items 70
    # which direction matters: the text shifted right only (x) or down only (y), scales skipped
    python benchmarks/invariance.py --model nativevl-demo/train/final --out /tmp/inv-x --shift-axes x --scales
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

from nativevl.demo import READING, SCALE
from nativevl.evaluation.metrics import AREA_BINS, ASPECT_BINS
from nativevl.evaluation.run import evaluate
from nativevl.evaluation.synth_rc import (
    _RC_QUESTIONS,
    TEXT_MARGIN,
    TILE,
    _clutter,
    _font,
    _ink_width,
    _light,
    _rc_text,
    cap_height,
    sample_cell_size,
)


SHIFTS = tuple(range(0, 28, 3))  # px, right and down: 0, 3, ..., 27
SCALES = (0.8, 0.9, 1.0, 1.1, 1.25)
MAX_SHIFT = 27


def shifted_item(
    key: str, width: int, height: int, shift: int, text_size: float, contents, axes: str = "xy"
) -> tuple | None:
    """The item `key` with its text `shift` px right and down of its grid position (`axes` "x": right only, "y":
    down only), or None when the image has no room for the text at every shift 0-MAX_SHIFT. The background, text
    and cell depend only on `key`."""
    rng = random.Random(key)
    font, cap = _font(text_size), cap_height(text_size)
    image = Image.new("RGB", (width, height), _light(rng, 215))
    draw = ImageDraw.Draw(image)
    _clutter(draw, width, height, rng, n=min(40, 3 + width * height // 100_000))
    content, text = _rc_text(rng, contents)
    ink = _ink_width(font, text)
    room_x = width - 2 * TEXT_MARGIN - ink - MAX_SHIFT
    room_y = height - 2 * TEXT_MARGIN - cap - MAX_SHIFT
    if room_x < 0 or room_y < 0:
        return None
    x0, y0, _, _ = font.getbbox(text)
    x = TEXT_MARGIN + TILE * rng.randint(0, room_x // TILE) + (shift if "x" in axes else 0)
    y = TEXT_MARGIN + TILE * rng.randint(0, room_y // TILE) + (shift if "y" in axes else 0)
    draw.text((x - x0, y - y0), text, font=font, fill=tuple(rng.randint(0, 70) for _ in range(3)))
    record = {"question": _RC_QUESTIONS[content], "answers": [text], "content": content, "metric": "exact_match"}
    return image, record | {"text_box": [x, y, x + ink, y + cap]}  # the ink's first column and row, as synth_rc's


def item_keys(items: int, seed: int, text_size: float, contents) -> list[tuple[str, int, int]]:
    """`items` (key, width, height) drawn round-robin over the 35 cells at the demo's scale (sides rounded to
    multiples of 28 px), keeping only those with room for every shift."""
    keys, index = [], 0
    while len(keys) < items:
        if index > 200 * items:
            raise ValueError(f"found only {len(keys)} of {items} items with room for a {MAX_SHIFT} px shift")
        cell = index % 35
        area, aspect = AREA_BINS[cell // 5], ASPECT_BINS[cell % 5]
        key = f"nativevl-invariance/{seed}/{area}/{aspect}/{index // 35}"
        w, h = sample_cell_size(area, aspect, random.Random(key))
        w, h = (max(TILE, round(s * SCALE / TILE) * TILE) for s in (w, h))
        if shifted_item(key, w, h, 0, text_size, contents) is not None:
            keys.append((key, w, h))
        index += 1
    return keys


def write_set(
    folder: Path, keys, shift: int, scale: float, text_size: float, contents, axes: str = "xy"
) -> list[dict]:
    """The items at one (shift along `axes`, scale) as PNGs under `folder` and their records."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (key, w, h) in enumerate(keys):
        image, record = shifted_item(key, w, h, shift, text_size, contents, axes)
        if scale != 1.0:
            image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        path = folder / f"{i:04d}.png"
        image.save(path, compress_level=1)
        records.append(record | {"id": f"{i:04d}", "image": path.name, "kind": "rc"})
    return records


def measure(
    model, processor, out: Path, items: int, seed: int, shifts, scales, batch_size: int = 16, axes: str = "xy"
) -> dict:
    """Accuracy (%) per shift along `axes` (scale 1) and per scale (shift 0), and max - min of each."""
    text_size, contents = READING["text_size"], READING["rc_contents"]
    keys = item_keys(items, seed, text_size, contents)
    settings = [("shift", d, d, 1.0) for d in shifts] + [("scale", s, 0, s) for s in scales]
    result = {"items": len(keys), "shift_axes": axes, "shift": {}, "scale": {}}
    for axis, value, shift, scale in settings:
        name = f"{axis}-{value}"
        records = write_set(out / "data" / name, keys, shift, scale, text_size, contents, axes)
        scores = evaluate(
            model, processor, records, out / "runs" / name, batch_size=batch_size, max_new_tokens=8,
            progress=False, overwrite=True, image_root=out / "data" / name,
        )  # fmt: skip
        result[axis][str(value)] = round(scores["accuracy"], 1)
        print(f"  {axis} {value}: RC {scores['accuracy']:5.1f}", flush=True)
    for axis in ("shift", "scale"):
        accs = list(result[axis].values())
        result[f"{axis}_spread"] = round(max(accs) - min(accs), 1) if accs else None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a nativevl model folder (e.g. a demo's train/final)")
    parser.add_argument("--out", required=True, help="folder for the images, runs and invariance.json")
    parser.add_argument("--items", type=int, default=140, help="RC items (the same at every shift and scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the items")
    parser.add_argument("--shifts", type=int, nargs="+", default=list(SHIFTS), help=f"px, 0-{MAX_SHIFT}")
    parser.add_argument(
        "--shift-axes", choices=("xy", "x", "y"), default="xy",
        help="shift the text right and down (xy, the benchmark), right only (x) or down only (y)",
    )  # fmt: skip
    parser.add_argument(
        "--scales", type=float, nargs="*", default=list(SCALES), help="image scale factors (none: shifts only)"
    )
    args = parser.parse_args(argv)
    if args.items < 1 or any(not 0 <= d <= MAX_SHIFT for d in args.shifts) or any(s <= 0 for s in args.scales):
        parser.error(f"need --items >= 1, shifts in 0-{MAX_SHIFT}, scales > 0; got {args.items}, {args.shifts}, "
                     f"{args.scales}")  # fmt: skip
    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    out = Path(args.out)
    print(f"RC accuracy of {args.model} on {args.items} items (seed {args.seed}):", flush=True)
    result = measure(model, processor, out, args.items, args.seed, args.shifts, args.scales, axes=args.shift_axes)
    print(f"max - min over shifts: {result['shift_spread']} points; over scales: {result['scale_spread']} points")
    (out / "invariance.json").write_text(json.dumps({"model": args.model} | result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
