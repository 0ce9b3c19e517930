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

Deliberate differences from ``Qwen2VLImageProcessorPil`` (each has a test), all made while decoding, in
``image_io_nativevl.py``:

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

Three files, one job each: ``image_io_nativevl.py`` decodes inputs (`image_size`, EXIF, decompression-bomb and
FIFO checks, arrays), ``resize_nativevl.py`` holds the geometry (`smart_resize`, crop canvases, grids), and this file
holds the processor class and the patch writer.

This file is remote code: it is copied flat into a model folder with its two siblings and imports only the standard
library, numpy, PIL, transformers and those siblings.
"""

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_io_nativevl import (
    ImageSource,
    batch_videos,
    decode_rgb,
    displayed_size,
    flatten_images,
    naming,
    open_sources,
)
from .resize_nativevl import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PreprocessConfig,
    patch_output_size,
    select_best_resolution,
    video_grid,
)


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, stored as a plain int so the config stays JSON


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
    def _config(self, overrides: dict[str, Any]) -> PreprocessConfig:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        size = overrides.pop("size", None)
        if isinstance(size, dict):
            overrides.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
            overrides.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
            overrides = {k: v for k, v in overrides.items() if v is not None}
        ignored = {"do_resize", "default_to_square", "device", "disable_grouping", "data_format", "image_seq_length"}
        if overrides.get("do_resize") is False:
            raise ValueError("do_resize=False is not supported: grids need sides that are multiples of 28")
        names = PreprocessConfig.__dataclass_fields__
        unknown = sorted(k for k in overrides if k not in names and k not in ignored and k != "input_data_format")
        if unknown:
            raise ValueError(f"unknown image processor arguments {unknown}")
        values = {name: overrides.get(name, getattr(self, name)) for name in names}
        values["image_mean"] = _three_floats(values["image_mean"], "image_mean")
        values["image_std"] = _three_floats(values["image_std"], "image_std")
        values["crop_grid_pinpoints"] = tuple((int(h), int(w)) for h, w in values["crop_grid_pinpoints"])
        values["resample"] = int(values["resample"])
        return PreprocessConfig(**values)

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
        t, h, w = video_grid(cfg, num_frames, height, width)
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
            data.update(self._process_images(flatten_images(images), cfg, input_data_format))
        if videos is not None:
            data.update(self._process_videos(batch_videos(videos), cfg, input_data_format))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _process_images(self, images: list, cfg: PreprocessConfig, input_data_format) -> dict[str, np.ndarray]:
        sources = open_sources(images, "image", cfg, input_data_format)  # headers only: bad files fail here
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

    def _process_videos(self, videos: list, cfg: PreprocessConfig, input_data_format) -> dict[str, np.ndarray]:
        opened: list[list[ImageSource]] = []
        try:
            for v, frames in enumerate(videos):
                if len(frames) == 0:
                    raise ValueError(f"video {v}: has no frames")
                opened.append(open_sources(frames, f"video {v} frame", cfg, input_data_format))
            # every frame of a video gets the size smart_resize gives its first frame (as displayed)
            grids = []
            for sources in opened:
                with naming(sources[0]):
                    h, w = displayed_size(sources[0])
                    grids.append(video_grid(cfg, len(sources), h, w, sources[0].label))
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


# ------------------------------------------------------------------------------------------------ input handling


def _resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    # PIL returns a copy when the size is unchanged: skip it, the pixels are the same
    return image if image.size == (width, height) else image.resize((width, height), resample=resample)


def _planes(image: Image.Image) -> list[np.ndarray]:
    # (H, W) uint8 per channel: cheaper to patch than strided views into an (H, W, 3) array
    return [np.asarray(band) for band in image.split()]


def _image_units(src: ImageSource, cfg: PreprocessConfig) -> list[_Unit]:
    """Decode, convert, resize (and tile) one image on a worker thread; errors name the image."""
    with naming(src):
        image = decode_rgb(src.image, cfg, src.label)
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
        new_h, new_w = patch_output_size(h, w, best_h, best_w)
        canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        canvas.paste(_resize(image, new_h, new_w, cfg.resample), ((best_w - new_w) // 2, (best_h - new_h) // 2))
        for top in range(0, best_h, base):
            for left in range(0, best_w, base):
                tile = canvas.crop((left, top, left + base, top + base))
                views.append(_resize(tile, side, side, cfg.resample))
        return [_Unit([_planes(v)], g) for v, g in zip(views, grids, strict=True)]


def _video_frame(src: ImageSource, grid: tuple[int, int, int], cfg: PreprocessConfig) -> list[np.ndarray]:
    """One video frame resized to its video's size, as C uint8 planes."""
    with naming(src):
        image = decode_rgb(src.image, cfg, src.label)
        return _planes(_resize(image, grid[1] * cfg.patch_size, grid[2] * cfg.patch_size, cfg.resample))


# -------------------------------------------------------------------------------------------------- patching
def _write_all(units: list[_Unit], cfg: PreprocessConfig) -> np.ndarray:
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


def _write_patches(out: np.ndarray, unit: _Unit, cfg: PreprocessConfig, mean: np.ndarray, std: np.ndarray) -> None:
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
