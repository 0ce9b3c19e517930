"""RC-Bench binning and scoring (nativevl's re-implementation of NativeRes-LLaVA's RC-Bench, arXiv 2506.12776)."""

import csv
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from nativevl.evaluation import (
    AREA_BINS,
    ASPECT_BINS,
    anls,
    area_bin,
    aspect_bin,
    choose_metric,
    coefficient_of_variation,
    exact_match,
    grid_difference,
    normalize_answer,
    profile_dataset,
    render_heatmap,
    score_sample,
    summarize,
    write_cell_csv,
)
from nativevl.evaluation.metrics import levenshtein


# ---------------------------------------------------------------------------------------------------------------
# Bins
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "units, below, at", [(1, "A", "B"), (2, "B", "C"), (4, "C", "D"), (8, "D", "E"), (16, "E", "F"), (24, "F", "G")]
)
def test_area_bin_edges(units, below, at):
    # width 384 * units, height 384: exactly `units` units; one pixel narrower is just below the edge.
    assert area_bin(384 * units, 384) == at
    assert area_bin(384 * units - 1, 384) == below
    assert area_bin(384, 384 * units) == at


def test_area_bin_extremes_and_known_datasets():
    assert area_bin(1, 1) == "A"
    assert area_bin(100_000, 100_000) == "G"
    assert area_bin(640, 480) == "C"  # COCO
    assert area_bin(1024, 768) == "D"  # TextVQA
    assert area_bin(1700, 2200) == "G"  # DocVQA page


@pytest.mark.parametrize(
    "width, height, expected",
    [
        (100, 100, "NM"),
        (200, 100, "NM"),  # r = 2 exactly
        (201, 100, "AW"),
        (400, 100, "AW"),  # r = 4 exactly
        (401, 100, "BW"),
        (100, 200, "NM"),  # r = 1/2 exactly
        (100, 201, "AH"),
        (100, 400, "AH"),  # r = 1/4 exactly
        (99, 400, "BH"),
        (1, 10_000, "BH"),
    ],
)
def test_aspect_bin_edges(width, height, expected):
    assert aspect_bin(width, height) == expected


def test_bins_use_exact_arithmetic():
    # 2h + 1 over h rounds to 2.0 in float64 for h = 10**17; exact comparison still sees r > 2.
    h = 10**17
    assert (2 * h + 1) / h == 2.0
    assert aspect_bin(2 * h + 1, h) == "AW"
    assert aspect_bin(2 * h, h) == "NM"


@given(st.integers(1, 10**6), st.integers(1, 10**6))
def test_aspect_bins_mirror_under_transpose(width, height):
    mirror = dict(zip(ASPECT_BINS, reversed(ASPECT_BINS)))
    assert aspect_bin(height, width) == mirror[aspect_bin(width, height)]
    assert area_bin(width, height) == area_bin(height, width)


@pytest.mark.parametrize("width, height", [(0, 10), (10, -1), (float("nan"), 10), (float("inf"), 1)])
def test_bins_reject_bad_sizes(width, height):
    with pytest.raises(ValueError, match=f"width={width!r} height={height!r}"):
        area_bin(width, height)
    with pytest.raises(ValueError, match="must be positive"):
        aspect_bin(width, height)


def test_profile_dataset_counts_cells():
    counts = profile_dataset([(640, 480), (800, 600), (1024, 768), (1700, 2200), (100, 1000)])
    assert counts[AREA_BINS.index("C")][ASPECT_BINS.index("NM")] == 2
    assert counts[AREA_BINS.index("D")][ASPECT_BINS.index("NM")] == 1
    assert counts[AREA_BINS.index("G")][ASPECT_BINS.index("NM")] == 1
    assert counts[AREA_BINS.index("A")][ASPECT_BINS.index("BH")] == 1
    assert sum(map(sum, counts)) == 5 and len(counts) == 7 and all(len(row) == 5 for row in counts)


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  The  Answer!! ", "answer"),
        ("Paris.", "paris"),
        ("hello,world", "hello world"),
        ("don't", "dont"),
        ("1,234", "1234"),
        ("1,234,567", "1234567"),
        ("3.14", "3.14"),
        ("-5", "-5"),
        ("twenty five", "25"),
        ("Twenty-Five", "25"),
        ("three", "3"),
        ("one hundred and five", "105"),
        ("two thousand twenty one", "2021"),
        ("two three", "2 3"),
        ("An apple", "apple"),
        ("A", "a"),  # only articles: kept
        ("12 kg", "12kg"),
        ("12kg", "12kg"),
        ("12 kilograms", "12kg"),
        ("5 %", "5%"),
        ("5 percent", "5%"),
        ("$ 5", "$5"),
        ("5$", "$5"),
        ("12 in", "12 in"),  # "in" is not a unit: ambiguous
        ("AB-12", "ab-12"),
        ("12/05/2021", "12/05/2021"),
        ("10:30", "10:30"),
        ("Answer: 7", "answer 7"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The CODE is  AB-12.", "the code is ab-12") == 1.0
    assert exact_match("ab12", "AB-12") == 0.0
    assert exact_match("25", ["nope", "twenty five"]) == 1.0
    assert exact_match("12 kg", ["12kg"]) == 1.0
    with pytest.raises(ValueError, match="at least one reference"):
        exact_match("x", [])


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("same", "same") == 0


def test_anls_hand_computed():
    assert anls("Hello World", "hello world") == 1.0
    assert anls("  hello   world ", "Hello World") == 1.0  # case and whitespace do not count
    assert anls("abcdefghij", "abcdefghix") == pytest.approx(0.9)  # one edit in 10 chars
    assert anls("abcd", "abxd") == pytest.approx(0.75)
    assert anls("abcd", "wxyz") == 0.0  # similarity 0 < threshold
    assert anls("abcd", "abxx") == 0.0  # NL = 0.5 is not < 0.5: scores 0, as in DocVQA
    assert anls("abcd", "abxx", threshold=0.6) == pytest.approx(0.5)
    assert anls("abcd", ["wxyz", "abcx", "abxx"]) == pytest.approx(0.75)  # best reference
    assert anls("", "") == 1.0


def test_metric_choice():
    assert choose_metric(["AB-12"]) == "exact_match"
    assert choose_metric(["one two three"]) == "exact_match"
    assert choose_metric(["short", "one two three four"]) == "anls"
    assert score_sample("twenty five", ["25"]) == 1.0
    assert score_sample("the cat sat on the mat", ["the cat sat on a mat"]) == pytest.approx(1 - 3 / 22)
    assert score_sample("abcdefghij", ["abcdefghix"], metric="anls") == pytest.approx(0.9)
    assert score_sample("abcdefghij", ["abcdefghix"], metric="exact_match") == 0.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score_sample("a", ["a"], metric="bleu")


# ---------------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------------


def _records():
    # A-NM: 1/2 right, B-NM: 2/2, C-AW: 3/4 -> areas A 50, B 100, C 75; aspects NM 75, AW 75.
    a_nm, b_nm, c_aw = (384, 383), (384, 384), (1200, 400)
    scores = [(a_nm, 1, "rc"), (a_nm, 0, "rc"), (b_nm, 1, "sc"), (b_nm, 1, "sc")]
    scores += [(c_aw, 1, "rc"), (c_aw, 1, "rc"), (c_aw, 1, "sc"), (c_aw, 0, "rc")]
    return [{"width": w, "height": h, "score": s, "kind": k} for (w, h), s, k in scores]


def test_summarize_hand_built():
    s = summarize(_records())
    assert s.count == 8 and s.accuracy == pytest.approx(75.0)
    assert s.area_accuracy == {"A": 50.0, "B": 100.0, "C": 75.0, "D": None, "E": None, "F": None, "G": None}
    assert s.aspect_accuracy == {"BH": None, "AH": None, "NM": 75.0, "AW": 75.0, "BW": None}
    assert s.area_count["C"] == 4 and s.aspect_count["NM"] == 4
    # ACV over (50, 100, 75): mean 75, sample std 25. RCV over (75, 75): 0.
    assert s.acv == pytest.approx(100 * 25 / 75)
    assert s.rcv == pytest.approx(0.0)
    assert s.cell_accuracy[AREA_BINS.index("B")][ASPECT_BINS.index("NM")] == 100.0
    assert s.cell_accuracy[AREA_BINS.index("G")][ASPECT_BINS.index("BW")] is None
    assert s.cell_count[AREA_BINS.index("C")][ASPECT_BINS.index("AW")] == 4
    assert s.kind_accuracy == {"rc": 60.0, "sc": 100.0} and s.kind_count == {"rc": 5, "sc": 3}
    assert s.to_dict()["acv"] == s.acv


def test_summarize_bins_on_nominal_size_and_validates():
    s = summarize([{"width": 10, "height": 10, "nominal_width": 2000, "nominal_height": 100, "score": 0.5}])
    assert s.area_count["B"] == 1 and s.aspect_count["BW"] == 1  # 200,000 px = 1.36 units, r = 20
    assert s.acv is None and s.rcv is None and s.kind_accuracy == {}  # one bin: no spread
    with pytest.raises(ValueError, match="score must be in"):
        summarize([{"width": 1, "height": 1, "score": 2}])
    with pytest.raises(ValueError, match="at least one record"):
        summarize([])


def test_coefficient_of_variation():
    assert coefficient_of_variation([40, 60]) == pytest.approx(100 * math.sqrt(200) / 50)
    assert coefficient_of_variation([50]) is None
    assert coefficient_of_variation([0, 0]) is None


# ---------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------


def test_csv_and_heatmaps(tmp_path):
    s = summarize(_records())
    write_cell_csv(s.cell_accuracy, tmp_path / "cells.csv", counts=s.cell_count)
    rows = list(csv.DictReader(open(tmp_path / "cells.csv")))
    assert len(rows) == 35 and rows[0] == {"area_bin": "A", "aspect_bin": "BH", "accuracy": "", "count": "0"}
    assert {"area_bin": "B", "aspect_bin": "NM", "accuracy": "100.0", "count": "2"} in rows

    render_heatmap(s.cell_accuracy, tmp_path / "acc.png", "accuracy (%)", vmin=0, vmax=100)
    diff = grid_difference(s.cell_accuracy, [[50.0] * 5 for _ in range(7)])
    assert diff[AREA_BINS.index("B")][ASPECT_BINS.index("NM")] == 50.0 and diff[0][0] is None
    render_heatmap(diff, tmp_path / "diff.png", "Native minus Crop", diverging=True)
    render_heatmap(profile_dataset([(640, 480)]), tmp_path / "profile.png", "dataset profile")
    for name in ("acc.png", "diff.png", "profile.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size[0] > 400 and image.size[1] > 300
    with pytest.raises(ValueError, match="7 rows x 5 columns"):
        render_heatmap([[1.0] * 5], tmp_path / "bad.png", "bad")
