"""Evaluation data: JSONL records checked, their images located and read, and the sizes they are binned on.

Data: a JSONL file, one record per line, with `image` (a path relative to the JSONL file, a base64 string or a
`data:image/...;base64,...` URI), `question`, `answers` (a non-empty list of strings) and optionally `id`, `metric`
("exact_match" or "anls"; default by answer length), `kind` ("rc" / "sc"), `width`/`height` (read from the image
when absent) and `nominal_width`/`nominal_height` (the size binned on, for scaled synthetic data).

Every error is an `EvalInputError` naming the file, line, record or value; `nativevl eval` exits with status 2 on it.
"""

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from PIL import Image

from nativevl.evaluation.metrics import METRICS, area_bin, aspect_bin, record_size
from nativevl.processing.image_io_nativevl import image_size
from nativevl.processing.image_io_nativevl import load_image as decode_image


class EvalInputError(ValueError):
    """Bad input to an evaluation (data file, record, image, setting); the CLI exits with status 2 on it."""


def resolve_image(image: str, root: str | Path, allow_outside_paths: bool = False) -> Path | bytes:
    """Where a record's `image` field points: a file (`root / image`, if it exists) or the bytes of a
    `data:...;base64,...` URI or of a plain base64 string. Raises EvalInputError when it is none of these.

    A path that resolves (symlinks followed) outside `root` is refused unless `allow_outside_paths`, without
    looking at it: the error is the same whether or not the file exists."""
    if not isinstance(image, str) or not image:
        raise EvalInputError(f"image must be a non-empty string (path, base64 or data URI), got {image!r:.80}")
    if image.startswith("data:"):
        header, sep, payload = image.partition(",")
        if not sep or not header.endswith(";base64"):
            raise EvalInputError(f"data URI must look like 'data:image/png;base64,...', got {image[:40]!r}...")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise EvalInputError(f"data URI {image[:40]!r}... is not valid base64: {err}") from None
    path = Path(root) / image
    inside = allow_outside_paths or path.resolve().is_relative_to(Path(root).resolve())
    if inside and path.is_file():
        return path
    if len(image) >= 16:  # shorter strings are file names more often than images
        try:
            return base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            pass
    if not inside:
        raise EvalInputError(
            f"image path {image!r:.80} lies outside the data folder {root}; pass --allow-outside-paths to read it"
        )
    raise EvalInputError(f"image file not found: {path} (and {image[:40]!r} is not base64 either)")


def load_records(data_jsonl: str | Path, limit: int | None = None, allow_outside_paths: bool = False) -> list[dict]:
    """Records of a JSONL data file (the first `limit` lines with a record), checked (`check_record`).

    Records without `id` get `line-N` (N = line number). File images get `image_path` (absolute), like
    `synth_rc.load_benchmark`; base64 images stay in `image`. Image paths must lie under the data file's folder
    unless `allow_outside_paths` (`resolve_image`).
    """
    data_jsonl = Path(data_jsonl)
    if not data_jsonl.is_file():
        raise EvalInputError(f"data file not found: {data_jsonl}")
    records = []
    for line_no, record in _json_lines(data_jsonl):
        if limit is not None and len(records) >= limit:
            break
        record.setdefault("id", f"line-{line_no}")
        check_record(record)
        if "image_path" not in record:
            try:
                source = resolve_image(record["image"], data_jsonl.parent, allow_outside_paths)
            except EvalInputError as err:
                raise EvalInputError(f"record {record['id']!r} ({data_jsonl} line {line_no}): {err}") from None
            if isinstance(source, Path):
                record["image_path"] = str(source.resolve())
        records.append(record)
    return records


def _json_lines(data_jsonl: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-blank line; EvalInputError naming the line for anything but an object."""
    with open(data_jsonl, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise EvalInputError(f"{data_jsonl} line {line_no} is not UTF-8: {err}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalInputError(f"{data_jsonl} line {line_no} is not JSON: {err}") from None
            if not isinstance(record, dict):
                raise EvalInputError(f"{data_jsonl} line {line_no} is not a JSON object: {line[:80]!r}")
            yield line_no, record


def check_record(record: Mapping, fields: Sequence[str] = ("image", "question", "answers")) -> None:
    """Raises EvalInputError naming the record when a required field is missing or malformed."""
    name = record.get("id", "<no id>")
    if missing := [k for k in fields if k not in record]:
        raise EvalInputError(f"record {name!r} lacks {missing}; every record needs {list(fields)}")
    if "question" in fields and not isinstance(record["question"], str):
        raise EvalInputError(f"record {name!r}: question must be a string, got {record['question']!r:.80}")
    answers = record.get("answers")
    if "answers" in fields and (
        not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers)
    ):
        raise EvalInputError(f"record {name!r}: answers must be a non-empty list of strings, got {answers!r:.80}")
    if record.get("metric") is not None and record["metric"] not in METRICS:
        raise EvalInputError(
            f"record {name!r}: unknown metric {record['metric']!r}; expected one of {sorted(METRICS)}"
        )


def _image_source(record: Mapping, root: Path, allow_outside_paths: bool = False) -> Path | bytes:
    if record.get("image_path"):
        return Path(record["image_path"])
    try:
        return resolve_image(record["image"], root, allow_outside_paths)
    except EvalInputError as err:
        raise EvalInputError(f"record {record['id']!r}: {err}") from None


def _describe(source: Path | bytes) -> str:
    return str(source) if isinstance(source, Path) else f"<{len(source)} bytes of base64 data>"


def _displayed_size(source: Path | bytes, name: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the image header only, through the image
    processor's size reader: regular files only, refused above `PIL.Image.MAX_IMAGE_PIXELS` as the processor does."""
    try:
        height, width = image_size(source)
    except ValueError as err:
        raise EvalInputError(f"record {name!r}: cannot read image {_describe(source)}: {err}") from None
    return width, height


def load_image(record: Mapping, root: str | Path = ".", allow_outside_paths: bool = False) -> Image.Image:
    """The decoded image of a record (EXIF rotation applied; alpha kept for the image processor to composite), by
    the image processor's reader (`nativevl.processing.image_io_nativevl.load_image`). The header is checked first
    (`_displayed_size`): nothing above the decompression-bomb limit is decoded."""
    source = _image_source(record, Path(root), allow_outside_paths)
    _displayed_size(source, record["id"])
    try:
        return decode_image(source, "image")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise EvalInputError(f"record {record['id']!r}: cannot decode image {_describe(source)}: {err}") from None


def check_item(record: Mapping, index: int, root: Path, allow_outside_paths: bool = False) -> dict:
    """Checked copy of a record with id, width/height (actual) and nominal_width/nominal_height (binned on).

    Every image header is read here, before anything is written: unreadable images, images over the
    decompression-bomb limit and sizes disagreeing with the record's fail the run before it starts."""
    item = dict(record)
    item.setdefault("id", f"item-{index:06d}")
    item["id"] = str(item["id"])
    check_record(item)
    size = _displayed_size(_image_source(item, root, allow_outside_paths), item["id"])
    if "width" not in item or "height" not in item:
        item["width"], item["height"] = size
    elif size != (item["width"], item["height"]):
        raise EvalInputError(
            f"record {item['id']!r}: image is {size[0]}x{size[1]} (w x h) but the record says "
            f"{item['width']}x{item['height']}"
        )
    item.setdefault("nominal_width", item["width"])
    item.setdefault("nominal_height", item["height"])
    try:
        width, height = record_size(item)
        item["area_bin"], item["aspect_bin"] = area_bin(width, height), aspect_bin(width, height)
    except (ValueError, TypeError) as err:
        raise EvalInputError(f"record {item['id']!r}: bad size: {err}") from None
    return item


def records_digest(items: Sequence[Mapping]) -> str:
    """sha256 of the checked items of a run in id order (every field, image paths included): what was asked."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda item: item["id"]):
        digest.update(json.dumps(item, sort_keys=True).encode() + b"\n")
    return f"sha256:{digest.hexdigest()}"


def dataset_sizes(data_jsonl: str | Path, allow_outside_paths: bool = False) -> list[tuple[float, float]]:
    """(width, height) each record of a JSONL dataset is binned on: `nominal_width`/`nominal_height`, else
    `width`/`height`, else the image header (EXIF rotation applied). Only the size or `image` is required."""
    data_jsonl = Path(data_jsonl)
    if not data_jsonl.is_file():
        raise EvalInputError(f"data file not found: {data_jsonl}")
    sizes = []
    for line_no, record in _json_lines(data_jsonl):
        name = record.get("id", f"line-{line_no}")
        if "nominal_width" in record or "width" in record:
            try:
                size = record_size(record)
            except ValueError as err:
                raise EvalInputError(f"record {name!r}: {err}") from None
        elif "image" in record:
            try:
                source = resolve_image(record["image"], data_jsonl.parent, allow_outside_paths)
            except EvalInputError as err:
                raise EvalInputError(f"record {name!r}: {err}") from None
            size = _displayed_size(source, name)
        else:
            raise EvalInputError(f"record {name!r} ({data_jsonl} line {line_no}) has neither image nor size")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in size):
            raise EvalInputError(f"record {name!r}: size must be positive numbers, got {size}")
        sizes.append(size)
    if not sizes:
        raise EvalInputError(f"{data_jsonl} holds no records")
    return sizes


__all__ = [
    "EvalInputError",
    "check_item",
    "check_record",
    "dataset_sizes",
    "load_image",
    "load_records",
    "records_digest",
    "resolve_image",
]
