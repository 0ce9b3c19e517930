"""safetensors files read and written one tensor at a time, with plain file reads and writes (no memory map).

A memory-mapped file counts every page it touched in the process's resident memory until it is unmapped, so reading
a whole checkpoint through `safetensors.safe_open` keeps the checkpoint resident beside the tensors made from it.
Here a tensor is read with `readinto` into memory it owns, and a file is written from its header (known from shapes
and dtypes alone) followed by each tensor as it is produced: converting holds one tensor, not one shard.

The format (github.com/huggingface/safetensors, `README.md` "Format"): an 8-byte little-endian header length N, N
bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` padded with
spaces to a multiple of 8, then the tensors' bytes, contiguous and in the order of their offsets. Tensors are written
in the order safetensors' own serializer uses (larger dtypes first, then by name).
"""

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch


# safetensors dtype names <-> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class SafetensorsError(ValueError):
    """A file that is not a complete safetensors file; the message names the file and what is wrong."""


def numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def read_header(path: str | Path) -> tuple[int, dict[str, dict], dict[str, str]]:
    """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors file, checked:
    known dtypes, byte counts that fit the shapes, offsets that tile the data exactly, a file that is not truncated."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path}: header length {length} does not fit a file of {size} bytes")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a {type(header).__name__}, not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1].get("data_offsets", [0])[0]):
        dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        begin, stop = entry.get("data_offsets", (None, None))
        if dtype is None:
            raise SafetensorsError(
                f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, not one of {list(DTYPE_NAMES.values())}"
            )
        if begin != end or stop - begin != numel(entry["shape"]) * dtype.itemsize:
            raise SafetensorsError(
                f"{path}: tensor {name} {entry.get('dtype')} {entry['shape']} has data_offsets {[begin, stop]}; "
                f"expected to start at {end} and hold {numel(entry['shape']) * dtype.itemsize} bytes"
            )
        end = stop
    if 8 + length + end != size:
        raise SafetensorsError(f"{path}: the header describes {8 + length + end} bytes but the file has {size}")
    return 8 + length, header, metadata


def read_tensor(path: str | Path, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor of a safetensors file (`entry` from `read_header`), read into a fresh CPU tensor it owns."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    data = torch.empty(end - begin, dtype=torch.uint8)  # (bytes,)
    with open(path, "rb") as file:
        file.seek(data_start + begin)
        got = file.readinto(memoryview(data.numpy()))
    if got != end - begin:
        raise SafetensorsError(f"{path}: read {got} of the {end - begin} bytes of a tensor (file truncated?)")
    return data.view(dtype).view(entry["shape"])  # (bytes,) -> shape, same memory


def save_streamed(
    path: str | Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    load: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes the safetensors file `path` holding `specs` ({name: (shape, dtype)}); `load(name)` is called once per
    tensor, in file order, and its result written and dropped before the next. A tensor that does not match its spec
    raises ValueError (the file is then incomplete: callers write into a staging folder)."""
    order = sorted(specs, key=lambda name: (-specs[name][1].itemsize, name))
    header, offset = {}, 0
    for name in order:
        shape, dtype = specs[name]
        nbytes = numel(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)))
        file.write(text)
        for name in order:
            shape, dtype = specs[name]
            tensor = load(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: got {tensor.dtype} {list(tensor.shape)} to write, the header says {dtype} {list(shape)}"
                )
            data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8)  # (bytes,)
            file.write(memoryview(data.numpy()))
            del tensor, data
