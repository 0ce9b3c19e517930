"""Resize geometry of `NativeVLImageProcessor`: the target size and patch grids of each image, without pixels.

- ``native``: Qwen2-VL's naive dynamic resolution (arXiv 2409.12191), `smart_resize`: each side to a multiple of
  ``patch_size * merge_size`` (28), the area kept inside ``[min_pixels, max_pixels]``.
- ``fixed``: every image to the pixel budget ``fixed_pixels`` (NativeRes-LLaVA's Fixed-378 baseline, arXiv
  2506.12776), aspect ratio kept or squashed to a square.
- ``crop``: LLaVA-NeXT "anyres": a global view, then ``crop_base_size`` tiles of the image fitted onto the best
  canvas of ``crop_grid_pinpoints`` (`select_best_resolution`, `patch_output_size`).

`PreprocessConfig` holds the resolved settings of one ``preprocess`` call (validated once) and answers the grid
questions: `PreprocessConfig.image_grids` for images, `video_grid` for videos. The processor's token counts
(``get_number_of_image_patches``, ``num_image_tokens``) come from the same functions as its pixels.

Mirrors ``transformers/models/qwen2_vl/image_processing_pil_qwen2_vl.py`` (``smart_resize``) and
``transformers/image_processing_utils.py`` (``select_best_resolution``, ``get_patch_output_size``).

This file is remote code: it is copied flat into a model folder (a single-dot import of
``image_processing_nativevl.py``) and imports only the standard library and numpy.
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


# Qwen2-VL's native-mode area bounds in pixels (released checkpoints raise the maximum to 12,845,056)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MODES = ("native", "fixed", "crop")


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
def patch_output_size(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    scale_w = target_width / width
    scale_h = target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


@dataclass(frozen=True)
class PreprocessConfig:
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


def video_grid(
    cfg: PreprocessConfig, num_frames: int, height: int, width: int, label: str = "video"
) -> tuple[int, int, int]:
    cfg.check_aspect(height, width, label)
    rh, rw = smart_resize(height, width, cfg.factor, cfg.video_min_pixels, cfg.video_max_pixels, cfg.max_aspect_ratio)
    t = -(-num_frames // cfg.temporal_patch_size)
    return t, rh // cfg.patch_size, rw // cfg.patch_size
