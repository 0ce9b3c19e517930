"""Evaluation runs over RC-Bench-style data: batched greedy generation, scores, per-cell CSV and heatmaps.

The protocol follows NativeRes-LLaVA (arXiv 2506.12776, section "RC-Bench"): every item is scored (`score_sample`),
binned on its image size into the 7 area x 5 aspect grid (`nativevl.evaluation.metrics`) and summarised as Acc, ACV
and RCV. `compare` draws the paper's difference map (e.g. Native minus Crop); `profile` shows how any dataset
spreads over the grid. The command line is `nativevl eval` (`nativevl.evaluation.cli`).

Data: a JSONL file, one record per line, with `image` (a path relative to the JSONL file, a base64 string or a
`data:image/...;base64,...` URI), `question`, `answers` (a non-empty list of strings) and optionally `id`, `metric`
("exact_match" or "anls"; default by answer length), `kind` ("rc" / "sc"), `width`/`height` (read from the image
when absent) and `nominal_width`/`nominal_height` (the size binned on, for scaled synthetic data).

A run folder holds:

- `settings.json`: what the run was started with and its fingerprint (`data_digest` of the data, the model
  folder's `weights` digests, `dtype`); a rerun with other settings or inputs into the same folder is refused,
  naming what differs, unless `overwrite` (`--overwrite`) deletes the earlier run's files first.
- `.lock`: held by the running process (`nativevl.runs.RunLock`); a second run into the folder meanwhile is refused.
- `predictions.jsonl`: one line per item, written batch by batch and flushed, so a killed run keeps its finished
  batches and a rerun only generates the missing ids.
- `scores.json`: `summarize(...).to_dict()` plus the run settings, counts and mean visual tokens per item.
- `cells.csv`: accuracy and count of each of the 35 cells; `heatmap.png`: the accuracy grid.

Tiny CPU example (random weights, so accuracy is about 0; a few seconds)::

    python -c "from nativevl.evaluation import generate_benchmark; generate_benchmark('rc_demo', 1, scale=1/8)"
    nativevl export --tiny tiny_model
    nativevl eval run --model tiny_model --data rc_demo/data.jsonl --out runs/native --limit 8 --max-new-tokens 4
"""

import base64
import binascii
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from nativevl.evaluation.metrics import (
    AREA_BINS,
    ASPECT_BINS,
    METRICS,
    RCSummary,
    area_bin,
    aspect_bin,
    choose_metric,
    profile_dataset,
    record_size,
    score_sample,
    summarize,
)
from nativevl.evaluation.report import AREA_LABELS, ASPECT_LABELS, grid_difference, render_heatmap, write_cell_csv
from nativevl.processing.image_io_nativevl import image_size
from nativevl.processing.image_io_nativevl import load_image as decode_image
from nativevl.runs import RunFolderError, RunLock, check_fingerprint, weights_fingerprint


MODES = ("native", "fixed", "crop")  # image modes of NativeVLImageProcessor
GREY = (128, 128, 128)  # colour of the blank images of the `blank_images` control
PREDICTIONS, SCORES, SETTINGS, CELLS, HEATMAP = (
    "predictions.jsonl",
    "scores.json",
    "settings.json",
    "cells.csv",
    "heatmap.png",
)


class EvalInputError(ValueError):
    """Bad input to an evaluation (data file, record, image, setting); the CLI exits with status 2 on it."""


# ----------------------------------------------------------------------------------------------------------------
# Records and images
# ----------------------------------------------------------------------------------------------------------------


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


def _item(record: Mapping, index: int, root: Path, allow_outside_paths: bool = False) -> dict:
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


# ----------------------------------------------------------------------------------------------------------------
# Run folder
# ----------------------------------------------------------------------------------------------------------------


def read_predictions(path: str | Path) -> dict[str, dict]:
    """Prediction lines of a run by id. A last line cut short by a killed run is dropped from the file."""
    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text()
    if text and not text.endswith("\n"):  # a write interrupted mid-line: keep the complete lines only
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    predictions = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path} line {line_no} is not JSON ({err}); remove the line to resume") from None
        predictions[row["id"]] = row
    return predictions


def _check_settings(out_dir: Path, settings: dict, overwrite: bool) -> None:
    """Writes settings.json, or checks that an earlier run into `out_dir` had the same settings and inputs (the
    fingerprint: `data_digest`, `weights`, `dtype`). With `overwrite`, a different earlier run is deleted first."""
    try:
        start_over = check_fingerprint(out_dir / SETTINGS, settings, overwrite)
    except RunFolderError as err:
        raise EvalInputError(str(err)) from None
    if start_over:
        for name in (PREDICTIONS, SCORES, CELLS, HEATMAP):
            (out_dir / name).unlink(missing_ok=True)


def records_digest(items: Sequence[Mapping]) -> str:
    """sha256 of the checked items of a run in id order (every field, image paths included): what was asked."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda item: item["id"]):
        digest.update(json.dumps(item, sort_keys=True).encode() + b"\n")
    return f"sha256:{digest.hexdigest()}"


def question_turn(question: str) -> list[dict]:
    """One user turn: the image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@torch.inference_mode()
def generate_batch(
    model,
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    images_kwargs: Mapping | None = None,
    max_new_tokens: int = 32,
) -> tuple[list[str], list[int]]:
    """Greedy answers to one question per image, in one left-padded batch.

    Returns the decoded answers (special tokens skipped, stripped) and the visual tokens of each sample (image
    placeholder tokens in its `input_ids`).
    """
    prompts = processor.apply_chat_template(
        [question_turn(q) for q in questions], add_generation_prompt=True, tokenize=False
    )
    batch = processor(
        images=[[image] for image in images],
        text=prompts,
        images_kwargs=dict(images_kwargs or {}),
        padding_side="left",
        return_tensors="pt",
    ).to(model.device)
    visual_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()  # (batch,)
    extra = {}
    if model.generation_config.pad_token_id is None:
        extra["pad_token_id"] = processor.tokenizer.pad_token_id
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **extra)  # (batch, seq + new)
    new_tokens = out[:, batch["input_ids"].shape[1] :]  # (batch, new)
    answers = processor.batch_decode(new_tokens, skip_special_tokens=True)
    return [a.strip() for a in answers], [int(n) for n in visual_tokens]


def evaluate(
    model,
    processor,
    records: Iterable[Mapping],
    out_dir: str | Path,
    mode: str = "native",
    max_pixels: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    blank_images: bool = False,
    progress: bool = True,
    images_kwargs: Mapping | None = None,
    image_root: str | Path = ".",
    model_path: str | None = None,
    overwrite: bool = False,
    allow_outside_paths: bool = False,
    data_digest: str | None = None,
) -> dict:
    """Runs greedy generation over `records` into `out_dir` and scores it (files in the module docstring).

    Args:
        records: mappings as in the module docstring (`load_records` / `synth_rc.load_benchmark` output). Records
            without `id` get `item-NNNNNN` from their position.
        mode, max_pixels: image mode of the processor and its native-mode pixel cap (None: the processor's).
        blank_images: replace every image by a uniform grey one of the same size: the control that shows how much
            of the score comes without looking at the image.
        images_kwargs: further image processor overrides, e.g. `{"fixed_pixels": 336 * 336}`.
        image_root: folder that relative `image` paths are read from when a record has no `image_path`.
        model_path: recorded in scores.json; default `model.name_or_path`. When it is a folder, the digests of its
            weight files are part of the run's fingerprint.
        overwrite: start over when `out_dir` holds a run with other settings or inputs (else EvalInputError).
        allow_outside_paths: let relative `image` paths leave `image_root` (`resolve_image`).
        data_digest: digest of the data the records come from, part of the fingerprint (`nativevl eval run`: the
            whole data file's, so that a rerun with a larger `--limit` extends the run); default
            `records_digest(records)`.

    Items are sorted by image area (largest first, so an out-of-memory error shows at once) so that a batch holds
    images of similar size. Ids already in `predictions.jsonl` are skipped. The model is put in eval mode. Returns the scores.json dict, whose
    `new_items` counts the items generated by this call.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise EvalInputError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    kwargs = _image_settings(processor.image_processor, mode, max_pixels, images_kwargs)
    root = Path(image_root)
    items = _checked_items(records, processor.image_processor, kwargs, root, allow_outside_paths)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalInputError(f"output folder {out_dir} exists and is not a folder")
    model_path = model_path or str(getattr(model, "name_or_path", "") or "") or None
    weights = weights_fingerprint(model_path) if model_path and Path(model_path).is_dir() else None
    effective = {
        k: kwargs.get(k, getattr(processor.image_processor, k))
        for k in ("min_pixels", "max_pixels", "fixed_pixels", "crop_base_size")
    }
    settings = {
        "model": model_path,
        "mode": mode,
        **effective,
        "images_kwargs": {k: v for k, v in kwargs.items() if k not in ("mode", *effective)},
        "blank_images": bool(blank_images),
        "max_new_tokens": int(max_new_tokens),
        "data_digest": data_digest or records_digest(items),
        "weights": weights,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    with RunLock(out_dir):
        _check_settings(out_dir, settings, overwrite)
        done = read_predictions(out_dir / PREDICTIONS)
        todo = [item for item in items if item["id"] not in done]
        model.eval()
        generation = dict(kwargs=kwargs, max_new_tokens=max_new_tokens, blank=blank_images, batch_size=batch_size)
        _generate_into(out_dir, model, processor, todo, done, root, allow_outside_paths, progress, generation)
        rows = [done[i] for i in sorted(item["id"] for item in items)]
        scores = summarize(rows).to_dict()
        scores |= settings | {
            "new_items": len(todo),
            "resumed_items": len(items) - len(todo),
            "batch_size": int(batch_size),
            "mean_visual_tokens": sum(r["visual_tokens"] for r in rows) / len(rows),
        }
        _write_outputs(out_dir, scores, mode, blank_images)
    return scores


def _image_settings(image_processor, mode: str, max_pixels: int | None, images_kwargs: Mapping | None) -> dict:
    """The image processor overrides of a run (mode, pixel cap, extras), validated before any work."""
    if mode not in MODES:
        raise EvalInputError(f"unknown mode {mode!r}; expected one of {MODES}")
    kwargs = {**(images_kwargs or {}), "mode": mode}
    if max_pixels is not None:
        kwargs["max_pixels"] = int(max_pixels)
        kwargs["min_pixels"] = min(int(kwargs.get("min_pixels", image_processor.min_pixels)), int(max_pixels))
    try:
        image_processor.num_image_tokens(28, 28, kwargs)
    except ValueError as err:
        raise EvalInputError(f"bad image settings {kwargs}: {err}") from None
    return kwargs


def _checked_items(records, image_processor, kwargs: dict, root: Path, allow_outside_paths: bool) -> list[dict]:
    """The run's items (ids unique, every size accepted by the processor), largest image first."""
    items = [_item(record, i, root, allow_outside_paths) for i, record in enumerate(records)]
    if not items:
        raise EvalInputError("no records to evaluate")
    ids = [item["id"] for item in items]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise EvalInputError(f"record ids must be unique; repeated: {duplicates[:10]}")
    for item in items:  # sizes the processor refuses (e.g. aspect ratio above its limit) fail before any work
        try:
            image_processor.num_image_tokens(item["height"], item["width"], kwargs)
        except ValueError as err:
            raise EvalInputError(f"record {item['id']!r}: {err}") from None
    items.sort(key=lambda item: (-item["width"] * item["height"], item["id"]))
    return items


def _generate_into(out_dir, model, processor, todo, done, root, allow_outside_paths, progress, generation) -> None:
    """Greedy answers for `todo` in batches, appended to predictions.jsonl and added to `done` (id -> row)."""
    kwargs, blank, batch_size = generation["kwargs"], generation["blank"], generation["batch_size"]
    with open(out_dir / PREDICTIONS, "a") as f, tqdm(total=len(todo), disable=not progress, unit="item") as bar:
        bar.set_description(f"eval {kwargs['mode']}{' blank' if blank else ''}")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            images = [_item_image(item, root, blank, allow_outside_paths) for item in chunk]
            questions = [item["question"] for item in chunk]
            predictions, visual = generate_batch(
                model, processor, images, questions, kwargs, generation["max_new_tokens"]
            )
            for item, prediction, n_visual in zip(chunk, predictions, visual, strict=True):
                row = _prediction_row(item, prediction, n_visual)
                done[item["id"]] = row
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(chunk))


def _write_outputs(out_dir: Path, scores: dict, mode: str, blank_images: bool) -> None:
    """scores.json, the per-cell CSV and the heatmap, each complete or absent."""
    _write_atomically(out_dir / SCORES, lambda path: path.write_text(json.dumps(scores, indent=2) + "\n"))
    _write_atomically(
        out_dir / CELLS, lambda path: write_cell_csv(scores["cell_accuracy"], path, counts=scores["cell_count"])
    )
    title = f"{out_dir.name}: Acc {scores['accuracy']:.1f} ({mode}{', blank images' if blank_images else ''})"
    _write_atomically(
        out_dir / HEATMAP, lambda path: render_heatmap(scores["cell_accuracy"], path, title, vmin=0, vmax=100)
    )


def _item_image(item: Mapping, root: Path, blank: bool, allow_outside_paths: bool) -> Image.Image:
    """The image of an item (a grey one of the same size for the blank-image control)."""
    if blank:
        return Image.new("RGB", (item["width"], item["height"]), GREY)
    return load_image(item, root, allow_outside_paths)


def _write_atomically(path: Path, write) -> None:
    """`write(tmp)` to a temporary sibling, then renamed over `path`: a killed run leaves the old file or the new."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prediction_row(item: Mapping, prediction: str, visual_tokens: int) -> dict:
    metric = item.get("metric") or choose_metric(item["answers"])
    row = {"id": item["id"], "question": item["question"], "prediction": prediction, "answers": item["answers"]}
    row |= {"score": score_sample(prediction, item["answers"], metric), "metric": metric, "kind": item.get("kind")}
    row |= {k: item[k] for k in ("width", "height", "nominal_width", "nominal_height", "area_bin", "aspect_bin")}
    return row | {"visual_tokens": visual_tokens}


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------


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
    "EvalInputError",
    "check_record",
    "compare",
    "dataset_sizes",
    "evaluate",
    "generate_batch",
    "load_image",
    "load_records",
    "print_report",
    "profile",
    "question_turn",
    "read_predictions",
    "records_digest",
    "resolve_image",
]
