"""Writing a nativevl folder: strict target check, streamed safetensors shards, config, remote code, processor.

The pieces every converter shares:

- `TargetTensor`: one output tensor, its shape and a callable that reads it from the source (nothing is read
  until its shard is written). `map_checkpoint` builds them from a `SourceCheckpoint` and a key table.
- `check_targets`: every tensor the model expects is produced, nothing else, with the right shape. The expected
  names and shapes come from `NativeVLForConditionalGeneration(config)` built on the meta device (no memory).
- `write_weights`: safetensors shards + `model.safetensors.index.json` laid out as `PreTrainedModel.save_pretrained`
  lays them out (same shard split from `huggingface_hub.split_state_dict_into_shards_factory`, same file names,
  same index fields), holding one tensor in memory at a time (`safetensors_io.save_streamed`).
- `check_output`: what may not be written (an existing folder without overwrite, a source folder); the folder
  itself is written through `nativevl.runs.atomic_output_dir` (complete or absent).
- `write_config`, `write_processor_config`, `copy_files`: config.json with `auto_map` and the remote-code files,
  the image processor config, tokenizer and generation files.
"""

import inspect
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from tqdm import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import get_relative_import_files

from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint, read_json
from nativevl.conversion.keymap import KeyTable, map_keys
from nativevl.conversion.safetensors_io import numel, save_streamed
from nativevl.modeling import NativeVLConfig, NativeVLForConditionalGeneration
from nativevl.modeling.modeling_nativevl import REMOTE_CODE_AUTO_MAP
from nativevl.processing import NativeVLImageProcessor, NativeVLProcessor
from nativevl.processing.image_processing_nativevl import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Copied as files when the source has them; preprocessor_config.json is rewritten for nativevl's processor instead.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


# Shard size units as huggingface_hub reads them (decimal), plus the binary ones.
SIZE_UNITS = {
    "TIB": 2**40,
    "GIB": 2**30,
    "MIB": 2**20,
    "KIB": 2**10,
    "TB": 10**12,
    "GB": 10**9,
    "MB": 10**6,
    "KB": 10**3,
}


def parse_size(value: str | int) -> int:
    """Bytes in a size like "5GB", "500MB", "1.5GiB" or "123456"."""
    if isinstance(value, int):
        return value
    text = value.strip().upper()
    for unit, factor in SIZE_UNITS.items():
        if text.endswith(unit):
            text, scale = text[: -len(unit)].strip(), factor
            break
    else:
        text, scale = text.removesuffix("B").strip(), 1
    try:
        size = int(float(text) * scale)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"{value!r} is not a size like '5GB', '500MB' or a number of bytes")
    return size


@dataclass
class TargetTensor:
    """One tensor of the output: its shape, where it comes from (for messages) and how to read it.

    `source_dtype`: the dtype `load` returns when it is not floating point (such tensors keep it); None or a floating
    dtype means the tensor is written in the conversion's output dtype."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    origin: str
    source_dtype: torch.dtype | None = None

    def output_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype this tensor is written in when floating tensors are written in `dtype`."""
        if self.source_dtype is None or self.source_dtype.is_floating_point:
            return dtype
        return self.source_dtype


def from_checkpoint(checkpoint: SourceCheckpoint, key: str, label: str) -> TargetTensor:
    return TargetTensor(checkpoint.shape(key), lambda: checkpoint.get(key), f"{label}:{key}", checkpoint.dtype(key))


def map_checkpoint(checkpoint: SourceCheckpoint, table: KeyTable, label: str) -> dict[str, TargetTensor]:
    """{target key: TargetTensor} for every kept source key of `checkpoint` (strict: unmatched keys raise)."""
    try:
        mapping = map_keys(checkpoint.keys(), table)
    except KeyError as error:
        raise KeyError(f"{label} checkpoint {checkpoint.folder}: {error.args[0]}") from None
    return {target: from_checkpoint(checkpoint, source, label) for source, target in mapping.items()}


def expected_shapes(config: NativeVLConfig) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} that `NativeVLForConditionalGeneration(config)` saves, built on the meta device."""
    with torch.device("meta"):
        model = NativeVLForConditionalGeneration(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied to the embedding: save_pretrained does not write it
    return shapes


def check_targets(tensors: dict[str, TargetTensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raises KeyError naming missing and unexpected keys (with their source), ValueError naming wrong shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(f"{key} (from {tensors[key].origin})" for key in set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"the converted weights do not match the nativevl model: {len(missing)} missing {missing[:20]}, "
            f"{len(unexpected)} unexpected {unexpected[:20]}"
        )
    wrong = [
        f"{key}: nativevl {list(shape)} vs {tensors[key].origin} {list(tensors[key].shape)}"
        for key, shape in expected.items()
        if tuple(tensors[key].shape) != shape
    ]
    if wrong:
        raise ValueError(f"{len(wrong)} tensor(s) have the wrong shape: {wrong[:20]}")


def write_weights(
    folder: Path, tensors: dict[str, TargetTensor], order: list[str], dtype: torch.dtype, max_shard_size: str | int
) -> list[str]:
    """Writes the tensors in `order` as safetensors shards (and the index when there are several); returns the
    shard file names. Floating tensors are cast to `dtype`. Peak memory: one source tensor and its cast copy."""
    dtypes = {key: tensors[key].output_dtype(dtype) for key in order}
    sizes = {key: numel(tensors[key].shape) * dtypes[key].itemsize for key in order}
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda size: size,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size),
    )

    def load(key: str) -> torch.Tensor:
        tensor = tensors[key].load()
        if tuple(tensor.shape) != tuple(tensors[key].shape):
            raise ConversionError(
                f"{tensors[key].origin} has shape {list(tensor.shape)} but its header said {list(tensors[key].shape)}"
            )
        floating = tensor.is_floating_point()
        if floating != dtypes[key].is_floating_point or (not floating and tensor.dtype != dtypes[key]):
            raise ConversionError(f"{tensors[key].origin} is {tensor.dtype} but its header said {dtypes[key]}")
        return tensor.to(dtypes[key])

    progress = tqdm(total=sum(sizes.values()), desc="Writing shards", unit="B", unit_scale=True)
    for filename, keys in split.filename_to_tensors.items():
        specs = {key: (tuple(tensors[key].shape), dtypes[key]) for key in keys}
        save_streamed(folder / filename, specs, load, metadata={"format": "pt"})
        progress.update(sum(sizes[key] for key in keys))
    progress.close()
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": sum(numel(tensors[k].shape) for k in order), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


def _is_inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(target: str | Path, overwrite: bool, sources: Iterable[str | Path] = ()) -> Path:
    """Raises ConversionError when `target` may not be written: an existing non-empty folder without `overwrite`,
    a file, or a folder that is or contains a source folder (replacing it would delete the source)."""
    target = Path(target).absolute()
    for source in sources:
        if _is_inside(Path(source).resolve(), target.resolve()):
            raise ConversionError(f"the output {target} is or contains the source folder {source}; choose another")
    if target.exists() and not target.is_dir():
        raise ConversionError(f"the output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConversionError(f"the output folder {target} exists and is not empty; pass --overwrite to replace it")
    return target


def copy_remote_code(folder: Path, module_file: str | Path) -> list[str]:
    """Copies a remote-code file and its single-dot sibling imports (as `save_pretrained` does); returns names."""
    files = [Path(module_file)] + [Path(f) for f in get_relative_import_files(str(module_file))]
    for file in files:
        shutil.copy(file, folder / file.name)
    return [file.name for file in files]


def write_config(folder: Path, config: NativeVLConfig, dtype: torch.dtype) -> None:
    """config.json as `NativeVLForConditionalGeneration.save_pretrained` writes it after `import nativevl`:
    `architectures`, `auto_map` for AutoConfig / AutoModel / AutoModelForImageTextToText, the dtype, and the
    remote-code files (`modeling_nativevl.py` and its single-dot siblings) beside it."""
    config.architectures = [NativeVLForConditionalGeneration.__name__]
    config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
    config.dtype = dtype
    config.save_pretrained(folder)
    copy_remote_code(folder, inspect.getfile(NativeVLForConditionalGeneration))


def write_generation_config(folder: Path, config: NativeVLConfig, source_folder: Path | None) -> None:
    """Copies the source's generation_config.json, or writes the one `save_pretrained` derives from the config."""
    if source_folder is not None and (source_folder / "generation_config.json").exists():
        shutil.copy(source_folder / "generation_config.json", folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)


def copy_files(source_folder: Path, folder: Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    """Copies the files of `names` that exist in `source_folder`; returns the names copied."""
    copied = []
    for name in names:
        if (source_folder / name).is_file():
            shutil.copy(source_folder / name, folder / name)
            copied.append(name)
    return copied


def processor_settings(folder: Path) -> dict:
    """min/max pixels and normalisation of a Qwen2-VL folder's preprocessor_config.json (`min_pixels` /
    `max_pixels`, which win, or `size: {shortest_edge, longest_edge}`); Qwen2-VL's defaults when absent."""
    settings = {
        "min_pixels": DEFAULT_MIN_PIXELS,
        "max_pixels": DEFAULT_MAX_PIXELS,
        "image_mean": None,
        "image_std": None,
    }
    path = folder / "preprocessor_config.json"
    if not path.exists():
        return settings
    source = read_json(path)
    size = source.get("size") if isinstance(source.get("size"), dict) else {}
    settings["min_pixels"] = int(source.get("min_pixels") or size.get("shortest_edge") or settings["min_pixels"])
    settings["max_pixels"] = int(source.get("max_pixels") or size.get("longest_edge") or settings["max_pixels"])
    settings["image_mean"] = source.get("image_mean")
    settings["image_std"] = source.get("image_std")
    return settings


def write_processor_config(
    folder: Path,
    config: NativeVLConfig,
    min_pixels: int,
    max_pixels: int,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> dict:
    """preprocessor_config.json for nativevl's image processor with the source's pixel limits (mean / std None:
    OpenAI CLIP's), its and the processor's remote-code files, and `auto_map` for both; returns the written dict."""
    vision = config.vision_config
    fields = {
        "min_pixels": int(min_pixels),
        "max_pixels": int(max_pixels),
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "image_mean": image_mean,
        "image_std": image_std,
    }
    NativeVLImageProcessor(**fields).save_pretrained(folder)
    copy_remote_code(folder, inspect.getfile(NativeVLImageProcessor))
    copy_remote_code(folder, inspect.getfile(NativeVLProcessor))
    # the processor's own settings: its position ids follow the model's scheme (1-D for NativeRes-LLaVA)
    own = {
        "position_scheme": config.position_scheme,
        "processor_class": "NativeVLProcessor",
        "auto_map": {"AutoProcessor": "processing_nativevl.NativeVLProcessor"},
    }
    (folder / "processor_config.json").write_text(json.dumps(own, indent=2, sort_keys=True) + "\n")
    path = folder / "preprocessor_config.json"
    content = read_json(path)
    content["auto_map"] = {
        **(content.get("auto_map") or {}),
        "AutoImageProcessor": "image_processing_nativevl.NativeVLImageProcessor",
        "AutoProcessor": "processing_nativevl.NativeVLProcessor",
    }
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return content
