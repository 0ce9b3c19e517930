"""Image input for nativevl: the one reader that decodes images, for the processor, evaluation and training alike.

Everything an image input goes through before resizing lives here:

- **Sizes without pixels.** `image_size` reads ``(height, width)`` as displayed from a header (EXIF orientation
  applied) for every input type ``NativeVLImageProcessor.preprocess`` accepts; the processor's token budget and
  evaluation's record checks use it.
- **Input safety.** File paths are opened only when they are regular files (`_open_regular`: a FIFO or device is
  refused without blocking); file-backed images above ``PIL.Image.MAX_IMAGE_PIXELS`` are refused before anything
  decodes them (`_check_bomb`); undecodable or truncated files raise ValueError naming the input and its size.
- **Decoding.** `load_image` gives a decoded PIL image as displayed (evaluation and packing); `decode_rgb` adds the
  processor's conversion to RGB. EXIF orientation is applied to every PIL input (``ImageOps.exif_transpose``),
  so the model sees the image as the user does; transformers only does it for file paths. Alpha is composited on
  white, for files and bytes too (transformers' ``load_image`` drops it).
- **Array conversion.** numpy arrays and torch tensors (HWC, CHW, HW; the channel axis inferred, or given by
  ``input_data_format``) become uint8 PIL images: 16-bit values are scaled to 8 bits (``v / 257``) when
  ``scale_16bit``, floats must lie in [0, 1] and are quantised (``round(x * 255)``), RGBA is composited on white
  exactly as transformers' ``convert_to_rgb`` (numpy branch) does it.

Mirrors ``transformers/image_utils.py`` (``load_image``, ``infer_channel_dimension_format``) and
``transformers/image_transforms.py`` (``convert_to_rgb``), with the differences listed above (each has a test).

This file is remote code: it is copied flat into a model folder (a single-dot import of
``image_processing_nativevl.py``) and imports only the standard library, numpy, PIL and torch.
"""

import io
import os
import stat
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps


_EXIF_ORIENTATION = 0x0112


class DecodeSettings(Protocol):
    """The two settings decoding depends on (the image processor's resolved per-call settings provide them)."""

    do_convert_rgb: bool  # convert to RGB, compositing transparency on white; False accepts only 3-channel inputs
    scale_16bit: bool  # scale 16-bit grayscale to 8 bits (v / 257) instead of clipping at 255


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored; 2-8 mirror / rotate; 5-8 swap height and width)."""
    return image.getexif().get(_EXIF_ORIENTATION, 1)


def _displayed_hw(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of an image as displayed: the one place EXIF orientation turns into a size."""
    w, h = image.size
    return (w, h) if _orientation(image) in (5, 6, 7, 8) else (h, w)


# ------------------------------------------------------------------------------------------------ input structure
def _is_image_like(x) -> bool:
    return isinstance(x, Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes | bytearray | memoryview)


def flatten_images(images) -> list:
    """One image, a list of images, a one-level nested list (images per sample), or a 4-D batch -> flat list."""
    if isinstance(images, np.ndarray | torch.Tensor) and images.ndim == 4:
        return list(images)
    if not isinstance(images, list | tuple):
        return [images]
    flat = []
    for item in images:
        if isinstance(item, list | tuple):
            flat.extend(item)
        elif isinstance(item, np.ndarray | torch.Tensor) and item.ndim == 4:
            flat.extend(list(item))
        else:
            flat.append(item)
    return flat


def batch_videos(videos) -> list[list]:
    """One video (list of frames or 4-D array) or a list of videos -> list of lists of frames."""
    if isinstance(videos, np.ndarray | torch.Tensor):
        if videos.ndim == 5:
            return [list(v) for v in videos]
        if videos.ndim == 4:
            return [list(videos)]
        raise ValueError(f"a video array must be 4-D (T, H, W, C) or 5-D (B, T, H, W, C), got shape {videos.shape}")
    if not isinstance(videos, list | tuple):
        raise ValueError(f"videos must be a list of videos or a 4-D array, got {type(videos).__name__}")
    if len(videos) > 0 and all(_is_image_like(f) and not _is_batch(f) for f in videos):
        return [list(videos)]  # a flat list of frames is one video, as in transformers
    out = []
    for v, video in enumerate(videos):
        if isinstance(video, np.ndarray | torch.Tensor) and video.ndim == 4:
            out.append(list(video))
        elif isinstance(video, list | tuple):
            out.append(list(video))
        else:
            raise ValueError(f"video {v}: expected a list of frames or a 4-D array, got {type(video).__name__}")
    return out


def _is_batch(x) -> bool:
    return isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 4


# -------------------------------------------------------------------------------------------- opening and input safety
class ImageSource:
    """One input after the cheap checks: a PIL image (file-backed ones not decoded yet) and its label."""

    def __init__(self, label: str, image: Image.Image, owned: bool, cost: int):
        self.label = label
        self.image = image
        self.owned = owned  # opened here from a path or bytes: close it when done
        self.cost = cost  # input pixels, to schedule big images first

    def close(self):
        if self.owned:
            self.image.close()


def open_sources(items: list, label: str, cfg: DecodeSettings, input_data_format) -> list["ImageSource"]:
    """Open every input in the calling thread: bytes/paths to lazy PIL images, arrays to PIL images.

    Only headers are read here (and whole arrays converted); decoding happens on the worker threads.
    """
    sources: list[ImageSource] = []
    seen: set[int] = set()
    try:
        for i, item in enumerate(items):
            name = f"{label} {i}"
            image, owned = _open_one(item, name, cfg, input_data_format)
            sources.append(ImageSource(name, image, owned, image.size[0] * image.size[1]))
            w, h = image.size
            if h <= 0 or w <= 0:
                raise ValueError(f"{name}: size {h}x{w} (h x w) has no pixels")
            _check_bomb(image, name)
            # the same object twice in one call: load it here (lazy decode, palette state), not on two threads at once
            if id(image) in seen:
                _load(image, name)
            seen.add(id(image))
    except BaseException:
        for src in sources:
            src.close()
        raise
    return sources


def image_size(image, input_data_format: str | None = None) -> tuple[int, int]:
    """``(height, width)`` of one image input as `NativeVLImageProcessor` will see it, without decoding pixels.

    Accepts every image type ``preprocess`` does: a PIL image (EXIF orientation applied), a numpy array (HWC, CHW
    or HW; channel axis inferred as in ``preprocess``, default channels-last), a torch tensor (default
    channels-first), a file path (``str`` or ``os.PathLike``; only regular files, a FIFO or device is refused
    without being opened), ``bytes``, ``bytearray`` or ``memoryview``. Files and bytes are read up to their header
    and refused above ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bomb), as ``preprocess`` refuses them.
    Raises ValueError for anything else, e.g. a 4-D batch.
    """
    name = "image"
    if isinstance(image, torch.Tensor | np.ndarray):
        default = "channels_first" if isinstance(image, torch.Tensor) else "channels_last"
        h, w, _, _ = _array_layout(tuple(image.shape), name, input_data_format, default)
        return h, w
    if isinstance(image, Image.Image):
        opened, owned = image, False
    elif isinstance(image, bytes | bytearray | memoryview):
        opened, owned = _open_file(io.BytesIO(bytes(image)), name, f"{len(image)} bytes"), True
    elif isinstance(image, str | os.PathLike):
        f = _open_regular(os.fspath(image), name)
        try:
            opened, owned = _open_file(f, name, repr(os.fspath(image))), True
        except BaseException:
            f.close()
            raise
    else:
        raise ValueError(f"{name}: cannot read the size of an input of type {type(image).__name__}")
    try:
        _check_bomb(opened, name)
        return _displayed_hw(opened)
    finally:
        if owned:
            opened.close()


def load_image(image, name: str = "image") -> Image.Image:
    """The decoded PIL image of a file path, encoded bytes or a PIL image, as displayed (EXIF orientation applied),
    its mode kept (transparency is composited later, by the image processor).

    The checks are ``preprocess``'s: paths must be regular files (read into memory, no handle stays open), and a
    file-backed image above ``PIL.Image.MAX_IMAGE_PIXELS`` is refused before it is decoded. Raises ValueError
    naming `name` for an input that cannot be decoded, and for arrays, tensors and anything else (convert those
    with the image processor).
    """
    if not isinstance(image, Image.Image | bytes | bytearray | memoryview | str | os.PathLike):
        raise ValueError(
            f"{name}: cannot load an input of type {type(image).__name__} (expected a PIL image, a path or bytes)"
        )
    opened, _ = _open_one(image, name, None, None)  # decode settings are only read for arrays
    _check_bomb(opened, name)
    _load(opened, name)
    return ImageOps.exif_transpose(opened) if _orientation(opened) in (2, 3, 4, 5, 6, 7, 8) else opened


def _open_regular(path: str, name: str):
    """A binary file object of `path`, refused unless it is a regular file: a FIFO or a device could block forever
    (opened non-blocking, then checked on the descriptor, so a file swapped for a FIFO meanwhile is refused too)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        reason = "no such file" if isinstance(err, FileNotFoundError) else f"cannot open ({err.strerror})"
        raise ValueError(f"{name}: {reason} {path!r} (URLs and base64 strings are not fetched)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{name}: {path!r} is not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _check_bomb(image: Image.Image, name: str) -> None:
    """Refuses a file-backed image above ``PIL.Image.MAX_IMAGE_PIXELS`` before anything decodes it."""
    w, h = image.size
    if isinstance(image, ImageFile.ImageFile) and Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{name}: size {h}x{w} (h x w) = {w * h} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS="
            f"{Image.MAX_IMAGE_PIXELS} (possible decompression bomb)"
        )


def _open_one(item, name: str, cfg: DecodeSettings | None, input_data_format) -> tuple[Image.Image, bool]:
    if isinstance(item, Image.Image):
        return item, False
    if isinstance(item, bytes | bytearray | memoryview):
        return _open_file(io.BytesIO(bytes(item)), name, f"{len(item)} bytes"), True
    if isinstance(item, str | os.PathLike):
        path = os.fspath(item)
        with _open_regular(path, name) as f:  # read now: no file handle stays open per image of a large batch
            data = f.read()
        return _open_file(io.BytesIO(data), name, repr(path)), True
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        array = (item.float() if item.is_floating_point() else item).numpy()
        return _array_to_pil(array, name, cfg, input_data_format, "channels_first"), False
    if isinstance(item, np.ndarray):
        return _array_to_pil(item, name, cfg, input_data_format, "channels_last"), False
    raise ValueError(
        f"{name}: unsupported input type {type(item).__name__}; expected a PIL image, numpy array, torch tensor, "
        f"file path or bytes"
    )


def _open_file(fp, name: str, what: str) -> Image.Image:
    try:
        return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL raises above 2 * MAX_IMAGE_PIXELS (and warns above it; an error when warnings are errors)
        raise ValueError(f"{name}: {what} is a possible decompression bomb: {err}") from err
    except Exception as err:
        raise ValueError(f"{name}: cannot identify an image in {what}: {type(err).__name__}: {err}") from err


def _load(image: Image.Image, name: str) -> None:
    try:
        image.load()
    except Exception as err:
        w, h = image.size
        raise ValueError(
            f"{name}: size {h}x{w} (h x w): cannot decode ({type(err).__name__}: {err}); corrupt or truncated file?"
        ) from err


# -------------------------------------------------------------------------------------------------------------- arrays
def _array_to_pil(
    array: np.ndarray, name: str, cfg: DecodeSettings, data_format: str | None, default: str
) -> Image.Image:
    """HWC / CHW / HW array -> RGB (or L/RGBA before conversion) uint8 PIL image, matching transformers' numpy path."""
    h, w, c, channels_first = _array_layout(array.shape, name, data_format, default)
    array = array.reshape(h, w, 1) if array.ndim == 2 else np.moveaxis(array, 0, -1) if channels_first else array
    if h == 0 or w == 0:
        raise ValueError(f"{name}: size {h}x{w} (h x w) has no pixels")
    array = _to_uint8(array, f"{name}: size {h}x{w} (h x w)", cfg)
    if c == 1:
        array = np.repeat(array, 3, axis=-1) if cfg.do_convert_rgb else array
    elif c == 4 and cfg.do_convert_rgb:
        # transformers.image_transforms.convert_to_rgb, numpy branch: round(a/255 * x + (1 - a/255) * 255), computed
        # exactly in uint16 (a*x + (255-a)*255 <= 65025; the exact quotient never ends in .5, so +127 // 255 rounds
        # as float64 does) instead of float64 temporaries 8x the image's size
        alpha = array[..., 3:4].astype(np.uint16)
        rgb = array[..., :3].astype(np.uint16)
        rgb *= alpha
        rgb += (255 - alpha) * 255 + 127
        rgb //= 255
        array = rgb.astype(np.uint8)
    if array.shape[-1] != 3:
        raise ValueError(f"{name}: do_convert_rgb=False needs 3 channels, got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _array_layout(
    shape: tuple[int, ...], name: str, data_format: str | None, default: str
) -> tuple[int, int, int, bool]:
    """(height, width, channels, channels_first) of an image array's shape. The channel axis is the end axis of size
    1, 3 or 4; when both ends are, `data_format` (else `default`) decides. ``(C, H, 2)`` is ambiguous (channels-first
    with a 2-px width, or a gray + alpha image) and needs `data_format`; transformers reads it channels-first."""
    if len(shape) == 2:
        return shape[0], shape[1], 1, False
    if len(shape) != 3:
        raise ValueError(f"{name}: array of shape {shape} is not an image (expected 2-D or 3-D)")
    first, last = shape[0] in (1, 3, 4), shape[-1] in (1, 3, 4)
    if data_format is None and first and shape[-1] == 2:
        raise ValueError(
            f"{name}: array of shape {shape} is ambiguous (channels-first with a side of 2 px, or channels-last with "
            "2 channels); pass input_data_format='channels_first' or 'channels_last'"
        )
    channels_first = first and (not last or (data_format or default) in ("channels_first", "first"))
    if not channels_first and not last:
        raise ValueError(f"{name}: array of shape {shape} has no channel axis of size 1, 3 or 4")
    return (shape[1], shape[2], shape[0], True) if channels_first else (shape[0], shape[1], shape[2], False)


def _to_uint8(array: np.ndarray, name: str, cfg: DecodeSettings) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16 and cfg.scale_16bit:
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(np.min(array)), float(np.max(array))
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise ValueError(f"{name}: float image values must be in [0, 1], got [{lo}, {hi}]")
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(np.min(array)), int(np.max(array))
        if lo < 0 or hi > 255:
            raise ValueError(f"{name}: integer image values must be in [0, 255], got [{lo}, {hi}] ({array.dtype})")
        return array.astype(np.uint8)
    raise ValueError(f"{name}: unsupported array dtype {array.dtype}")


# ------------------------------------------------------------------------------------------ decoding for the processor
def decode_rgb(image: Image.Image, cfg: DecodeSettings, name: str) -> Image.Image:
    """Decode, apply EXIF orientation, convert to RGB as transformers' ``convert_to_rgb`` (alpha onto white)."""
    _load(image, name)
    if _orientation(image) in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    if cfg.scale_16bit and image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint32)  # (H, W), any endianness
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # mode "L"
    if not cfg.do_convert_rgb:
        if image.mode != "RGB":
            raise ValueError(f"{name}: do_convert_rgb=False needs an RGB image, got mode {image.mode}")
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def displayed_size(src: ImageSource) -> tuple[int, int]:
    """``(height, width)`` after EXIF orientation (decodes a lazy file, does not convert)."""
    _load(src.image, src.label)
    return _displayed_hw(src.image)


@contextmanager
def naming(src: ImageSource):
    """Re-raise any failure while handling ``src`` as a ValueError that names it and its size."""
    try:
        yield
    except ValueError as err:
        if str(err).startswith(src.label):
            raise
        raise ValueError(f"{src.label}: size {_hw(src.image)} (h x w): {err}") from err
    except Exception as err:
        raise ValueError(f"{src.label}: size {_hw(src.image)} (h x w): {type(err).__name__}: {err}") from err


def _hw(image: Image.Image) -> str:
    w, h = image.size
    return f"{h}x{w}"
