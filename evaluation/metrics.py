"""RC-Bench scoring and binning, re-implemented for nativevl.

RC-Bench is the resolution-centric benchmark of NativeRes-LLaVA (arXiv 2506.12776, section "RC-Bench"): 7 area bins
A..G by 5 aspect-ratio bins, accuracy per cell, and two summary figures, ACV (coefficient of variation of the
accuracy over the area bins) and RCV (the same over the aspect bins). The benchmark and its evaluator were not
released, so everything here is nativevl's own re-implementation:

- The aspect bins follow the paper (r = width / height): BH r < 1/4, AH 1/4 <= r < 1/2, NM 1/2 <= r <= 2,
  AW 2 < r <= 4, BW r > 4.
- The area edges are nativevl's own definitions, chosen to reproduce how the paper binned COCO (C), TextVQA
  1024x768 (D) and DocVQA pages (mostly G). Unit = 384 x 384 = 147,456 px; A < 1, B [1, 2), C [2, 4), D [4, 8),
  E [8, 16), F [16, 24), G >= 24 units.
- Both bin functions compare integers (or exact fractions), never rounded floats, so edges are exact.
- Scoring: exact match after `normalize_answer` for short answers, ANLS (threshold 0.5, as in DocVQA) for long
  ones; `score_sample` documents the choice.
"""

import math
import re
import statistics
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction


AREA_UNIT = 384 * 384  # px; one RC-Bench area unit
AREA_EDGES = (1, 2, 4, 8, 16, 24)  # upper edges (exclusive) of bins A..F, in AREA_UNITs; G is open-ended
AREA_BINS = ("A", "B", "C", "D", "E", "F", "G")
ASPECT_BINS = ("BH", "AH", "NM", "AW", "BW")  # display order: tallest to widest
GRID_SHAPE = (len(AREA_BINS), len(ASPECT_BINS))  # rows = area bins, columns = aspect bins


def _exact_size(width: float, height: float) -> tuple[Fraction, Fraction]:
    """Converts a size to exact fractions, rejecting non-positive or non-finite sides."""
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise ValueError(f"image size must be positive and finite, got width={width!r} height={height!r}")
    return Fraction(width), Fraction(height)


def area_bin(width: float, height: float) -> str:
    """RC-Bench area bin "A".."G" of a `width` x `height` image (edges in units of 384x384 px, see module doc)."""
    w, h = _exact_size(width, height)
    area = w * h
    for name, edge in zip(AREA_BINS, AREA_EDGES):
        if area < edge * AREA_UNIT:
            return name
    return AREA_BINS[-1]


def aspect_bin(width: float, height: float) -> str:
    """RC-Bench aspect bin of r = width / height: BH < 1/4 <= AH < 1/2 <= NM <= 2 < AW <= 4 < BW."""
    w, h = _exact_size(width, height)
    if 4 * w < h:
        return "BH"
    if 2 * w < h:
        return "AH"
    if w <= 2 * h:
        return "NM"
    if w <= 4 * h:
        return "AW"
    return "BW"


def cell_index(width: float, height: float) -> tuple[int, int]:
    """(row, column) of an image in the 7x5 grid: row = area bin, column = aspect bin."""
    return AREA_BINS.index(area_bin(width, height)), ASPECT_BINS.index(aspect_bin(width, height))


# ----------------------------------------------------------------------------------------------------------------
# Answer normalisation
# ----------------------------------------------------------------------------------------------------------------

_SMALL_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_NUMBER_WORDS = set(_SMALL_NUMBERS) | set(_TENS) | set(_SCALES) | {"hundred"}
_ARTICLES = {"a", "an", "the"}
_CURRENCIES = "$€£¥"
_KEPT_SYMBOLS = "%°" + _CURRENCIES
# Unit spellings -> canonical symbol. Applied only to a token right after a number ("12 kilograms" -> "12kg");
# "in", "ft" and friends are left out where the word is ambiguous in English.
_UNITS = {"%": "%", "percent": "%", "°": "°", "degree": "°", "degrees": "°", "°c": "°c", "°f": "°f"}
for _symbol, _spellings in {
    "kg": "kg kgs kilogram kilograms",
    "g": "g gram grams",
    "mg": "mg milligram milligrams",
    "km": "km kilometer kilometers kilometre kilometres",
    "m": "m meter meters metre metres",
    "cm": "cm centimeter centimeters centimetre centimetres",
    "mm": "mm millimeter millimeters millimetre millimetres",
    "l": "l liter liters litre litres",
    "ml": "ml milliliter milliliters millilitre millilitres",
    "s": "s sec secs second seconds",
    "min": "min mins minute minutes",
    "h": "h hr hrs hour hours",
    "km/h": "km/h kmh kph",
    "mph": "mph",
    "px": "px pixel pixels",
    "kb": "kb",
    "mb": "mb",
    "gb": "gb",
    "tb": "tb",
    "hz": "hz",
    "khz": "khz",
    "mhz": "mhz",
    "ghz": "ghz",
    "w": "w watt watts",
    "kw": "kw",
    "v": "v volt volts",
}.items():
    _UNITS.update(dict.fromkeys(_spellings.split(), _symbol))
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_NUMBER_WITH_SUFFIX_RE = re.compile(r"(-?\d+(?:\.\d+)?)([^\d.]+)")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _strip_punctuation(text: str) -> str:
    """Removes punctuation, keeping the characters that carry meaning (rules in `normalize_answer`)."""
    out = []
    for i, c in enumerate(text):
        prev = text[i - 1] if i > 0 else " "
        nxt = text[i + 1] if i + 1 < len(text) else " "
        if c.isalnum() or c.isspace() or c in _KEPT_SYMBOLS:
            out.append(c)
        elif c in "'’":
            continue  # "don't" -> "dont"
        elif c == "." and prev.isdigit() and nxt.isdigit():
            out.append(c)  # decimal point
        elif c in "-/:" and prev.isalnum() and nxt.isalnum():
            out.append(c)  # codes, dates and times: "ab-12", "12/05/2021", "10:30"
        elif c == "-" and nxt.isdigit() and not prev.isalnum():
            out.append(c)  # minus sign
        else:
            out.append(" ")
    return "".join(out)


def _parse_below_100(tokens: list[str], i: int) -> tuple[int | None, int]:
    if i < len(tokens) and tokens[i] in _TENS:
        value, i = _TENS[tokens[i]], i + 1
        if i < len(tokens) and 1 <= _SMALL_NUMBERS.get(tokens[i], 0) <= 9:
            value, i = value + _SMALL_NUMBERS[tokens[i]], i + 1
        return value, i
    if i < len(tokens) and tokens[i] in _SMALL_NUMBERS:
        return _SMALL_NUMBERS[tokens[i]], i + 1
    return None, i


def _skip_and(tokens: list[str], i: int) -> int:
    """Index after an "and" that joins number words ("one hundred and five"), else i."""
    joins = i + 1 < len(tokens) and tokens[i] == "and" and tokens[i + 1] in _NUMBER_WORDS
    return i + 1 if joins else i


def _parse_below_1000(tokens: list[str], i: int) -> tuple[int | None, int]:
    value, i = _parse_below_100(tokens, i)
    if value and i < len(tokens) and tokens[i] == "hundred":
        value, i = value * 100, i + 1
        rest, j = _parse_below_100(tokens, _skip_and(tokens, i))
        if rest:
            value, i = value + rest, j
    return value, i


def _parse_number(tokens: list[str], i: int) -> tuple[int | None, int]:
    """Longest number spelled in words starting at tokens[i]: (value, next index), or (None, i)."""
    group, i = _parse_below_1000(tokens, i)
    if group is None:
        return None, i
    total, last_scale = 0, math.inf
    while group and i < len(tokens) and _SCALES.get(tokens[i], math.inf) < last_scale:
        last_scale = _SCALES[tokens[i]]
        total, i = total + group * last_scale, i + 1
        group, j = _parse_below_1000(tokens, _skip_and(tokens, i))
        if group is None:
            group = 0
        else:
            i = j
    return total + group, i


def _words_to_digits(tokens: list[str]) -> list[str]:
    # "twenty-five" is one token after punctuation handling: split it when every part is a number word.
    split = []
    for tok in tokens:
        parts = tok.split("-")
        split.extend(parts if len(parts) > 1 and all(p in _NUMBER_WORDS for p in parts) else [tok])
    out, i = [], 0
    while i < len(split):
        value, j = _parse_number(split, i)
        if value is None:
            out.append(split[i])
            i += 1
        else:
            out.append(str(value))
            i = j
    return out


def _attach_units(tokens: list[str]) -> list[str]:
    out: list[str] = []
    for tok in tokens:
        m = _NUMBER_WITH_SUFFIX_RE.fullmatch(tok)
        if m and m.group(2) in _UNITS:  # "12kilograms" -> "12kg"
            tok = m.group(1) + _UNITS[m.group(2)]
        elif m and m.group(2) in _CURRENCIES:  # "5$" -> "$5"
            tok = m.group(2) + m.group(1)
        prev_is_number = bool(out) and _NUMBER_RE.fullmatch(out[-1]) is not None
        if prev_is_number and tok in _UNITS:  # "12 kg" -> "12kg"
            out[-1] += _UNITS[tok]
        elif prev_is_number and tok in _CURRENCIES:  # "5 $" -> "$5"
            out[-1] = tok + out[-1]
        elif out and out[-1] in _CURRENCIES and _NUMBER_RE.fullmatch(tok):  # "$ 5" -> "$5"
            out[-1] += tok
        else:
            out.append(tok)
    return out


def normalize_answer(text: str) -> str:
    """Normalises a short answer for exact match (nativevl's rules, in this order).

    1. Unicode NFKC, lowercase, strip; "per cent" -> "percent".
    2. Thousands separators go: "1,234,567" -> "1234567" (a comma between a digit and exactly three digits).
    3. Punctuation becomes a space, except: apostrophes are dropped ("don't" -> "dont"); "." between digits is a
       decimal point; "-", "/" and ":" between two letters or digits are kept, because they are part of codes,
       dates and times ("AB-12" -> "ab-12", so "ab-12" != "ab12" and "well-known" != "well known"); "-" before a
       digit and after no letter or digit is a minus sign; "%", "°" and currency symbols are kept.
    4. Whitespace is collapsed.
    5. Number words become digits when they form a well-formed number: "twenty five" / "twenty-five" -> "25",
       "three" -> "3", "one hundred and five" -> "105", "two three" -> "2 3" (not 23). Digits are
       otherwise kept as written ("5.50" != "5.5", "007" != "7").
    6. Articles a/an/the are removed (as in the VQA evaluator), unless the answer is only articles.
    7. A unit or currency right after a number is attached with its canonical symbol: "12 kg" == "12kg" ==
       "12 kilograms" -> "12kg", "5 %" == "5 percent" -> "5%", "$ 5" == "5$" -> "$5". Ambiguous words ("in",
       "ft", "pound", "dollars") are not units here.
    """
    text = unicodedata.normalize("NFKC", text).lower().strip().replace("per cent", "percent")
    text = _THOUSANDS_RE.sub("", text)
    tokens = _words_to_digits(_strip_punctuation(text).split())
    without_articles = [t for t in tokens if t not in _ARTICLES]
    tokens = without_articles or tokens
    return " ".join(_attach_units(tokens))


# ----------------------------------------------------------------------------------------------------------------
# Per-sample scores
# ----------------------------------------------------------------------------------------------------------------

ANLS_THRESHOLD = 0.5
LONG_ANSWER_WORDS = 3  # score_sample uses ANLS when the longest reference has more words than this


def _as_list(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is required, got none")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when `normalize_answer(prediction)` equals the normalised form of any reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _as_list(references)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev_diag, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (ca != cb))
    return row[-1]


def anls(prediction: str, references: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one sample, as in the DocVQA evaluator.

    Strings are lowercased, stripped and whitespace-collapsed. For each reference NL = distance / max(len); the
    sample scores max over references of (1 - NL) where NL < threshold, else 0. So a similarity of exactly
    1 - threshold (0.5 by default) scores 0, and two empty strings score 1.
    """
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in _as_list(references):
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        nl = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


METRICS = {"exact_match": exact_match, "anls": anls}


def choose_metric(answers: str | Sequence[str]) -> str:
    """Metric name for `answers`: "anls" when the longest has more than LONG_ANSWER_WORDS (3) words, else
    "exact_match"."""
    longest = max(len(a.split()) for a in _as_list(answers))
    return "anls" if longest > LONG_ANSWER_WORDS else "exact_match"


def score_sample(prediction: str, answers: str | Sequence[str], metric: str | None = None) -> float:
    """Score in [0, 1] of one prediction. `metric` comes from the data ("exact_match" or "anls"); None picks one
    by answer length (`choose_metric`): answers of up to 3 words are short (codes, numbers, dates, names) and get
    exact match, longer ones (sentences) get ANLS."""
    metric = metric or choose_metric(answers)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    return METRICS[metric](prediction, answers)


# ----------------------------------------------------------------------------------------------------------------
# Summaries over the 7x5 grid
# ----------------------------------------------------------------------------------------------------------------


def coefficient_of_variation(values: Iterable[float]) -> float | None:
    """100 * sample std (ddof=1) / mean. None when fewer than 2 values (std undefined) or the mean is 0."""
    values = list(values)
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return None if mean == 0 else 100.0 * statistics.stdev(values) / mean


@dataclass
class RCSummary:
    """RC-Bench figures. Accuracies are percentages (mean score x 100) and None where no sample falls.

    Bin accuracies pool the samples of a bin (equal to the mean of its cells when cells are balanced). ACV and RCV
    are `coefficient_of_variation` over the non-empty area / aspect bins (None with < 2 such bins or mean 0).
    """

    accuracy: float
    count: int
    acv: float | None
    rcv: float | None
    cell_accuracy: list[list[float | None]]  # [7 area bins][5 aspect bins], AREA_BINS x ASPECT_BINS order
    cell_count: list[list[int]]
    area_accuracy: dict[str, float | None]
    area_count: dict[str, int]
    aspect_accuracy: dict[str, float | None]
    aspect_count: dict[str, int]
    kind_accuracy: dict[str, float]  # e.g. {"rc": ..., "sc": ...}; empty when records carry no "kind"
    kind_count: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def _percent(total: float, count: int) -> float | None:
    return 100.0 * total / count if count else None


def record_size(record: Mapping) -> tuple[float, float]:
    """Size a record is binned on: `nominal_width`/`nominal_height` when present (scaled synthetic data), else
    `width`/`height`."""
    if "nominal_width" in record:
        return record["nominal_width"], record["nominal_height"]
    if "width" not in record or "height" not in record:
        raise ValueError(f"record needs width and height (or nominal_width and nominal_height): {dict(record)}")
    return record["width"], record["height"]


def summarize(records: Iterable[Mapping]) -> RCSummary:
    """RC-Bench summary of scored records: mappings with `width`, `height` (see `record_size`), `score` in [0, 1]
    and optionally `kind` ("rc" resolution-centric / "sc" semantic-centric)."""
    sums = [[0.0] * GRID_SHAPE[1] for _ in range(GRID_SHAPE[0])]
    counts = [[0] * GRID_SHAPE[1] for _ in range(GRID_SHAPE[0])]
    kind_sum: dict[str, float] = {}
    kind_count: dict[str, int] = {}
    for rec in records:
        score = rec.get("score")
        if score is None or not 0.0 <= score <= 1.0:
            raise ValueError(f"record score must be in [0, 1], got {score!r} in {dict(rec)}")
        row, col = cell_index(*record_size(rec))
        sums[row][col] += score
        counts[row][col] += 1
        if rec.get("kind") is not None:
            kind_sum[rec["kind"]] = kind_sum.get(rec["kind"], 0.0) + score
            kind_count[rec["kind"]] = kind_count.get(rec["kind"], 0) + 1
    total = sum(map(sum, counts))
    if total == 0:
        raise ValueError("summarize needs at least one record, got none")
    area_count = {a: sum(counts[i]) for i, a in enumerate(AREA_BINS)}
    aspect_count = {r: sum(row[j] for row in counts) for j, r in enumerate(ASPECT_BINS)}
    area_acc = {a: _percent(sum(sums[i]), area_count[a]) for i, a in enumerate(AREA_BINS)}
    aspect_acc = {r: _percent(sum(row[j] for row in sums), aspect_count[r]) for j, r in enumerate(ASPECT_BINS)}
    return RCSummary(
        accuracy=_percent(sum(map(sum, sums)), total),
        count=total,
        acv=coefficient_of_variation(v for v in area_acc.values() if v is not None),
        rcv=coefficient_of_variation(v for v in aspect_acc.values() if v is not None),
        cell_accuracy=[[_percent(s, n) for s, n in zip(srow, nrow)] for srow, nrow in zip(sums, counts)],
        cell_count=counts,
        area_accuracy=area_acc,
        area_count=area_count,
        aspect_accuracy=aspect_acc,
        aspect_count=aspect_count,
        kind_accuracy={k: _percent(kind_sum[k], n) for k, n in sorted(kind_count.items())},
        kind_count=dict(sorted(kind_count.items())),
    )


def profile_dataset(sizes: Iterable[tuple[float, float]]) -> list[list[int]]:
    """Area x aspect histogram of any dataset: counts of (width, height) sizes over the 7x5 grid
    (AREA_BINS rows x ASPECT_BINS columns)."""
    counts = [[0] * GRID_SHAPE[1] for _ in range(GRID_SHAPE[0])]
    for width, height in sizes:
        row, col = cell_index(width, height)
        counts[row][col] += 1
    return counts
