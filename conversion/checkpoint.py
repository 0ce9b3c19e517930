"""Reading source checkpoint folders lazily: weights, configs, tokenizer special tokens, licence.

`SourceCheckpoint` knows the names, shapes and dtypes of a folder's tensors from the safetensors headers (or the
index) and reads one tensor at a time with plain file reads (`nativevl.conversion.safetensors_io`, no memory map), so
a converter never holds a second full copy of a model, nor the pages of the files it read. Pickle checkpoints (`pytorch_model.bin`, sharded `pytorch_model-0000x-of-0000y.bin` + index) can
run arbitrary code when unpickled: they are refused unless the caller allows them, and are then read with
`torch.load(weights_only=True, map_location="cpu", mmap=True)`.
"""

import json
from pathlib import Path

import torch

from nativevl.conversion.safetensors_io import SAFETENSORS_DTYPES, SafetensorsError, read_header, read_tensor


SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

# Qwen2's ids of the vision special tokens (Qwen2 / Qwen2-VL tokenizers); used when a folder has no tokenizer files.
QWEN2_VISION_TOKEN_IDS = {
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
}
VISION_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}


class ConversionError(Exception):
    """A conversion cannot go on: bad input, mismatched weights, failed verification. The message says why."""


class SourceCheckpoint:
    """The weights of one checkpoint folder, read lazily.

    Names, shapes and dtypes come from the safetensors headers (no tensor data is read); `get(key)` reads one
    tensor. Formats, in order of preference: `model.safetensors.index.json` + shards, `model.safetensors`, and,
    only with `allow_pickle=True`, `pytorch_model.bin.index.json` + shards or `pytorch_model.bin`.
    """

    def __init__(self, folder: str | Path, allow_pickle: bool = False) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"checkpoint folder {self.folder} does not exist")
        self._headers: dict[Path, tuple[int, dict[str, dict]]] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._file_of: dict[str, Path] = {}
        if (self.folder / SAFE_INDEX).exists():
            self.format = "safetensors"
            self._from_index(SAFE_INDEX)
        elif (self.folder / SAFE_WEIGHTS).exists():
            self.format = "safetensors"
            self._file_of = {key: self.folder / SAFE_WEIGHTS for key in self._open(self.folder / SAFE_WEIGHTS).keys()}
        elif (self.folder / PICKLE_INDEX).exists() or (self.folder / PICKLE_WEIGHTS).exists():
            name = PICKLE_INDEX if (self.folder / PICKLE_INDEX).exists() else PICKLE_WEIGHTS
            if not allow_pickle:
                raise ConversionError(
                    f"{self.folder / name} is a pickle checkpoint; unpickling can run arbitrary code, so it is refused. "
                    f"Pass --allow-pickle to load it with torch.load(weights_only=True), or convert it to safetensors"
                )
            self.format = "pickle"
            if name == PICKLE_INDEX:
                self._from_index(PICKLE_INDEX)
            else:
                self._file_of = {key: self.folder / PICKLE_WEIGHTS for key in self._load_pickle(self.folder / name)}
        else:
            raise ConversionError(
                f"no weights in {self.folder}: expected {SAFE_INDEX}, {SAFE_WEIGHTS}, {PICKLE_INDEX} or {PICKLE_WEIGHTS}"
            )
        if not self._file_of:
            raise ConversionError(f"the checkpoint in {self.folder} holds no tensors")

    def _from_index(self, index_name: str) -> None:
        index = read_json(self.folder / index_name)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{self.folder / index_name} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (self.folder / f).exists()]
        if missing:
            raise ConversionError(f"{self.folder / index_name} names shard(s) that do not exist: {missing}")
        self._file_of = {key: self.folder / name for key, name in weight_map.items()}
        if self.format == "safetensors":
            # Open every shard now: a corrupt or truncated shard, or an index that lies, fails before any writing.
            for name in files:
                keys = set(self._open(self.folder / name).keys())
                listed = {k for k, f in weight_map.items() if f == name}
                if listed - keys:
                    raise ConversionError(
                        f"{self.folder / name} lacks tensor(s) that {index_name} places there: {sorted(listed - keys)[:20]}"
                    )

    def _open(self, path: Path) -> dict[str, dict]:
        """{name: header entry} of a safetensors file (read and checked once, kept: headers are small)."""
        if path not in self._headers:
            try:
                data_start, entries, _ = read_header(path)
            except (OSError, SafetensorsError) as error:
                raise ConversionError(f"cannot read safetensors file {path}: {error}") from error
            self._headers[path] = (data_start, entries)
        return self._headers[path][1]

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickles:
            try:
                try:
                    loaded = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
                except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                    loaded = torch.load(path, weights_only=True, map_location="cpu")
            except Exception as error:  # weights_only refuses pickles of anything but tensors and containers
                first_line = (str(error).strip().splitlines() or [""])[0]
                raise ConversionError(
                    f"cannot load {path} with torch.load(weights_only=True): {type(error).__name__}: {first_line}"
                ) from error
            if not isinstance(loaded, dict):
                raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict")
            self._pickles[path] = loaded
        return self._pickles[path]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _check(self, key: str) -> Path:
        if key not in self._file_of:
            raise KeyError(f"{key} is not in the checkpoint {self.folder}")
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        path = self._check(key)
        if self.format == "pickle":
            return tuple(self._load_pickle(path)[key].shape)
        return tuple(self._open(path)[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        path = self._check(key)
        if self.format == "pickle":
            return self._load_pickle(path)[key].dtype
        return SAFETENSORS_DTYPES[self._open(path)[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        """Reads one tensor (a fresh CPU tensor for safetensors, a memory-mapped view for pickles)."""
        path = self._check(key)
        if self.format == "pickle":
            return self._load_pickle(path)[key]
        entries = self._open(path)
        try:
            return read_tensor(path, self._headers[path][0], entries[key])
        except (OSError, SafetensorsError) as error:
            raise ConversionError(f"cannot read tensor {key} from {path}: {error}") from error

    def main_dtype(self) -> torch.dtype:
        """The floating dtype that holds the most parameters (the "source dtype" of a mixed checkpoint)."""
        counts: dict[torch.dtype, int] = {}
        for key in self._file_of:
            dtype = self.dtype(key)
            if dtype.is_floating_point:
                numel = 1
                for size in self.shape(key):
                    numel *= size
                counts[dtype] = counts.get(dtype, 0) + numel
        if not counts:
            raise ConversionError(f"the checkpoint in {self.folder} holds no floating-point tensors")
        return max(counts, key=counts.get)

    def close(self) -> None:
        self._headers.clear()
        self._pickles.clear()


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def added_tokens(folder: str | Path) -> dict[str, int]:
    """{token text: id} of the added tokens in a folder's tokenizer files (tokenizer.json's `added_tokens`,
    tokenizer_config.json's `added_tokens_decoder`, added_tokens.json); empty when the folder has none."""
    folder = Path(folder)
    tokens: dict[str, int] = {}
    if (folder / "tokenizer.json").exists():
        for entry in read_json(folder / "tokenizer.json").get("added_tokens", []):
            tokens[entry["content"]] = int(entry["id"])
    if (folder / "tokenizer_config.json").exists():
        for token_id, entry in read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
            tokens.setdefault(entry["content"], int(token_id))
    if (folder / "added_tokens.json").exists():
        for content, token_id in read_json(folder / "added_tokens.json").items():
            tokens.setdefault(content, int(token_id))
    return tokens


def vision_token_ids(folder: str | Path) -> dict[str, int]:
    """`image_token_id`, `video_token_id`, `vision_start_token_id`, `vision_end_token_id` for a checkpoint folder.

    Taken from the folder's tokenizer files (added tokens `<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`,
    `<|vision_end|>`) when present there; otherwise Qwen2's ids (151655, 151656, 151652, 151653), which every Qwen2,
    Qwen2.5 and Qwen2-VL tokenizer uses.
    """
    found = added_tokens(folder)
    return {name: found.get(text, QWEN2_VISION_TOKEN_IDS[name]) for name, text in VISION_TOKENS.items()}


def source_license(folder: str | Path) -> str | None:
    """The licence of a checkpoint folder: README.md front matter `license:`, else config.json `license`, else None."""
    from huggingface_hub import metadata_load

    folder = Path(folder)
    readme = folder / "README.md"
    if readme.exists():
        try:
            metadata = metadata_load(readme) or {}
        except Exception:  # broken front matter: no licence found there
            metadata = {}
        if metadata.get("license"):
            return str(metadata["license"])
    if (folder / "config.json").exists():
        license_name = read_json(folder / "config.json").get("license")
        if license_name:
            return str(license_name)
    return None
