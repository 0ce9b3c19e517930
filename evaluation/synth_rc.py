"""Synthetic resolution-centric benchmark balanced over the 35 RC-Bench cells (nativevl's own, not RC-Bench).

NativeRes-LLaVA (arXiv 2506.12776) finds that native resolution helps resolution-centric (RC) questions, whose
answer is small text, and does not matter for semantic-centric (SC) ones. RC-Bench was not released; this
generator builds a benchmark with the same 7 area x 5 aspect grid (`nativevl.evaluation.metrics`) and both kinds:

- "rc": a number, date, code or short phrase in dark capitals at a FIXED font size (`text_size`, default 20 px;
  capitals and digits are then 14 px tall) at a random place on a light, mildly cluttered background. Reading it
  needs resolution: the more an image is downscaled, the smaller the text.
  With `rc_contents` containing "tile" (not by default), an RC item may instead be a mosaic of 28 px squares
  asking for the top-left square's colour: a detail one merged token wide that pooling (or downscaling) mixes
  with differently coloured neighbours, and the easiest resolution-critical task for models too small to read.
- "sc": content that survives downscaling: the dominant background colour (from `PALETTE`) or which large shape
  (`SHAPES`) is drawn.

Sizes: each cell's nominal size is sampled log-uniformly inside the bin (area A from 0.5 units, G capped at
`max_area`, default 32 units; aspect ratios BH and BW capped at 1/6 and 6) and checked with `area_bin`/`aspect_bin`.
`scale` multiplies both sides so a CPU demo keeps the 35-cell structure with tiny images; records then store the
actual `width`/`height` and the `nominal_width`/`nominal_height` and are binned on the nominal size.

Only the font Pillow ships is used (`ImageFont.load_default(size=...)`, Pillow >= 10.1 with FreeType).

Example (35 cells x 1 item x 2 kinds at 1/8 linear scale, under a second)::

    python -c "from nativevl.evaluation import generate_benchmark; generate_benchmark('rc_demo', 1, scale=1/8)"
"""

import functools
import json
import math
import numbers
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from nativevl.evaluation.metrics import AREA_BINS, AREA_UNIT, ASPECT_BINS, area_bin, aspect_bin
from nativevl.runs import atomic_output_dir


KINDS = ("rc", "sc")
AREA_RANGES = {"A": (0.5, 1), "B": (1, 2), "C": (2, 4), "D": (4, 8), "E": (8, 16), "F": (16, 24), "G": (24, 32)}
ASPECT_RANGES = {"BH": (1 / 6, 1 / 4), "AH": (1 / 4, 1 / 2), "NM": (1 / 2, 2), "AW": (2, 4), "BW": (4, 6)}
DEFAULT_TEXT_SIZE = 20  # px font size at scale 1 (Pillow's Aileron: capitals and digits 14 px tall)
MIN_TEXT_SIZE = 10  # px font size floor when scaling down (capitals 8 px tall)
TEXT_MARGIN = 2  # px kept free between the text and the image border
PALETTE = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 200, 30),
    "orange": (240, 130, 20),
    "purple": (130, 50, 170),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# Capitals and digits that share the cap line and the baseline in Aileron (no Q or "/", which reach below).
_CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # also without I and O, easily read as 1 and 0
_MONTHS = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
_WORDS = (
    "RED FOX BLUE MOON GOLD STAR SILVER RIVER GREEN PARK NORTH GATE WEST WING OPEN DOOR FAST LANE OLD TOWN "
    "DARK ROAD NEW PORT SUN CITY HIGH STREET LAKE VIEW STONE BRIDGE"
).split()
_SHORT_WORDS = (
    "SUN MAP KEY BOX CAT DOG RED SEA SKY OAK BUS CUP PEN INK HAT JAM LOG NET OWL RUN TEN VAN WAX ZOO ARM BAY "
    "FIG GUM HEN ICE"
).split()
_RC_QUESTIONS = {
    "tile": "What colour is the tile in the top-left corner? Answer with one word.",
    "digit": "What is the digit written in the image?",
    "number": "What is the number written in the image?",
    "date": "What date is written in the image?",
    "code": "What is the code written in the image?",
    "phrase": "What words are written in the image?",
    "short_number": "What is the number written in the image?",
    "short_code": "What is the code written in the image?",
    "word": "What word is written in the image?",
}
_COLOR_QUESTION = "What is the main colour of this image? Answer with one word."
_SHAPE_QUESTION = "Which shape is shown in the image: a circle, a square or a triangle? Answer with one word."


@functools.lru_cache(maxsize=32)
def _font(size: float) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError(f"Pillow without FreeType cannot size its default font (got {type(font).__name__})")
    return font


def cap_height(text_size: float) -> int:
    """Pixel height of capitals and digits rendered at font size `text_size`."""
    top, bottom = _font(text_size).getbbox("0123456789" + _CODE_LETTERS)[1::2]
    return bottom - top


def default_text_size(scale: float) -> int:
    """Font size used at `scale`: DEFAULT_TEXT_SIZE scaled, but never below MIN_TEXT_SIZE so text stays legible."""
    return max(MIN_TEXT_SIZE, round(DEFAULT_TEXT_SIZE * scale))


def sample_cell_size(area: str, aspect: str, rng: random.Random, max_area: float | None = None) -> tuple[int, int]:
    """(width, height) in px whose `area_bin` and `aspect_bin` are `area` and `aspect`; log-uniform inside the bin
    (ranges in AREA_RANGES / ASPECT_RANGES; `max_area` in 384x384 units replaces G's cap of 32)."""
    if area not in AREA_RANGES or aspect not in ASPECT_RANGES:
        raise ValueError(f"unknown cell ({area!r}, {aspect!r}); expected one of {AREA_BINS} x {ASPECT_BINS}")
    lo, hi = AREA_RANGES[area]
    if area == "G" and max_area is not None:
        if max_area <= lo:
            raise ValueError(f"max_area must exceed {lo} units (bin G starts there), got {max_area}")
        hi = max_area
    r_lo, r_hi = ASPECT_RANGES[aspect]
    for _ in range(100):
        units = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        ratio = math.exp(rng.uniform(math.log(r_lo), math.log(r_hi)))
        width, height = round(math.sqrt(units * AREA_UNIT * ratio)), round(math.sqrt(units * AREA_UNIT / ratio))
        if area_bin(width, height) == area and aspect_bin(width, height) == aspect:
            return width, height
    raise AssertionError(f"no size found for cell ({area}, {aspect}) in 100 draws")


RC_CONTENTS = tuple(_RC_QUESTIONS)
DEFAULT_RC_CONTENTS = ("number", "date", "code", "phrase")  # "tile" and "digit" (one character) when asked for
TILE = 28  # px side of a "tile" item's squares: one merged token (patch 14 x merge 2) of an unresampled image
RC_PLACEMENTS = ("random", "corner", "grid")


def _rc_text(rng: random.Random, contents: Sequence[str] = DEFAULT_RC_CONTENTS) -> tuple[str, str]:
    """(content type, text) of a random RC item whose content type is one of `contents`."""
    kind = rng.choice(tuple(contents))
    if kind == "digit":  # "7"
        return kind, str(rng.randint(0, 9))
    if kind == "number":  # "48213" or "731.05"
        integer = rng.randint(10, 999_999)
        return kind, str(integer) if rng.random() < 0.7 else f"{integer // 100}.{rng.randint(0, 99):02d}"
    if kind == "date":  # "2021-03-14", "14.03.2021" or "14 MAR 2021"
        y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
        return kind, rng.choice((f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}", f"{d} {_MONTHS[m - 1]} {y}"))
    if kind == "code":  # "KX-4821" or "4K82X1"
        letters = "".join(rng.choice(_CODE_LETTERS) for _ in range(2))
        digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(2, 4)))
        mixed = "".join(rng.sample(letters + digits, len(letters) + len(digits)))
        return kind, f"{letters}-{digits}" if rng.random() < 0.5 else mixed
    if kind == "short_number":  # "47" or "305"
        return kind, str(rng.randint(10, 999))
    if kind == "short_code":  # "K42"
        return kind, rng.choice(_CODE_LETTERS) + "".join(rng.choice(string.digits) for _ in range(2))
    if kind == "word":  # "OWL"
        return kind, rng.choice(_SHORT_WORDS)
    return kind, " ".join(rng.sample(_WORDS, 2))  # "SILVER MOON"


def _light(rng: random.Random, low: int = 175) -> tuple[int, int, int]:
    return tuple(rng.randint(low, 250) for _ in range(3))


def _clutter(draw: ImageDraw.ImageDraw, width: int, height: int, rng: random.Random, n: int) -> None:
    """n light rectangles, ellipses and lines (every channel >= 175, so dark text stays the only dark ink)."""
    for _ in range(n):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(1, max(1, width // 4)), y0 + rng.randint(1, max(1, height // 4))
        shape = rng.choice(("rectangle", "ellipse", "line"))
        if shape == "line":
            draw.line((x0, y0, x1, y1), fill=_light(rng), width=rng.randint(1, 3))
        else:
            getattr(draw, shape)((x0, y0, x1, y1), fill=_light(rng))


def _ink_width(font: ImageFont.FreeTypeFont, text: str) -> int:
    x0, _, x1, _ = font.getbbox(text)
    return x1 - x0


def _make_tile(width: int, height: int, rng: random.Random) -> tuple[Image.Image, dict]:
    """A mosaic of TILE-px squares in random PALETTE colours (jittered), starting at the top-left pixel; the answer
    is the top-left square's colour, and its right, lower and diagonal neighbours never share it. Squares at the
    right and bottom borders (all of them in an image under TILE px) are cut off."""
    names = tuple(PALETTE)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    answer = rng.choice(names)
    for row in range(math.ceil(height / TILE)):
        for col in range(math.ceil(width / TILE)):
            if (row, col) == (0, 0):
                name = answer
            else:
                name = rng.choice([n for n in names if n != answer] if row <= 1 and col <= 1 else names)
            fill = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in PALETTE[name])
            draw.rectangle((col * TILE, row * TILE, col * TILE + TILE - 1, row * TILE + TILE - 1), fill=fill)
    return image, {"question": _RC_QUESTIONS["tile"], "answers": [answer], "content": "tile"}


def _text_sizes(text_size) -> float | tuple[int, int]:
    """A font size, or a (low, high) range of integer sizes, checked: positive, low <= high."""
    if isinstance(text_size, numbers.Real):
        if text_size <= 0:
            raise ValueError(f"text_size must be positive, got {text_size}")
        return text_size
    sizes = tuple(text_size)
    if len(sizes) != 2 or not all(isinstance(v, numbers.Integral) for v in sizes) or not 0 < sizes[0] <= sizes[1]:
        raise ValueError(f"text_size must be a number or two integers 0 < low <= high, got {text_size!r}")
    return int(sizes[0]), int(sizes[1])


def _make_rc(
    width: int,
    height: int,
    rng: random.Random,
    text_size: float | tuple[int, int],
    contents: Sequence[str],
    placement: str,
) -> tuple[Image.Image, dict]:
    if "tile" in contents:  # (drawn first only then, so text-only benchmarks keep their random sequence)
        if rng.choice(tuple(contents)) == "tile":
            return _make_tile(width, height, rng)
        contents = [c for c in contents if c != "tile"]
    sized = {}
    if isinstance(text_size, tuple):  # (drawn only then, so fixed-size benchmarks keep their random sequence)
        text_size = rng.randint(*text_size)
        sized = {"text_size": text_size}
    font, cap = _font(text_size), cap_height(text_size)
    if cap + 2 * TEXT_MARGIN > height:
        raise ValueError(f"a {width}x{height} image cannot hold text {cap} px tall (text_size={text_size})")
    # Up to 8 random texts, then ever shorter numbers for the narrowest images.
    candidates = [_rc_text(rng, contents) for _ in range(8)]
    candidates += [("number", str(rng.randint(10**k, 10 ** (k + 1) - 1))) for k in (2, 1, 0)]
    fitting = [(c, t) for c, t in candidates if _ink_width(font, t) + 2 * TEXT_MARGIN <= width]
    if not fitting:
        raise ValueError(f"a {width}x{height} image cannot hold one digit at text_size={text_size}")
    content, text = fitting[0]
    x0, y0, x1, y1 = font.getbbox(text)
    image = Image.new("RGB", (width, height), _light(rng, 215))
    draw = ImageDraw.Draw(image)
    _clutter(draw, width, height, rng, n=min(40, 3 + width * height // 100_000))
    x = rng.randint(TEXT_MARGIN, width - TEXT_MARGIN - (x1 - x0))
    y = rng.randint(TEXT_MARGIN, height - TEXT_MARGIN - cap)
    if placement == "corner":  # like a date stamp: always at the top-left, TEXT_MARGIN px from both borders
        x = y = TEXT_MARGIN
    elif placement == "grid":  # a random TILE-px cell, TEXT_MARGIN px in from its top-left corner
        x = TEXT_MARGIN + TILE * rng.randint(0, (width - 2 * TEXT_MARGIN - (x1 - x0)) // TILE)
        y = TEXT_MARGIN + TILE * rng.randint(0, (height - 2 * TEXT_MARGIN - cap) // TILE)
    draw.text((x - x0, y - y0), text, font=font, fill=tuple(rng.randint(0, 70) for _ in range(3)))
    record = {"question": _RC_QUESTIONS[content], "answers": [text], "content": content}
    return image, record | {"text_box": [x, y, x + x1 - x0, y + y1 - y0]} | sized


def _make_sc(width: int, height: int, rng: random.Random) -> tuple[Image.Image, dict]:
    if rng.random() < 0.5:
        name = rng.choice(tuple(PALETTE))
        background = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in PALETTE[name])
        image = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(0, 4)):  # small light specks, each at most 1/5 of each side
            x0, y0 = rng.randrange(width), rng.randrange(height)
            draw.ellipse((x0, y0, x0 + width // 5, y0 + height // 5), fill=_light(rng, 200))
        return image, {"question": _COLOR_QUESTION, "answers": [name], "content": "color"}
    shape = rng.choice(SHAPES)
    image = Image.new("RGB", (width, height), _light(rng, 215))
    draw = ImageDraw.Draw(image)
    _clutter(draw, width, height, rng, n=3)
    side = max(1, round(rng.uniform(0.55, 0.8) * min(width, height)))
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    fill = PALETTE[rng.choice(tuple(PALETTE))]
    if shape == "circle":
        draw.ellipse((x, y, x + side - 1, y + side - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=fill)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)
    return image, {"question": _SHAPE_QUESTION, "answers": [shape], "content": "shape"}


def make_item(
    kind: str,
    width: int,
    height: int,
    rng: random.Random,
    text_size: float | tuple[int, int] = DEFAULT_TEXT_SIZE,
    rc_contents: Sequence[str] = DEFAULT_RC_CONTENTS,
    rc_placement: str = "random",
) -> tuple[Image.Image, dict]:
    """One synthetic item of `kind` ("rc" or "sc") as a `width` x `height` RGB image and its record.

    The record holds `question`, `answers` (one string), `metric` ("exact_match": every answer has at most 3
    words), `kind`, `content` (tile/digit/number/date/code/phrase or color/shape) and, for text, `text_box` = [x0, y0,
    x1, y1] in px: rows exactly those of the ink (height `cap_height(text_size)`), columns from the font metrics
    (may include 1-3 px of side bearing). `text_size`: the font size in px, or (low, high): an integer size drawn
    per item from that range (inclusive), recorded as the record's `text_size`. `rc_contents`: the RC content types
    to draw from; `rc_placement`: "random" (anywhere), "corner" (top-left, TEXT_MARGIN px in, like a date stamp) or
    "grid" (TEXT_MARGIN px in from the corner of a random TILE-px cell: on an unresampled `snap=28` image the text
    starts at the same place inside a merged token wherever it is drawn). Deterministic given the state of `rng`;
    usable to build training sets."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got width={width} height={height}")
    if not rc_contents or any(c not in RC_CONTENTS for c in rc_contents):
        raise ValueError(f"rc_contents must be a non-empty subset of {RC_CONTENTS}, got {list(rc_contents)}")
    if rc_placement not in RC_PLACEMENTS:
        raise ValueError(f"rc_placement must be one of {RC_PLACEMENTS}, got {rc_placement!r}")
    text_size = _text_sizes(text_size)
    if kind == "rc":
        image, record = _make_rc(width, height, rng, text_size, rc_contents, rc_placement)
    else:
        image, record = _make_sc(width, height, rng)
    return image, {"metric": "exact_match", "kind": kind} | record


def generate_benchmark(
    out_dir: str | Path,
    per_cell: int | Mapping[str, int] = 50,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    max_area: float | None = None,
    scale: float = 1.0,
    text_size: float | tuple[int, int] | None = None,
    rc_contents: Sequence[str] = DEFAULT_RC_CONTENTS,
    rc_placement: str = "random",
    snap: int | None = None,
    min_side: int = 1,
) -> Path:
    """Writes `per_cell` items of each kind (an int, or {kind: count}: e.g. fewer of the easy SC items in a
    training set) for each of the 35 cells to `out_dir`: PNGs under `images/` and
    `data.jsonl` (fields id, image (relative to the jsonl), question, answers, metric, kind, width, height,
    nominal_width, nominal_height, area_bin, aspect_bin, content, and text_box for "rc"). Returns the jsonl path.

    Every item draws from its own `random.Random` seeded by (seed, cell, index, kind), so the output is
    deterministic and one item does not depend on the others; the rc and sc items of a (cell, index) share a size.
    `text_size` defaults to `default_text_size(scale)`; (low, high) draws each RC item's size from that range, as
    in `make_item`; `rc_contents` picks the RC content types (default number, date, code, phrase; "digit", one
    character, is the easiest reading task, for models too small to read strings; "tile", a mosaic square's colour,
    needs no reading at all, for models too small to read a digit) and `rc_placement` ("random", "corner" or
    "grid") the RC text's place, as in `make_item`. `snap` rounds both sides of
    every image to a multiple of `snap` px (at least `snap`) after scaling, so a processor whose resize factor is
    `snap` (28 for nativevl) and whose min_pixels is at most snap^2 feeds the pixels unresampled; the binning
    stays on the nominal size. `min_side` raises each side to at least that many px after scaling (and `snap`), so
    text of a fixed pixel height fits the thinnest images without snapping their sizes to a grid.

    The benchmark is written into a temporary sibling folder and renamed to `out_dir` at the end, so a killed run
    leaves the previous benchmark (or none) and a rerun never mixes old and new files. An existing `out_dir` is
    replaced when it is a benchmark (holds `data.jsonl`); any other non-empty folder is refused.
    """
    if bad := [k for k in kinds if k not in KINDS]:
        raise ValueError(f"unknown kinds {bad}; expected a subset of {KINDS}")
    counts = dict(per_cell) if isinstance(per_cell, Mapping) else dict.fromkeys(kinds, per_cell)
    if (
        set(counts) != set(kinds)
        or any(not isinstance(n, numbers.Integral) or n < 1 for n in counts.values())
        or scale <= 0
    ):
        raise ValueError(
            f"per_cell must be an int >= 1, or one for each of the kinds {tuple(kinds)}, and scale > 0; got "
            f"per_cell={per_cell} scale={scale}"
        )
    if snap is not None and snap < 1:
        raise ValueError(f"snap must be a positive number of px, got {snap}")
    if min_side < 1:
        raise ValueError(f"min_side must be a positive number of px, got {min_side}")
    text_size = default_text_size(scale) if text_size is None else _text_sizes(text_size)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "data.jsonl").is_file():
        raise ValueError(f"{out_dir} is not empty and holds no data.jsonl: not a benchmark to replace")
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        lines = _write_items(
            tmp, counts, seed, kinds, max_area, scale, text_size, rc_contents, rc_placement, snap, min_side
        )
        (tmp / "data.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir / "data.jsonl"


def _write_items(
    out_dir: Path,
    per_cell: Mapping[str, int],
    seed: int,
    kinds: Sequence[str],
    max_area: float | None,
    scale: float,
    text_size: float | tuple[int, int],
    rc_contents: Sequence[str],
    rc_placement: str,
    snap: int | None,
    min_side: int = 1,
) -> list[str]:
    """Saves the images of `generate_benchmark` under `out_dir / "images"` (`per_cell`: items per cell of each
    kind); returns the data.jsonl lines."""
    (out_dir / "images").mkdir()
    lines = []
    for area in AREA_BINS:
        for aspect in ASPECT_BINS:
            for index in range(max(per_cell[kind] for kind in kinds)):
                key = f"nativevl-synth-rc/{seed}/{area}/{aspect}/{index}"
                nominal_w, nominal_h = sample_cell_size(area, aspect, random.Random(key), max_area)
                width, height = max(1, round(nominal_w * scale)), max(1, round(nominal_h * scale))
                if snap:
                    width, height = max(snap, round(width / snap) * snap), max(snap, round(height / snap) * snap)
                width, height = max(min_side, width), max(min_side, height)
                for kind in (k for k in kinds if index < per_cell[k]):
                    image, record = make_item(
                        kind, width, height, random.Random(f"{key}/{kind}"), text_size, rc_contents, rc_placement
                    )
                    item_id = f"{area}-{aspect}-{index:03d}-{kind}"
                    image.save(out_dir / "images" / f"{item_id}.png", compress_level=1)
                    row = {"id": item_id, "image": f"images/{item_id}.png"}
                    row |= {k: record.pop(k) for k in ("question", "answers", "metric", "kind")}
                    row |= {"width": width, "height": height, "nominal_width": nominal_w, "nominal_height": nominal_h}
                    row |= {"area_bin": area, "aspect_bin": aspect} | record  # + content, text_box
                    lines.append(json.dumps(row))
    return lines


def load_benchmark(jsonl_path: str | Path) -> list[dict]:
    """Records of a `data.jsonl`, each with `image_path` (absolute) added."""
    jsonl_path = Path(jsonl_path)
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines() if line.strip()]
    for record in records:
        record["image_path"] = str((jsonl_path.parent / record["image"]).resolve())
    return records
