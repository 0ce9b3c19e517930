"""Synthetic resolution-centric benchmark over the 35 RC-Bench cells (NativeRes-LLaVA, arXiv 2506.12776)."""

import hashlib
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from nativevl.evaluation import (
    AREA_BINS,
    ASPECT_BINS,
    PALETTE,
    SHAPES,
    area_bin,
    aspect_bin,
    exact_match,
    generate_benchmark,
    load_benchmark,
    make_item,
    sample_cell_size,
)
from nativevl.evaluation.synth_rc import cap_height, default_text_size


SCALE = 1 / 8
PER_CELL = 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return generate_benchmark(tmp_path_factory.mktemp("a"), per_cell=PER_CELL, seed=3, scale=SCALE)


def _digest(jsonl_path):
    records = load_benchmark(jsonl_path)
    images = [hashlib.sha256(open(r["image_path"], "rb").read()).hexdigest() for r in records]
    return jsonl_path.read_bytes(), images


def test_deterministic_for_a_seed(bench, tmp_path):
    again = generate_benchmark(tmp_path / "b", per_cell=PER_CELL, seed=3, scale=SCALE)
    assert _digest(again) == _digest(bench)
    other = generate_benchmark(tmp_path / "c", per_cell=1, seed=4, scale=SCALE)
    assert other.read_bytes() != bench.read_bytes()


def test_per_kind_counts_keep_the_same_items(bench, tmp_path):
    # {kind: count}: fewer SC items than RC ones; every item is the one the int form writes at its index
    fewer = generate_benchmark(tmp_path / "d", per_cell={"rc": PER_CELL, "sc": 1}, seed=3, scale=SCALE)
    rows = {r["id"]: r for r in load_benchmark(fewer)}
    assert sum(r["kind"] == "rc" for r in rows.values()) == 35 * PER_CELL
    assert sum(r["kind"] == "sc" for r in rows.values()) == 35
    full = {r["id"]: r for r in load_benchmark(bench)}
    for item_id, row in rows.items():
        assert open(row["image_path"], "rb").read() == open(full[item_id]["image_path"], "rb").read()
        assert {k: v for k, v in row.items() if k != "image_path"} == {
            k: v for k, v in full[item_id].items() if k != "image_path"
        }
    assert not any(r["kind"] == "sc" and not r["id"].endswith("-000-sc") for r in rows.values())
    assert load_benchmark(generate_benchmark(tmp_path / "f", per_cell=np.int64(1), kinds=("sc",), scale=SCALE))
    for bad in ({"rc": 1}, {"rc": 1, "sc": 0}, {"rc": 1, "sc": 1, "xx": 1}, {"rc": 1.5, "sc": 1}, 0):
        with pytest.raises(ValueError, match="per_cell must be"):
            generate_benchmark(tmp_path / "e", per_cell=bad)


def test_balanced_over_cells_and_kinds(bench):
    records = load_benchmark(bench)
    counts = Counter((r["area_bin"], r["aspect_bin"], r["kind"]) for r in records)
    expected = {(a, r, k): PER_CELL for a in AREA_BINS for r in ASPECT_BINS for k in ("rc", "sc")}
    assert counts == expected
    assert len({r["id"] for r in records}) == len(records)


def test_nominal_size_bins_to_cell_and_actual_size_is_scaled(bench):
    for r in load_benchmark(bench):
        assert area_bin(r["nominal_width"], r["nominal_height"]) == r["area_bin"]
        assert aspect_bin(r["nominal_width"], r["nominal_height"]) == r["aspect_bin"]
        assert (r["width"], r["height"]) == (round(r["nominal_width"] * SCALE), round(r["nominal_height"] * SCALE))
        with Image.open(r["image_path"]) as image:
            assert image.size == (r["width"], r["height"]) and image.mode == "RGB"
        assert r["metric"] == "exact_match" and r["question"].endswith(("?", "word."))
        assert exact_match(r["answers"][0], r["answers"]) == 1.0


def test_rc_text_has_a_fixed_pixel_height(bench):
    cap = cap_height(default_text_size(SCALE))
    assert cap_height(20) == 14 and cap == 8  # Pillow's Aileron: golden values at the two default sizes
    for r in load_benchmark(bench):
        if r["kind"] != "rc":
            continue
        x0, y0, x1, y1 = r["text_box"]
        assert y1 - y0 == cap and 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
        # Background and clutter have every channel >= 175 and the text is darker: its ink fills exactly
        # the rows of text_box and lies inside it.
        dark = np.asarray(Image.open(r["image_path"])).min(axis=2) < 160
        rows, cols = np.nonzero(dark.any(axis=1))[0], np.nonzero(dark.any(axis=0))[0]
        assert (rows.min(), rows.max() + 1) == (y0, y1), r["id"]
        assert x0 <= cols.min() and cols.max() < x1, r["id"]


def test_sc_answers_come_from_the_palette_or_shapes(bench):
    sc = [r for r in load_benchmark(bench) if r["kind"] == "sc"]
    assert {r["content"] for r in sc} == {"color", "shape"}
    for r in sc:
        assert r["answers"][0] in (PALETTE if r["content"] == "color" else SHAPES)


@pytest.mark.parametrize("area", AREA_BINS)
def test_sample_cell_size_stays_in_cell(area):
    rng = random.Random(0)
    for aspect in ASPECT_BINS:
        for _ in range(20):
            w, h = sample_cell_size(area, aspect, rng)
            assert (area_bin(w, h), aspect_bin(w, h)) == (area, aspect)
    if area == "G":
        w, h = sample_cell_size("G", "NM", rng, max_area=25)
        assert w * h < 25 * 384 * 384
        with pytest.raises(ValueError, match="max_area must exceed 24"):
            sample_cell_size("G", "NM", rng, max_area=20)


def test_make_item_full_scale_and_errors():
    image, record = make_item("rc", 2000, 1500, random.Random(1))
    again, _ = make_item("rc", 2000, 1500, random.Random(1))
    assert image.size == (2000, 1500) and image.tobytes() == again.tobytes()
    x0, y0, x1, y1 = record["text_box"]
    assert y1 - y0 == 14 and record["kind"] == "rc" and len(record["answers"]) == 1
    with pytest.raises(ValueError, match="kind must be one of"):
        make_item("ocr", 10, 10, random.Random(0))
    with pytest.raises(ValueError, match="cannot hold text 14 px tall"):
        make_item("rc", 200, 15, random.Random(0))
    with pytest.raises(ValueError, match="unknown kinds"):
        generate_benchmark("unused", kinds=("rc", "xx"))


@pytest.mark.timeout(10)  # a generous bound on "fast", not a benchmark (usually well under a second)
def test_small_scale_generation_is_fast(tmp_path):
    path = generate_benchmark(tmp_path, per_cell=1, seed=0, kinds=("rc",), scale=SCALE)
    assert len(path.read_text().splitlines()) == 35
    assert json.loads(path.read_text().splitlines()[0])["image"] == "images/A-BH-000-rc.png"


def test_rc_contents_and_placement():
    rng = random.Random(2)
    for _ in range(20):
        image, record = make_item("rc", 120, 80, rng, 13, rc_contents=("digit",), rc_placement="corner")
        assert record["content"] == "digit" and record["answers"][0] in "0123456789"
        assert record["question"] == "What is the digit written in the image?"
        x0, y0, x1, y1 = record["text_box"]
        assert (x0, y0) == (2, 2) and y1 - y0 == cap_height(13)
        ink = np.asarray(image.convert("L")) < 100  # the dark text is the only dark ink
        rows, cols = ink.nonzero()
        assert rows.min() == 2 and rows.max() == y1 - 1 and x0 <= cols.min() and cols.max() < x1
    contents = {make_item("rc", 400, 80, rng, rc_contents=("date", "code"))[1]["content"] for _ in range(30)}
    assert contents == {"date", "code"}
    with pytest.raises(ValueError, match=r"rc_contents must be a non-empty subset of .*got \['digits'\]"):
        make_item("rc", 100, 50, rng, rc_contents=("digits",))
    with pytest.raises(ValueError, match="rc_placement must be one of"):
        make_item("rc", 100, 50, rng, rc_placement="centre")


def test_short_reading_items_on_the_token_grid():
    """The demo's items: short numbers, codes and words starting TEXT_MARGIN px inside a random 28 px cell."""
    rng, cells, answers = random.Random(3), set(), {}
    for _ in range(60):
        width, height = 28 * rng.randint(2, 8), 28 * rng.randint(1, 6)
        contents = ("short_number", "short_code", "word")
        image, record = make_item("rc", width, height, rng, 20, rc_contents=contents, rc_placement="grid")
        x0, y0, x1, y1 = record["text_box"]
        assert x0 % 28 == 2 and y0 % 28 == 2 and x1 <= width - 2 and y1 <= height - 2, (record, image.size)
        cells.add((x0 // 28, y0 // 28))
        answers.setdefault(record["content"], set()).add(record["answers"][0])
    assert len(cells) > 10  # the cell varies
    assert all(a.isdigit() and 10 <= int(a) <= 999 for a in answers["short_number"])
    assert all(len(a) == 3 and a[0].isalpha() and a[1:].isdigit() for a in answers["short_code"])
    assert all(len(a) == 3 and a.isalpha() for a in answers["word"]) and len(answers["word"]) > 5


def test_snap_keeps_images_unresampled(tmp_path):
    from nativevl.processing import NativeVLImageProcessor

    path = generate_benchmark(tmp_path, per_cell=1, seed=1, kinds=("rc",), scale=SCALE, snap=28)
    records = load_benchmark(path)
    assert all(r["width"] % 28 == 0 and r["height"] % 28 == 0 and min(r["width"], r["height"]) >= 28 for r in records)
    assert [(r["area_bin"], r["aspect_bin"]) for r in records] == [(r["id"][0], r["id"][2:4]) for r in records]
    processor = NativeVLImageProcessor(min_pixels=28 * 28, max_pixels=448 * 448)
    images = [Image.open(r["image_path"]) for r in records]
    grids = processor(images, return_tensors="pt")["image_grid_thw"].tolist()
    assert [(h * 14, w * 14) for _, h, w in grids] == [(r["height"], r["width"]) for r in records]
    with pytest.raises(ValueError, match="snap must be a positive number of px, got 0"):
        generate_benchmark(tmp_path / "x", per_cell=1, snap=0)


def test_min_side_fits_fixed_size_text_without_snapping(tmp_path):
    path = generate_benchmark(tmp_path, per_cell=1, seed=1, kinds=("rc",), scale=SCALE, text_size=20, min_side=22)
    records = load_benchmark(path)
    assert min(min(r["width"], r["height"]) for r in records) == 22  # the thinnest images were raised to 22 px
    assert any(r["width"] % 28 or r["height"] % 28 for r in records)  # the others keep their sizes
    with pytest.raises(ValueError, match="min_side must be a positive number of px, got 0"):
        generate_benchmark(tmp_path / "x", per_cell=1, min_side=0)


def test_text_size_range_draws_each_items_size_and_records_it(tmp_path):
    """(16, 25), the demo's training sizes: every RC item's font size is drawn from the range, its ink is that size's
    cap height tall, the thinnest images at min_side 22 still hold the largest; a fixed size draws nothing more."""
    path = generate_benchmark(
        tmp_path, per_cell=2, seed=3, kinds=("rc", "sc"), scale=SCALE, text_size=(16, 25), min_side=22
    )
    records = load_benchmark(path)
    rc = [r for r in records if r["kind"] == "rc"]
    sizes = Counter(r["text_size"] for r in rc)
    assert set(sizes) <= set(range(16, 26)) and len(sizes) >= 6
    for r in rc:
        x0, y0, x1, y1 = r["text_box"]
        assert y1 - y0 == cap_height(r["text_size"]), r["id"]
        dark = np.asarray(Image.open(r["image_path"])).min(axis=2) < 160
        rows = np.nonzero(dark.any(axis=1))[0]
        assert (rows.min(), rows.max() + 1) == (y0, y1), r["id"]
    assert all("text_size" not in r for r in records if r["kind"] == "sc")
    fixed = make_item("rc", 120, 40, random.Random("k"), 20)[1]
    assert "text_size" not in fixed and fixed == make_item("rc", 120, 40, random.Random("k"), 20.0)[1]
    for bad in ((25, 16), (0, 5), (16.5, 20), (16,), -3):
        with pytest.raises(ValueError, match="text_size must be"):
            make_item("rc", 120, 40, random.Random("k"), bad)


def test_tile_items_ask_for_the_top_left_square():
    rng = random.Random(3)
    names = list(PALETTE)
    for _ in range(20):
        image, record = make_item("rc", 28 * 5 + 9, 28 * 3, rng, rc_contents=("tile",))
        assert record["content"] == "tile" and record["answers"][0] in PALETTE and "text_box" not in record
        assert record["question"] == "What colour is the tile in the top-left corner? Answer with one word."
        pixels = np.asarray(image).astype(int)
        colours = {}
        for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):  # nearest palette colour (jitter <= 12 per channel)
            square = pixels[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28].reshape(-1, 3)
            assert (square == square[0]).all(), "a square has one colour"
            colours[row, col] = min(names, key=lambda n: np.abs(square[0] - PALETTE[n]).sum())
        assert colours.pop((0, 0)) == record["answers"][0] and record["answers"][0] not in colours.values()
    tiny, record = make_item("rc", 10, 6, rng, rc_contents=("tile",))  # under one square: cut off, still answerable
    assert tiny.size == (10, 6) and tuple(np.asarray(tiny)[0, 0]) != (0, 0, 0)
    contents = {make_item("rc", 200, 60, rng, rc_contents=("tile", "number"))[1]["content"] for _ in range(30)}
    assert contents == {"tile", "number"}


def test_tile_option_leaves_text_items_unchanged():
    # "tile" is drawn first only when asked for, so text-only items are those generated before it existed
    records = [make_item("rc", 300, 80, random.Random(s), rc_contents=("number", "date"))[1] for s in (5, 6, 7)]
    assert [(r["answers"][0], r["text_box"]) for r in records] == [
        ("27 DEC 1995", [81, 24, 201, 38]),
        ("5086.04", [37, 40, 114, 54]),
        ("1969-07-21", [94, 21, 202, 35]),
    ]
