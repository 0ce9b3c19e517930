"""Image and video processor for native-resolution VLMs, in Qwen2-VL's pixel layout.

Three image modes, as compared in NativeRes-LLaVA (arXiv 2506.12776):

- ``native``: Qwen2-VL's naive dynamic resolution (arXiv 2409.12191). Each side goes to a multiple of 28 and the
  area is kept inside ``[min_pixels, max_pixels]`` (`smart_resize`).
- ``fixed``: every image to the same pixel budget ``fixed_pixels`` (the paper's Fixed-378 baseline), aspect ratio
  kept (``keep_aspect=True``) or squashed to a square.
- ``crop``: LLaVA-NeXT "anyres" tiling: a downscaled global view, then ``crop_base_size`` tiles of the image
  resized (aspect kept) and padded onto the best grid of ``crop_grid_pinpoints``. Each view is its own grid row.

Output layout (all modes, also videos): ``pixel_values`` is ``(sum of patches, C * T * patch * patch)`` float32,
one row per ``patch x patch`` patch laid out ``(C, T, ph, pw)``; the rows of one grid are ordered
merge-block-major (``merge x merge`` blocks in raster order, the patches of a block in raster order inside it), so
the vision merger can view ``merge**2`` consecutive rows as one LLM token. A still image fills both temporal slots.

Mirrors, and is tested against:

- ``transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py`` (``smart_resize``, ``patchify``) and the PIL
  backend it runs on (``image_processing_backends.PilBackend``, ``image_transforms.convert_to_rgb/resize/rescale/
  normalize``): same RGB conversion, same PIL bicubic resize on uint8, same float op order, so values are
  bit-identical in native mode.
- ``transformers/models/qwen2_vl/video_processing_qwen2_vl.py`` (``patchify``: temporal patching, last frame
  repeated to fill the last temporal patch). That processor needs torchvision; here frames go through the same PIL
  path as images (see `NativeVLImageProcessor.preprocess`).
- ``transformers/models/llava_next/image_processing_pil_llava_next.py`` and
  ``transformers/image_processing_utils.py`` (``select_best_resolution``, ``get_patch_output_size``) for crop mode.

Deliberate differences from ``Qwen2VLImageProcessorPil`` (each has a test):

- EXIF orientation is applied to every PIL input (``ImageOps.exif_transpose``), so the model sees the image as the
  user does; transformers only does it for file paths.
- 16-bit grayscale (``I;16*`` modes, uint16 arrays) is scaled to 8 bits (``v / 257``) when ``scale_16bit=True``;
  PIL's ``convert("RGB")``, which transformers uses, clips at 255 and turns most 16-bit images white.
- File paths and bytes are decoded like in-memory images (alpha composited on white); transformers' ``load_image``
  drops the alpha channel of files instead.
- Float arrays must be in [0, 1]; they are quantised to uint8 (``round(x * 255)``) and then processed like uint8
  images. transformers truncates instead and then rescales by 1/255 a second time.

Kept exactly as transformers does them (native mode stays identical to ``Qwen2VLImageProcessorPil``):
``smart_resize`` rounding (each side to the nearest multiple of 28 with Python's round-half-even, then floor when
shrinking and ceil when growing by the square root of the area ratio), and 32-bit integer ``"I"`` images, which
``convert("RGB")`` clips at 255 as in transformers (only ``I;16*`` is rescaled, above).

`image_size` is the one size reader for every input type ``preprocess`` accepts; the processor's token budget uses
it. It never opens a FIFO or device, and it applies the decompression-bomb limit as ``preprocess`` does.

This file is remote code: it is copied flat into a model folder and imports only the standard library, numpy,
PIL, torch and transformers.
"""

import io
import math
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen2-VL's native-mode area bounds in pixels (released checkpoints raise the maximum to 12,845,056)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, stored as a plain int so the config stays JSON
MODES = ("native", "fixed", "crop")
_EXIF_ORIENTATION = 0x0112


class NativeVLImageProcessorKwargs(ImagesKwargs, total=False):
    """Per-call overrides accepted by `NativeVLImageProcessor.preprocess` (and by a processor's ``images_kwargs``).

    Units: ``*_pixels`` are pixel areas (height * width), ``*_size`` are side lengths in pixels.
    """

    min_pixels: int | None
    max_pixels: int | None
    patch_size: int | None
    temporal_patch_size: int | None
    merge_size: int | None
    mode: str | None
    fixed_pixels: int | None
    keep_aspect: bool | None
    crop_base_size: int | None
    crop_grid_pinpoints: list[list[int]] | None
    max_aspect_ratio: float | int | None
    video_min_pixels: int | None
    video_max_pixels: int | None
    scale_16bit: bool | None
    num_threads: int | None


# Copied from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.smart_resize, with the aspect limit as an
# argument and the size in the error message.
def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_ratio: float = 200,
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``, aspect kept.

    Sides are rounded to the nearest multiple of ``factor`` (Python's round-half-even); if the area then leaves the
    range, both sides are rescaled by the square root of the ratio, floored when shrinking (never below ``factor``)
    and ceiled when growing. Golden value: ``smart_resize(561, 278) == (560, 280)``.

    Returns:
        ``(resized_height, resized_width)`` in pixels.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (h x w) has no pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > max_ratio:
        raise ValueError(
            f"image size {height}x{width} (h x w) has aspect ratio {ratio:.1f}, above the limit of {max_ratio}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# Copied from transformers.image_processing_utils.select_best_resolution (LLaVA-NeXT anyres).
def select_best_resolution(original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]):
    """Pick the ``(height, width)`` that maximises the effective resolution, then minimises the wasted area."""
    original_height, original_width = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (height, width)
    return best_fit


# Copied from transformers.image_processing_utils.get_patch_output_size (LLaVA-NeXT: fit inside, aspect kept).
def _patch_output_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    scale_w = target_width / width
    scale_h = target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


@dataclass(frozen=True)
class _Config:
    """Resolved settings of one call (instance attributes plus per-call overrides), validated once."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_convert_rgb: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    resample: int
    mode: str
    fixed_pixels: int
    keep_aspect: bool
    crop_base_size: int
    crop_grid_pinpoints: tuple[tuple[int, int], ...]
    max_aspect_ratio: float
    video_min_pixels: int
    video_max_pixels: int
    scale_16bit: bool
    num_threads: int | None

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "fixed_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if not all(math.isfinite(v) for v in (*self.image_mean, *self.image_std)) or 0 in self.image_std:
            raise ValueError(
                f"image_mean and image_std must be finite, std non-zero; got {self.image_mean}, {self.image_std}"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("patch_size", "temporal_patch_size", "merge_size", "crop_base_size", "fixed_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for lo, hi in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if not 0 < getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"need 0 < {lo} <= {hi}, got {getattr(self, lo)} and {getattr(self, hi)}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, {self.image_std}")
        if not self.crop_grid_pinpoints:
            raise ValueError("crop_grid_pinpoints must list at least one [height, width]")
        for h, w in self.crop_grid_pinpoints:
            if h <= 0 or w <= 0 or h % self.crop_base_size or w % self.crop_base_size:
                raise ValueError(
                    f"crop_grid_pinpoints entry {[h, w]} is not a positive multiple of crop_base_size="
                    f"{self.crop_base_size}"
                )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def threads(self) -> int:
        return self.num_threads if self.num_threads is not None else min(8, os.cpu_count() or 1)

    @property
    def tile_side(self) -> int:
        # crop tiles are resized to the nearest multiple of the merged-patch size, e.g. 336 -> 336, 384 -> 392
        return max(self.factor, round(self.crop_base_size / self.factor) * self.factor)

    def check_aspect(self, height: int, width: int, label: str) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"{label}: size {height}x{width} (h x w) has no pixels")
        ratio = max(height, width) / min(height, width)
        if ratio > self.max_aspect_ratio:
            raise ValueError(
                f"{label}: size {height}x{width} (h x w) has aspect ratio {ratio:.1f}, above max_aspect_ratio="
                f"{self.max_aspect_ratio}"
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Target ``(height, width)`` in native and fixed modes."""
        if self.mode == "native":
            return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels, self.max_aspect_ratio)
        if self.keep_aspect:
            return smart_resize(
                height, width, self.factor, self.fixed_pixels, self.fixed_pixels, self.max_aspect_ratio
            )
        side = max(self.factor, round(math.sqrt(self.fixed_pixels) / self.factor) * self.factor)
        return side, side

    def image_grids(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """``(t, h, w)`` patch grids one image of this size produces (global view first, then tiles, in crop mode)."""
        p = self.patch_size
        if self.mode != "crop":
            rh, rw = self.resized_size(height, width)
            return [(1, rh // p, rw // p)]
        best_h, best_w = select_best_resolution((height, width), self.crop_grid_pinpoints)
        num_tiles = (best_h // self.crop_base_size) * (best_w // self.crop_base_size)
        side = self.tile_side // p
        return [(1, side, side)] * (1 + num_tiles)


@dataclass
class _Unit:
    """One grid to write: its frames as C uint8 planes of shape (h * patch, w * patch) each, and its grid."""

    frames: list[list[np.ndarray]]
    grid: tuple[int, int, int]


def _run_parallel(fn: Callable[[Any], Any], items: Sequence[Any], threads: int, cost=None) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread pool (PIL and numpy release the GIL), biggest ``cost`` first.

    Every item runs to completion; then the error of the lowest failing index is raised, so the error does not
    depend on thread timing.
    """
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    order = sorted(range(len(items)), key=lambda i: -cost[i]) if cost is not None else range(len(items))
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        futures = {i: pool.submit(fn, items[i]) for i in order}
        results, errors = [None] * len(items), {}
        for i, future in futures.items():
            try:
                results[i] = future.result()
            except BaseException as err:  # noqa: B036 - re-raised below
                errors[i] = err
    if errors:
        raise errors[min(errors)]
    return results


class NativeVLImageProcessor(BaseImageProcessor):
    r"""Qwen2-VL-layout image and video processor with native, fixed and crop (anyres) image modes.

    Args:
        min_pixels, max_pixels: image area bounds of `smart_resize` in native mode, in pixels.
        patch_size: ViT patch side in pixels (14).
        temporal_patch_size: frames per temporal patch (2); a still image is repeated to fill it.
        merge_size: side of the block of patches merged into one LLM token (2, so 4 patches per token).
        image_mean, image_std: per-channel normalisation (OpenAI CLIP by default).
        do_convert_rgb: convert inputs to RGB, compositing transparency onto white. ``False`` accepts only
            3-channel inputs.
        do_rescale, rescale_factor, do_normalize: ``(x * rescale_factor - mean) / std`` on the resized uint8
            image, in transformers' op order (float64 rescale, float32 normalise).
        resample: PIL resampling filter (int), bicubic by default.
        mode: ``"native"``, ``"fixed"`` or ``"crop"``, see the module docstring.
        fixed_pixels: pixel budget of every image in fixed mode (378*378, about 182 merged tokens).
        keep_aspect: in fixed mode, keep the aspect ratio (`smart_resize` with min = max = ``fixed_pixels``) or
            squash to a square of side ``sqrt(fixed_pixels)`` rounded to a multiple of ``patch_size * merge_size``.
        crop_base_size: tile side in crop mode before the tile is resized to the nearest multiple of
            ``patch_size * merge_size``.
        crop_grid_pinpoints: candidate ``[height, width]`` canvases in crop mode, multiples of ``crop_base_size``;
            default ``[[b, 2b], [2b, b], [2b, 2b], [3b, b], [b, 3b]]`` with ``b = crop_base_size``.
        max_aspect_ratio: inputs with ``long side / short side`` above this raise (all modes, and videos).
        video_min_pixels, video_max_pixels: `smart_resize` bounds for video frames (Qwen2-VL's video defaults).
        scale_16bit: scale 16-bit grayscale to 8 bits (``v / 257``); ``False`` reproduces transformers, which
            clips at 255.
        num_threads: worker threads for decoding, resizing and patching; ``None`` means ``min(8, os.cpu_count())``
            at call time. Use 1 inside DataLoader workers.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "image_num_grids", "pixel_values_videos", "video_grid_thw"]
    valid_kwargs = NativeVLImageProcessorKwargs

    def __init__(
        self,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        resample: int = BICUBIC,
        mode: str = "native",
        fixed_pixels: int = 378 * 378,
        keep_aspect: bool = True,
        crop_base_size: int = 336,
        crop_grid_pinpoints: Sequence[Sequence[int]] | None = None,
        max_aspect_ratio: float = 200,
        video_min_pixels: int = 128 * 28 * 28,
        video_max_pixels: int = 768 * 28 * 28,
        scale_16bit: bool = True,
        num_threads: int | None = None,
        **kwargs,
    ):
        # Qwen2-VL configs carry the bounds as size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
        size = kwargs.pop("size", None)
        if isinstance(size, dict):
            min_pixels = size.get("shortest_edge", size.get("min_pixels", min_pixels))
            max_pixels = size.get("longest_edge", size.get("max_pixels", max_pixels))
        super().__init__(**kwargs)
        b = int(crop_base_size)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.temporal_patch_size = int(temporal_patch_size)
        self.merge_size = int(merge_size)
        self.image_mean = _three_floats(OPENAI_CLIP_MEAN if image_mean is None else image_mean, "image_mean")
        self.image_std = _three_floats(OPENAI_CLIP_STD if image_std is None else image_std, "image_std")
        self.do_convert_rgb = bool(do_convert_rgb)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.resample = int(resample)
        self.mode = str(mode)
        self.fixed_pixels = int(fixed_pixels)
        self.keep_aspect = bool(keep_aspect)
        self.crop_base_size = b
        pinpoints = crop_grid_pinpoints or [[b, 2 * b], [2 * b, b], [2 * b, 2 * b], [3 * b, b], [b, 3 * b]]
        self.crop_grid_pinpoints = [[int(h), int(w)] for h, w in pinpoints]
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.video_min_pixels = int(video_min_pixels)
        self.video_max_pixels = int(video_max_pixels)
        self.scale_16bit = bool(scale_16bit)
        self.num_threads = None if num_threads is None else int(num_threads)
        self._config({})  # validate now rather than at the first call

    @property
    def size(self) -> dict[str, int]:
        """The native-mode pixel bounds as transformers 5's Qwen2-VL image processor holds them:
        ``{"shortest_edge": min_pixels, "longest_edge": max_pixels}`` (areas in pixels, despite the names)."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @size.setter
    def size(self, value: dict[str, int]) -> None:
        if not isinstance(value, dict) or not {"shortest_edge", "longest_edge"} <= set(value):
            raise ValueError(
                f"size must be {{'shortest_edge': min_pixels, 'longest_edge': max_pixels}}, got {value!r}"
            )
        self.min_pixels, self.max_pixels = int(value["shortest_edge"]), int(value["longest_edge"])

    def validate(self) -> None:
        """Raises ValueError, naming the value, when the current settings cannot process an image (e.g. after
        setting attributes by hand)."""
        self._config({})

    # ----------------------------------------------------------------------------------------------- settings
    def _config(self, overrides: dict[str, Any]) -> _Config:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        size = overrides.pop("size", None)
        if isinstance(size, dict):
            overrides.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
            overrides.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
            overrides = {k: v for k, v in overrides.items() if v is not None}
        ignored = {"do_resize", "default_to_square", "device", "disable_grouping", "data_format", "image_seq_length"}
        if overrides.get("do_resize") is False:
            raise ValueError("do_resize=False is not supported: grids need sides that are multiples of 28")
        names = _Config.__dataclass_fields__
        unknown = sorted(k for k in overrides if k not in names and k not in ignored and k != "input_data_format")
        if unknown:
            raise ValueError(f"unknown image processor arguments {unknown}")
        values = {name: overrides.get(name, getattr(self, name)) for name in names}
        values["image_mean"] = _three_floats(values["image_mean"], "image_mean")
        values["image_std"] = _three_floats(values["image_std"], "image_std")
        values["crop_grid_pinpoints"] = tuple((int(h), int(w)) for h, w in values["crop_grid_pinpoints"])
        values["resample"] = int(values["resample"])
        return _Config(**values)

    # ------------------------------------------------------------------------------------------ token counts
    def get_image_grids(self, height: int, width: int, images_kwargs: dict | None = None) -> list[tuple[int, ...]]:
        """``(t, h, w)`` patch grids an image of ``height x width`` pixels (as displayed) produces, without pixels.

        One grid in native and fixed modes; the global view then each tile in crop mode.
        """
        cfg = self._config(images_kwargs or {})
        cfg.check_aspect(height, width, "image")
        return cfg.image_grids(height, width)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Rows of ``pixel_values`` for one image of ``height x width`` (summed over tiles in crop mode).

        Same contract as transformers' ``Qwen2VLImageProcessor.get_number_of_image_patches`` (used by processors and
        vLLM to expand placeholders without processing pixels); LLM tokens are this divided by ``merge_size**2``.
        """
        return sum(t * h * w for t, h, w in self.get_image_grids(height, width, images_kwargs))

    def num_image_tokens(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """LLM tokens for one image of ``height x width`` under the current mode (summed over tiles in crop mode)."""
        merge = (images_kwargs or {}).get("merge_size") or self.merge_size
        return self.get_number_of_image_patches(height, width, images_kwargs) // merge**2

    def get_num_of_video_patches(
        self, num_frames: int, height: int, width: int, videos_kwargs: dict | None = None
    ) -> int:
        """Rows of ``pixel_values_videos`` for one video (frames padded to a multiple of ``temporal_patch_size``)."""
        cfg = self._config(videos_kwargs or {})
        t, h, w = _video_grid(cfg, num_frames, height, width)
        return t * h * w

    def num_video_tokens(self, num_frames: int, height: int, width: int, videos_kwargs: dict | None = None) -> int:
        """LLM tokens for one video of ``num_frames`` frames of ``height x width``."""
        merge = (videos_kwargs or {}).get("merge_size") or self.merge_size
        return self.get_num_of_video_patches(num_frames, height, width, videos_kwargs) // merge**2

    # --------------------------------------------------------------------------------------------- processing
    def __call__(self, images=None, videos=None, **kwargs) -> BatchFeature:
        return self.preprocess(images=images, videos=videos, **kwargs)

    def preprocess(
        self,
        images=None,
        videos=None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Process images and/or videos into Qwen2-VL patch rows.

        Args:
            images: one image or a (possibly nested, one level) list of images. An image is a PIL image, a numpy
                array (H, W, C) or (H, W) uint8 / uint16 / float in [0, 1] (C in 1, 3, 4; channels-first is
                accepted when unambiguous), a torch tensor (C, H, W) or (H, W) of the same dtypes, a file path,
                or encoded bytes. A 4-D array or tensor is a batch of images.
            videos: one video or a list of videos. A video is a list of frames (anything accepted as an image) or
                a 4-D array (T, H, W, C) / tensor (T, C, H, W). All frames of a video are resized to the size
                `smart_resize` gives the first frame with ``video_min_pixels`` / ``video_max_pixels``; the frame
                count is padded to a multiple of ``temporal_patch_size`` by repeating the last frame, as
                transformers' Qwen2-VL video processor does. Video frames are resized with PIL bicubic on uint8
                (like images), not torchvision, so values differ from transformers' torchvision-only video
                processor by resampling differences; the layout is the same.
            return_tensors: ``"pt"``, ``"np"`` or ``None`` (numpy arrays).
            **kwargs: per-call overrides of any constructor argument (e.g. ``mode="fixed"``, ``max_pixels=...``),
                ``size={"shortest_edge", "longest_edge"}`` as in Qwen2-VL, and ``input_data_format``
                (``"channels_first"`` / ``"channels_last"``) for arrays.

        Returns:
            `BatchFeature` with, for images: ``pixel_values`` ``(sum of patches, C*T*patch*patch)`` float32,
            ``image_grid_thw`` ``(num_grids, 3)`` int64 rows ``[1, h, w]`` in patches, ``image_num_grids``
            ``(num_images,)`` int64 (grids per input image: 1, or 1 + tiles in crop mode); for videos:
            ``pixel_values_videos`` ``(sum of patches, C*T*patch*patch)`` float32 and ``video_grid_thw``
            ``(num_videos, 3)`` int64 ``[t, h, w]``.

        Raises:
            ValueError: for an input that cannot be used (undecodable or truncated file, no pixels, aspect ratio
                above ``max_aspect_ratio``, more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, unsupported array),
                naming the index of the image (or video and frame) in this call and its size where known. Nothing
                is returned for the other inputs.
        """
        input_data_format = kwargs.pop("input_data_format", None)
        cfg = self._config(kwargs)
        if images is None and videos is None:
            raise ValueError("pass images=, videos= or both")
        data: dict[str, np.ndarray] = {}
        if images is not None:
            data.update(self._process_images(_flatten_images(images), cfg, input_data_format))
        if videos is not None:
            data.update(self._process_videos(_batch_videos(videos), cfg, input_data_format))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _process_images(self, images: list, cfg: _Config, input_data_format) -> dict[str, np.ndarray]:
        sources = _open_all(images, "image", cfg, input_data_format)  # headers only: bad files fail here
        try:
            units_per_image = _run_parallel(
                lambda src: _image_units(src, cfg), sources, cfg.threads, cost=[s.cost for s in sources]
            )
        finally:
            for src in sources:
                src.close()
        units = [u for us in units_per_image for u in us]
        pixel_values = _write_all(units, cfg)
        return {
            "pixel_values": pixel_values,
            "image_grid_thw": np.array([u.grid for u in units], dtype=np.int64).reshape(-1, 3),
            "image_num_grids": np.array([len(us) for us in units_per_image], dtype=np.int64),
        }

    def _process_videos(self, videos: list, cfg: _Config, input_data_format) -> dict[str, np.ndarray]:
        opened: list[list[_Source]] = []
        try:
            for v, frames in enumerate(videos):
                if len(frames) == 0:
                    raise ValueError(f"video {v}: has no frames")
                opened.append(_open_all(frames, f"video {v} frame", cfg, input_data_format))
            # every frame of a video gets the size smart_resize gives its first frame (as displayed)
            grids = []
            for sources in opened:
                with _naming(sources[0]):
                    h, w = _display_size(sources[0])
                    grids.append(_video_grid(cfg, len(sources), h, w, sources[0].label))
            jobs = [(src, grid) for sources, grid in zip(opened, grids, strict=True) for src in sources]
            planes = _run_parallel(
                lambda job: _video_frame(job[0], job[1], cfg), jobs, cfg.threads, cost=[s.cost for s, _ in jobs]
            )
        finally:
            for sources in opened:
                for src in sources:
                    src.close()
        # one write unit per temporal patch (its rows are contiguous) so that long videos spread over the threads;
        # past the last frame, the last frame repeats (transformers' Qwen2-VL video patchify)
        units, start, T = [], 0, cfg.temporal_patch_size
        for sources, (gt, gh, gw) in zip(opened, grids, strict=True):
            frames = planes[start : start + len(sources)]
            start += len(sources)
            units += [
                _Unit([frames[min(g * T + k, len(frames) - 1)] for k in range(T)], (1, gh, gw)) for g in range(gt)
            ]
        return {
            "pixel_values_videos": _write_all(units, cfg),
            "video_grid_thw": np.array(grids, dtype=np.int64).reshape(-1, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        return {k: v for k, v in output.items() if not k.startswith("_")}


def _three_floats(value, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * 3
    values = [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 values, got {values}")
    return values


def _video_grid(cfg: _Config, num_frames: int, height: int, width: int, label: str = "video") -> tuple[int, int, int]:
    cfg.check_aspect(height, width, label)
    rh, rw = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels, cfg.max_aspect_ratio)
    t = -(-num_frames // cfg.temporal_patch_size)
    return t, rh // cfg.patch_size, rw // cfg.patch_size


# ------------------------------------------------------------------------------------------------ input handling
def _is_image_like(x) -> bool:
    return isinstance(x, Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes | bytearray | memoryview)


def _flatten_images(images) -> list:
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


def _batch_videos(videos) -> list[list]:
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


class _Source:
    """One input after the cheap checks: a PIL image (file-backed ones not decoded yet) and its label."""

    def __init__(self, label: str, image: Image.Image, owned: bool, cost: int):
        self.label = label
        self.image = image
        self.owned = owned  # opened here from a path or bytes: close it when done
        self.cost = cost  # input pixels, to schedule big images first

    def close(self):
        if self.owned:
            self.image.close()


def _open_all(items: list, label: str, cfg: _Config, input_data_format) -> list["_Source"]:
    """Open every input in the calling thread: bytes/paths to lazy PIL images, arrays to PIL images.

    Only headers are read here (and whole arrays converted); decoding happens on the worker threads.
    """
    sources: list[_Source] = []
    seen: set[int] = set()
    try:
        for i, item in enumerate(items):
            name = f"{label} {i}"
            image, owned = _open_one(item, name, cfg, input_data_format)
            sources.append(_Source(name, image, owned, image.size[0] * image.size[1]))
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
        w, h = opened.size
        return (w, h) if opened.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (h, w)
    finally:
        if owned:
            opened.close()


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


def _open_one(item, name: str, cfg: _Config, input_data_format) -> tuple[Image.Image, bool]:
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


def _array_to_pil(array: np.ndarray, name: str, cfg: _Config, data_format: str | None, default: str) -> Image.Image:
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


def _to_uint8(array: np.ndarray, name: str, cfg: _Config) -> np.ndarray:
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


def _to_rgb(image: Image.Image, cfg: _Config, name: str) -> Image.Image:
    """Decode, apply EXIF orientation, convert to RGB as transformers' ``convert_to_rgb`` (alpha onto white)."""
    _load(image, name)
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
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


def _resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    # PIL returns a copy when the size is unchanged: skip it, the pixels are the same
    return image if image.size == (width, height) else image.resize((width, height), resample=resample)


def _planes(image: Image.Image) -> list[np.ndarray]:
    # (H, W) uint8 per channel: cheaper to patch than strided views into an (H, W, 3) array
    return [np.asarray(band) for band in image.split()]


def _image_units(src: _Source, cfg: _Config) -> list[_Unit]:
    """Decode, convert, resize (and tile) one image on a worker thread; errors name the image."""
    with _naming(src):
        image = _to_rgb(src.image, cfg, src.label)
        w, h = image.size
        cfg.check_aspect(h, w, src.label)
        grids = cfg.image_grids(h, w)
        if cfg.mode != "crop":
            _, gh, gw = grids[0]
            return [_Unit([_planes(_resize(image, gh * cfg.patch_size, gw * cfg.patch_size, cfg.resample))], grids[0])]
        # LLaVA-NeXT anyres (image_processing_pil_llava_next.get_image_patches): global view, then the image fitted
        # (aspect kept) and centre-padded with black onto the best canvas, cut into crop_base_size tiles
        side, base = cfg.tile_side, cfg.crop_base_size
        views = [_resize(image, side, side, cfg.resample)]
        best_h, best_w = select_best_resolution((h, w), cfg.crop_grid_pinpoints)
        new_h, new_w = _patch_output_size(h, w, best_h, best_w)
        canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        canvas.paste(_resize(image, new_h, new_w, cfg.resample), ((best_w - new_w) // 2, (best_h - new_h) // 2))
        for top in range(0, best_h, base):
            for left in range(0, best_w, base):
                tile = canvas.crop((left, top, left + base, top + base))
                views.append(_resize(tile, side, side, cfg.resample))
        return [_Unit([_planes(v)], g) for v, g in zip(views, grids, strict=True)]


def _video_frame(src: _Source, grid: tuple[int, int, int], cfg: _Config) -> list[np.ndarray]:
    """One video frame resized to its video's size, as C uint8 planes."""
    with _naming(src):
        image = _to_rgb(src.image, cfg, src.label)
        return _planes(_resize(image, grid[1] * cfg.patch_size, grid[2] * cfg.patch_size, cfg.resample))


def _display_size(src: _Source) -> tuple[int, int]:
    """``(height, width)`` after EXIF orientation (decodes a lazy file, does not convert)."""
    _load(src.image, src.label)
    w, h = src.image.size
    return (w, h) if src.image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (h, w)


@contextmanager
def _naming(src: _Source):
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


# -------------------------------------------------------------------------------------------------- patching
def _write_all(units: list[_Unit], cfg: _Config) -> np.ndarray:
    """Allocate the output once and let each worker fill the rows of its grids."""
    p, T = cfg.patch_size, cfg.temporal_patch_size
    rows = [t * h * w for (t, h, w) in (u.grid for u in units)]
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(int)
    out = np.empty((int(offsets[-1]), 3 * T * p * p), dtype=np.float32)  # (sum of patches, C*T*p*p)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)

    def write(k: int) -> None:
        _write_patches(out[offsets[k] : offsets[k + 1]], units[k], cfg, mean, std)

    _run_parallel(write, list(range(len(units))), cfg.threads, cost=rows)
    return out


def _write_patches(out: np.ndarray, unit: _Unit, cfg: _Config, mean: np.ndarray, std: np.ndarray) -> None:
    """Rescale, normalise and reorder one grid's frames straight into its rows of the output.

    Row order and layout follow Qwen2-VL's ``patchify`` (video_processing_qwen2_vl.py): rows
    ``(gt, gh/m, gw/m, m, m)``, each row ``(C, T, ph, pw)``; frame ``g*T + k`` fills temporal slot ``k`` of temporal
    patch ``g``, indices past the last frame repeat it (a still image is one frame, so it fills every slot).
    Float ops are transformers' (``image_transforms.rescale`` then ``normalize``): ``float32(float64(x) *
    rescale_factor)``, then ``(x - mean) / std`` in float32, so values are bit-identical to the PIL backend.
    """
    gt, gh, gw = unit.grid
    p, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    num_frames, channels = len(unit.frames), len(unit.frames[0])
    # out rows (gt*gh*gw, C*T*p*p) -> (gt, gh/m, gw/m, m, m, C, T, p, p)
    view = out.reshape(gt, gh // m, gw // m, m, m, channels, T, p, p)
    # each plane (gh*p, gw*p) -> (gh/m, m, p, gw/m, m, p) -> (gh/m, gw/m, m, m, p, p), a strided view, no copy
    blocks = [
        [plane.reshape(gh // m, m, p, gw // m, m, p).transpose(0, 3, 1, 4, 2, 5) for plane in frame]
        for frame in unit.frames
    ]
    # block rows per step, so the temporaries (k, gw/m, m, m, p, p) stay in cache (~32k values)
    step = max(1, 262144 // (gw * m * p * p))
    tmp64 = np.empty((step, gw // m, m, m, p, p), dtype=np.float64)
    tmp32 = np.empty((step, gw // m, m, m, p, p), dtype=np.float32)
    for g in range(gt):
        for r0 in range(0, gh // m, step):
            r1 = min(r0 + step, gh // m)
            t64, t32 = tmp64[: r1 - r0], tmp32[: r1 - r0]
            for c in range(channels):
                done = -1
                for k in range(T):
                    f = min(g * T + k, num_frames - 1)
                    if f != done:
                        src = blocks[f][c][r0:r1]  # (k, gw/m, m, m, p, p) uint8
                        if cfg.do_rescale:
                            np.multiply(src, cfg.rescale_factor, out=t64)
                            np.copyto(t32, t64, casting="same_kind")
                        else:
                            np.copyto(t32, src, casting="unsafe")
                        if cfg.do_normalize:
                            np.subtract(t32, mean[c], out=t32)
                            np.divide(t32, std[c], out=t32)
                        done = f
                    view[g, r0:r1, :, :, :, c, k] = t32
