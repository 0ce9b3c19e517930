"""Evaluation runs over RC-Bench-style data: batched greedy generation into a run folder, then its scores.

The protocol follows NativeRes-LLaVA (arXiv 2506.12776, section "RC-Bench"): every item is scored (`score_sample`),
binned on its image size into the 7 area x 5 aspect grid (`nativevl.evaluation.metrics`) and summarised as Acc, ACV
and RCV. The command line is `nativevl eval` (`nativevl.evaluation.cli`). The data format and its checks are in
`nativevl.evaluation.data`; the reports (CSV, heatmaps, `print_report`, `compare`: the paper's difference map,
`profile`: how a dataset spreads over the grid) in `nativevl.evaluation.report`; fingerprints, locks and atomic
writes of run folders in `nativevl.runs`.

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

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from nativevl.evaluation.data import EvalInputError, check_item, load_image, records_digest
from nativevl.evaluation.metrics import choose_metric, score_sample, summarize
from nativevl.evaluation.report import CELLS, HEATMAP, SCORES, write_reports
from nativevl.runs import RunFolderError, RunLock, check_fingerprint, read_predictions, weights_fingerprint


MODES = ("native", "fixed", "crop")  # image modes of NativeVLImageProcessor
GREY = (128, 128, 128)  # colour of the blank images of the `blank_images` control
PREDICTIONS, SETTINGS = "predictions.jsonl", "settings.json"


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
        try:  # a different earlier run's files go first (`overwrite`), else the run is refused
            check_fingerprint(out_dir / SETTINGS, settings, overwrite, stale=(PREDICTIONS, SCORES, CELLS, HEATMAP))
        except RunFolderError as err:
            raise EvalInputError(str(err)) from None
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
        write_reports(out_dir, scores, mode, blank_images)
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
    items = [check_item(record, i, root, allow_outside_paths) for i, record in enumerate(records)]
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


def _item_image(item: Mapping, root: Path, blank: bool, allow_outside_paths: bool) -> Image.Image:
    """The image of an item (a grey one of the same size for the blank-image control)."""
    if blank:
        return Image.new("RGB", (item["width"], item["height"]), GREY)
    return load_image(item, root, allow_outside_paths)


def _prediction_row(item: Mapping, prediction: str, visual_tokens: int) -> dict:
    metric = item.get("metric") or choose_metric(item["answers"])
    row = {"id": item["id"], "question": item["question"], "prediction": prediction, "answers": item["answers"]}
    row |= {"score": score_sample(prediction, item["answers"], metric), "metric": metric, "kind": item.get("kind")}
    row |= {k: item[k] for k in ("width", "height", "nominal_width", "nominal_height", "area_bin", "aspect_bin")}
    return row | {"visual_tokens": visual_tokens}


__all__ = ["MODES", "evaluate", "generate_batch", "question_turn"]
