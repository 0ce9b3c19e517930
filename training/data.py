"""Training data in the formats people have, checked in one pass before training starts.

Every record becomes TRL's conversational vision format, `{"id": str, "messages": [...], "images": [...]}` (`id` the
record's own, else where it was read), each content a list of `{"type": "image" | "text", "text": str | None}` parts
(one image part per image, in order):

- TRL conversational records: `messages` with `images` (a list) or `image` (one); string content is wrapped, and
  when no message holds an image part the images go in front of the first user message's text, as TRL's
  `prepare_multimodal_messages` (trl/data_utils.py) does.
- LLaVA / ShareGPT conversations: `conversations` of `{"from": "human" | "gpt" | "system", "value": str}`, an
  `<image>` marker per image (none: the images go in front of the first human turn, as LLaVA does), `image` a
  path or a list of paths (or `images`).
- `nativevl synth-rc` benchmark records (`question`, `answers`, `image`): the question with its image, then the
  first answer.

Files: `.jsonl`, `.json` (a list of records), `.parquet`, and folders: a `save_to_disk` folder (a `Dataset`, or a
`DatasetDict` whose `train` split trains and whose `eval` / `validation` / `test` split, when present, evaluates)
or a folder of data files `datasets.load_dataset` reads (`--dataset_name`). Image paths are resolved against the
data file's folder and must stay inside it unless `allow_outside_paths`. Errors name the file, the line (JSONL) or
record / row, and the field.
"""

import json
from pathlib import Path

from tqdm.auto import tqdm


EVAL_SPLITS = ("eval", "validation", "test")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant"}
ROLES.update(system="system")
IMAGE_MARKER = "<image>"


def load_training_data(path: str, allow_outside_paths: bool = False, from_hub_layout: bool = False):
    """The train `datasets.Dataset` of `path` (any format of the module docstring), and the eval split of a
    `DatasetDict` (None when it has none or `path` is a file). `from_hub_layout`: `path` is a folder of data files
    for `datasets.load_dataset` (`--dataset_name`) rather than a `save_to_disk` folder. Raises FileNotFoundError
    for a missing path and ValueError (file, line or row, field) for a record that cannot be trained on."""
    import datasets

    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    base = (source if source.is_dir() else source.parent).resolve()
    if source.is_dir():
        loaded = datasets.load_dataset(str(source)) if from_hub_layout else datasets.load_from_disk(str(source))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{source} holds splits {sorted(loaded)} but no train split")
            eval_name = next((name for name in EVAL_SPLITS if name in loaded), None)
            splits = {"train": loaded["train"], **({eval_name: loaded[eval_name]} if eval_name else {})}
        else:
            splits = {"train": loaded}
        converted = {
            name: convert_table(split, f"{source} split {name}", base, allow_outside_paths)
            for name, split in splits.items()
        }
        train = converted.pop("train")
        return train, next(iter(converted.values()), None)
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        with open(source, "rb") as f:
            total = sum(1 for line in f if line.strip())
        records = _jsonl_records(source)
    elif suffix == ".json":
        records, total = _json_records(source)
    elif suffix == ".parquet":
        table = datasets.load_dataset("parquet", data_files=str(source), split="train")
        return convert_table(table, str(source), base, allow_outside_paths), None
    else:
        raise ValueError(f"{source}: unknown data file type {suffix!r}; expected .jsonl, .json, .parquet or a folder")
    return convert(records, total, base, allow_outside_paths, source.name), None


def _jsonl_records(source: Path):
    with open(source, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{source} line {line_no}", json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{source} line {line_no} is not UTF-8 JSON: {err}") from None


def _json_records(source: Path):
    try:
        records = json.loads(source.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{source} is not UTF-8 JSON: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    return ((f"{source} record {i}", r) for i, r in enumerate(records)), len(records)


def convert(records, total: int, base: Path, allow_outside_paths: bool, name: str):
    """A `datasets.Dataset` of `to_conversation` of every `(where, record)` of a JSON / JSONL file (image paths,
    small enough to hold), with a progress bar."""
    import datasets

    rows = [
        to_conversation(record, where, base, allow_outside_paths)
        for where, record in tqdm(records, total=total, desc=f"checking {name}", unit="record", disable=None)
    ]
    if not rows:
        raise ValueError(f"{name}: no records")
    return datasets.Dataset.from_list(rows)


def convert_table(table, where: str, base: Path, allow_outside_paths: bool):
    """`to_conversation` over the rows of a `datasets.Dataset` through `map` (one pass with a progress bar, written
    to the datasets cache rather than held in memory); errors name `where` and the row."""
    if not len(table):
        raise ValueError(f"{where}: no records")
    return table.map(
        lambda record, i: to_conversation(dict(record), f"{where} row {i}", base, allow_outside_paths),
        with_indices=True,
        remove_columns=table.column_names,
        desc=f"checking {where}",
    )


def to_conversation(record, where: str, base: Path, allow_outside_paths: bool = False) -> dict:
    """One record (TRL, LLaVA / ShareGPT or synth-rc) as `{"id", "messages", "images"}`; relative image
    paths made absolute under `base`. Raises ValueError starting with `where` and naming the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if "messages" in record:
        images = _images(record, ("images", "image"), where)
        messages = _trl_messages(record["messages"], len(images), where)
    elif "conversations" in record:
        images = _images(record, ("image", "images"), where)
        messages = _llava_messages(record["conversations"], len(images), where)
    elif "question" in record and "answers" in record:
        images = _images(record, ("image", "images"), where)
        answers = record["answers"]
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
            raise ValueError(f"{where}: field answers must be a non-empty list of strings, got {answers!r:.80}")
        user = [_image_part() for _ in images] + [_text_part(str(record["question"]))]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [_text_part(answers[0])]}]
    else:
        raise ValueError(
            f"{where}: no field messages (TRL), conversations (LLaVA / ShareGPT) or question + answers (synth-rc); "
            f"fields: {sorted(record)[:12]}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"{where}: field messages has no assistant turn to train on (roles {[m['role'] for m in messages]})"
        )
    images = [_resolve(image, where, i, base, allow_outside_paths) for i, image in enumerate(images)]
    return {"id": str(record.get("id", where)), "messages": messages, "images": images}


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def _image_part() -> dict:
    return {"type": "image", "text": None}


def _images(record: dict, keys: tuple[str, str], where: str) -> list:
    """The record's images from the first of `keys` it holds: a list, one image, or None (no image)."""
    for key in keys:
        if key in record and record[key] is not None:
            value = record[key]
            return list(value) if isinstance(value, (list, tuple)) else [value]
    return []


def _resolve(image, where: str, i: int, base: Path, allow_outside_paths: bool):
    """An image path made absolute under `base` (checked); anything else (PIL image, bytes, {bytes, path}) as is."""
    if not isinstance(image, str):
        if image is None:
            raise ValueError(f"{where}: field images[{i}] is null")
        return image
    path = base / image
    if not allow_outside_paths and not path.resolve().is_relative_to(base):
        raise ValueError(
            f"{where}: field images[{i}] {image!r:.80} lies outside the dataset folder {base}; pass "
            "--allow_outside_paths true to read it"
        )
    if not path.is_file():
        raise ValueError(f"{where}: field images[{i}] {image!r:.80} is not a file ({path})")
    return str(path.resolve())


def _trl_messages(messages, n_images: int, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field messages must be a non-empty list, got {messages!r:.80}")
    out, structured = [], False
    for k, message in enumerate(messages):
        field = f"messages[{k}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"{where}: field {field} needs a role system|user|assistant|tool, got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, str):
            parts = [_text_part(content)]
        elif isinstance(content, list):
            structured = True
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(_text_part(part["text"]))
                elif kind == "image":
                    parts.append(_image_part())
                else:
                    raise ValueError(f"{where}: field {field}.content[{j}] is not a text or image part: {part!r:.80}")
        else:
            raise ValueError(f"{where}: field {field}.content must be a string or a list, got {content!r:.80}")
        out.append({"role": message["role"], "content": parts})
    found = sum(p["type"] == "image" for m in out for p in m["content"])
    if not structured and found == 0 and n_images:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{where}: field messages has {n_images} image(s) but no user message to put them in")
        first_user["content"][:0] = [_image_part() for _ in range(n_images)]  # TRL: images before the text
        found = n_images
    if found != n_images:
        raise ValueError(f"{where}: field messages holds {found} image part(s) but field images has {n_images}")
    return out


def _llava_messages(turns, n_images: int, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field conversations must be a non-empty list, got {turns!r:.80}")
    out = []
    for k, turn in enumerate(turns):
        field = f"conversations[{k}]"
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(
                f"{where}: field {field} needs from ({'|'.join(ROLES)}) and a string value, got {turn!r:.80}"
            )
        parts = []
        for j, piece in enumerate(turn["value"].split(IMAGE_MARKER)):
            if j:
                parts.append(_image_part())
            if piece.strip():
                parts.append(_text_part(piece.strip()))
        out.append({"role": ROLES[turn["from"]], "content": parts})
    found = sum(p["type"] == "image" for m in out for p in m["content"])
    if found == 0 and n_images:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError(f"{where}: field conversations has {n_images} image(s) but no human turn to put them in")
        first_user["content"][:0] = [_image_part() for _ in range(n_images)]  # LLaVA: "<image>\n" + question
        found = n_images
    if found != n_images:
        raise ValueError(
            f"{where}: field conversations holds {found} {IMAGE_MARKER} marker(s) but image has {n_images}"
        )
    return out
