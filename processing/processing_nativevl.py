"""`NativeVLProcessor`: tokenizer + `NativeVLImageProcessor`, placeholder expansion and position ids.

Mirrors transformers' `models/qwen2_vl/processing_qwen2_vl.py`: every `<|image_pad|>` (`<|video_pad|>`) in the text
stands for one image (video) and is expanded to one token per LLM token of it, `t*h*w / merge**2`; in crop mode
the tiles of one image follow each other inside the same placeholder run. Unlike Qwen2-VL's processor it also
returns the position ids the model would compute: `(3, batch, seq)` M-RoPE ids (temporal, height, width) for
`position_scheme="mrope"`, `(batch, seq)` plain ids for `"1d"` (NativeRes-LLaVA, arXiv 2506.12776).

This file is remote code: it is copied flat into a model folder and imports only numpy, torch, transformers and
its siblings. Grids, token counts and position ids come from `processing_positions_nativevl.py`, generated from
the model's `positions_nativevl.py` (remote-code folders cannot import each other; a test fails when it is stale).
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin, TextKwargs
from transformers.utils import logging

from .image_io_nativevl import image_size
from .processing_positions_nativevl import (
    batch_mrope_positions,
    grid_token_counts,
    level_grid,
    placeholder_kinds,
    repeat_per_grid,
)


logger = logging.get_logger(__name__)

# Keyword arguments __call__ hands to the tokenizer (transformers' `TextKwargs` plus what tokenizers take besides) and
# to the image processor; anything else is dropped with a warning (a `max_pixel=` typo must not pass silently).
TEXT_KWARGS = set(TextKwargs.__annotations__) | {
    "return_offsets_mapping",
    "return_attention_mask",
    "return_token_type_ids",
    "padding_side",
    "max_length",
    "pad_to_multiple_of",
    "add_special_tokens",
    "return_mm_token_type_ids",
    "sanitize_control_tokens",
}
IMAGE_KWARGS = {"mode", "min_pixels", "max_pixels", "fixed_pixels", "keep_aspect", "size", "do_sample_frames"}


# Qwen2's ChatML tokens, then the ones Qwen2-VL adds (ids 151646..151656 in Qwen2-VL), in Qwen2-VL's order.
QWEN2_CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_VL_VISION_TOKENS = [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN2_VL_SPECIAL_TOKENS = QWEN2_CHATML_TOKENS + QWEN2_VL_VISION_TOKENS

# ChatML with Qwen2-VL's vision tokens. Content is a string or a list of {"type": "text"|"image"|"video"} parts; an
# image part becomes <|vision_start|><|image_pad|><|vision_end|>, expanded by the processor. Assistant turns sit in
# {% generation %} markers so `return_assistant_tokens_mask=True` gives the tokens an assistant-only loss trains on.
CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' ~ counts.image ~ ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Video ' ~ counts.video ~ ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ render(message['content']) }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ render(message['content']) }}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def mrope_position_ids(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grids: Sequence[Sequence[int]],
    video_grids: Sequence[Sequence[int]],
    image_token_id: int,
    video_token_id: int,
    merge_size: int,
    levels_per_grid: Sequence[int] | None = None,
) -> np.ndarray:
    """M-RoPE ids (3, batch, seq) of a padded batch (0 on padding), by the model's own functions of the shared
    positions file: `placeholder_kinds` (by token id, only for a kind the batch has grids of), then
    `batch_mrope_positions` (`levels_per_grid`: one granularity level per image grid)."""
    kinds = placeholder_kinds(
        torch.from_numpy(input_ids), image_token_id, video_token_id, len(image_grids) > 0, len(video_grids) > 0
    ).numpy()
    positions, _ = batch_mrope_positions(kinds, attention_mask, image_grids, video_grids, merge_size, levels_per_grid)
    return positions


class NativeVLProcessor(ProcessorMixin):
    r"""Tokenizer + `NativeVLImageProcessor` for nativevl models.

    Args:
        image_processor: a `NativeVLImageProcessor` (its `mode` picks native / fixed / crop).
        tokenizer: any tokenizer holding `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`.
        chat_template: Jinja template; ChatML with Qwen2-VL's vision tokens by default.
        position_scheme: `"mrope"` or `"1d"`, as the model's config (decides the shape of `position_ids`).
        max_image_tokens: default per-sample budget of image tokens; images of a sample over it are scaled down
            together (never truncated). None: no budget beyond the image processor's `max_pixels`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        position_scheme: str = "mrope",
        max_image_tokens: int | None = None,
        **kwargs,
    ):
        if position_scheme not in ("mrope", "1d"):
            raise ValueError(f"position_scheme must be 'mrope' or '1d', got {position_scheme!r}")
        self.position_scheme = position_scheme
        self.max_image_tokens = max_image_tokens
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        ids = tokenizer.convert_tokens_to_ids([self.image_token, self.video_token])
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(f"the tokenizer lacks {self.image_token} or {self.video_token}")
        self.image_token_id, self.video_token_id = ids

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        max_image_tokens: int | None = None,
        images_kwargs: dict | None = None,
        granularity: int | Sequence[int] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Expands placeholders, tokenizes, processes pixels and computes position ids.

        Args:
            images: images in placeholder order across the batch: a flat list, or one list per sample, which must
                hold as many images as that sample's text has placeholders (ValueError naming the sample otherwise).
            text: one string or a non-empty list of strings; each `<|image_pad|>` / `<|video_pad|>` marks one image
                / video.
            videos: videos in placeholder order (each a list of frames or a (T, H, W, C) array), flat or one list
                per sample (checked like `images`).
            max_image_tokens: per-sample budget of image tokens for this call (overrides the processor's).
            images_kwargs: per-call image processor overrides (e.g. `{"mode": "fixed"}`, `{"max_pixels": ...}`).
            granularity: None (full grids), one level for every image, or one level per image (placeholder order
                across the batch): each image gets the placeholders of its pooled grids (AVG-LLaVA levels; see the
                model's `level_grid`; crop tiles take their image's level), and `image_granularity` (one level per
                image) is returned so the model pools to the same levels and the position ids match.
            **kwargs: tokenizer arguments (`padding_side`, `truncation` with `max_length`: allowed when it cuts text
                only, ValueError naming the sample when it would cut image or video tokens;
                `return_text_replacement_offsets=True` adds `text_replacement_offsets`, per text the placeholders
                expanded, `{"span": (start, end), "new_span": (start, end)}` in characters, as transformers'
                processors return it).

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` (batch, seq); `pixel_values` (patches, 1176),
            `image_grid_thw` (grids, 3) and `image_num_grids` (images,) (grids per image: 1, or the global view
            plus the tiles in crop mode; the model maps per-image levels to grids with it) when images are given;
            `pixel_values_videos`, `video_grid_thw` for videos;
            `position_ids` (batch, seq, 3) M-RoPE ids (temporal, height, width) for `position_scheme="mrope"`,
            batch first so that any collator pads them along the sequence (the model also takes transformers'
            (3, batch, seq)), or (batch, seq) for `"1d"`; `image_granularity` (images,) long when `granularity` is
            given.
            The image and video keys are always present (zero rows without images / videos), so per-sample outputs
            collate into one batch. Unknown keyword arguments are dropped with a warning naming them.
        """
        if text is None:
            raise ValueError("NativeVLProcessor needs text with one placeholder per image or video")
        kwargs.pop("audio", None)
        return_replacements = kwargs.pop("return_text_replacement_offsets", False)
        texts = _texts(text)
        images_kwargs, kwargs = self._split_kwargs(dict(images_kwargs or {}), kwargs)
        flat_images, image_counts = _flatten(images), [t.count(self.image_token) for t in texts]
        flat_videos, video_counts = _flatten_videos(videos), [t.count(self.video_token) for t in texts]
        for name, token, counts, given, per_sample in (
            ("image", self.image_token, image_counts, flat_images, _images_per_sample(images)),
            ("video", self.video_token, video_counts, flat_videos, _videos_per_sample(videos)),
        ):
            if per_sample is not None:
                _check_per_sample(name, token, counts, per_sample)
            if sum(counts) != len(given):
                raise ValueError(
                    f"the text holds {sum(counts)} {token} placeholder(s) {counts} per sample but {len(given)} "
                    f"{name}(s) were given"
                )
        patch_dim = 3 * self.image_processor.temporal_patch_size * self.image_processor.patch_size**2
        # Every call returns the same keys (zero rows for no images / videos), so the samples of a batch processed
        # one by one (as `pipeline` does) can be collated whatever they hold.
        data = {
            "pixel_values": np.zeros((0, patch_dim), np.float32),
            "image_grid_thw": np.zeros((0, 3), np.int64),
            "image_num_grids": np.zeros((0,), np.int64),
            "pixel_values_videos": np.zeros((0, patch_dim), np.float32),
            "video_grid_thw": np.zeros((0, 3), np.int64),
        }
        image_tokens, levels_per_grid = [], None
        if flat_images:
            budget = max_image_tokens if max_image_tokens is not None else self.max_image_tokens
            image_tokens, levels_per_grid = self._images_into(
                data, flat_images, image_counts, budget, images_kwargs, granularity
            )
        video_tokens: list[int] = []
        if flat_videos:
            out = self.image_processor(videos=flat_videos, return_tensors="np", **images_kwargs)
            data["pixel_values_videos"], data["video_grid_thw"] = out["pixel_values_videos"], out["video_grid_thw"]
            video_tokens = grid_token_counts(out["video_grid_thw"].tolist(), self.image_processor.merge_size)
        texts, replacements = self._expand(texts, image_tokens, video_tokens)
        data.update(self.tokenizer(texts, padding=padding, return_tensors="np", **kwargs))
        if kwargs.get("truncation"):
            self._check_truncation(texts, data["input_ids"], data["attention_mask"], kwargs.get("max_length"))
        data["position_ids"] = self._position_ids(data, levels_per_grid)
        features = BatchFeature(data=data, tensor_type=return_tensors)
        if return_replacements:
            # transformers' `return_text_replacement_offsets`: where each placeholder moved (per text, in order),
            # what `apply_chat_template(..., return_assistant_tokens_mask=True)` reads
            features["text_replacement_offsets"] = replacements
        return features

    def _check_truncation(self, texts: list[str], input_ids: np.ndarray, attention_mask: np.ndarray, max_length):
        """Truncation as TRL + Qwen2-VL do it: allowed when it cuts text only; raises ValueError naming the sample
        whose image or video tokens (`input_ids` (batch, seq), placeholders already expanded in `texts`) it cuts."""
        vision = (input_ids == self.image_token_id) | (input_ids == self.video_token_id)
        kept = (vision & (attention_mask == 1)).sum(-1)
        for i, text in enumerate(texts):
            wanted = text.count(self.image_token) + text.count(self.video_token)
            if kept[i] != wanted:
                raise ValueError(
                    f"sample {i}: truncation to max_length={max_length} would cut through its image/video tokens "
                    f"(keeps {int(kept[i])} of {wanted}); raise max_length, or shrink the images (max_image_tokens, "
                    "max_pixels)"
                )

    def _split_kwargs(self, images_kwargs: dict, kwargs: dict) -> tuple[dict, dict]:
        """Image processor arguments (merged into `images_kwargs`) and tokenizer arguments; anything else is
        dropped with a warning naming it."""
        image_keys = set(getattr(self.image_processor.valid_kwargs, "__annotations__", {})) | IMAGE_KWARGS
        for key in list(kwargs):
            if key in image_keys:
                images_kwargs[key] = kwargs.pop(key)
        unknown = sorted(k for k in kwargs if k not in TEXT_KWARGS)
        if unknown:
            logger.warning(
                f"NativeVLProcessor ignores unknown keyword argument(s) {unknown}: neither the tokenizer nor the "
                f"image processor takes them (image processor arguments: {sorted(IMAGE_KWARGS)})"
            )
        return images_kwargs, {k: v for k, v in kwargs.items() if k not in unknown}

    def _images_into(self, data: dict, images: list, counts: list[int], budget, images_kwargs: dict, granularity):
        """Processes the images into `data` (pixel_values, image_grid_thw, image_num_grids, and image_granularity
        (one level per image) when `granularity` is given). Returns the placeholder tokens of each image and the
        per-grid levels (None without granularity)."""
        pixel_values, grids, num_grids = self._process_images(images, counts, budget, images_kwargs)
        data["pixel_values"], data["image_grid_thw"], data["image_num_grids"] = pixel_values, grids, num_grids
        levels = None
        if granularity is not None:
            levels = [granularity] * len(images) if isinstance(granularity, int) else [int(lv) for lv in granularity]
            if len(levels) != len(images) or any(level < 0 for level in levels):
                raise ValueError(
                    f"granularity {granularity!r} must be one level >= 0 or one per image ({len(images)})"
                )
            data["image_granularity"] = np.asarray(levels, dtype=np.int64)
            levels = repeat_per_grid(levels, num_grids.tolist(), len(grids))
        per_grid = grid_token_counts(grids.tolist(), self.image_processor.merge_size, levels)
        ends = np.cumsum(num_grids).tolist()
        return [sum(per_grid[e - n : e]) for n, e in zip(num_grids.tolist(), ends, strict=True)], levels

    def _position_ids(self, data: dict, levels_per_grid: list[int] | None) -> np.ndarray:
        """(batch, seq) plain ids for the 1-D scheme; M-RoPE ids batch first, (batch, seq, 3), so that collators
        pad them along the sequence."""
        input_ids, attention_mask = data["input_ids"], data["attention_mask"]
        if self.position_scheme == "1d":
            return np.maximum(np.cumsum(attention_mask, -1) - 1, 0)
        return mrope_position_ids(
            input_ids,
            attention_mask,
            data["image_grid_thw"].tolist(),
            data["video_grid_thw"].tolist(),
            self.image_token_id,
            self.video_token_id,
            self.image_processor.merge_size,
            levels_per_grid,
        ).transpose(1, 2, 0)  # (3, batch, seq) -> (batch, seq, 3)

    def _process_images(self, images, counts, budget, images_kwargs):
        """Processes images sample by sample when a token budget applies (each sample gets its own max_pixels),
        at once otherwise. Returns pixel_values, image_grid_thw and image_num_grids (grids of each image)."""
        groups, start = [], 0
        for count in counts:
            groups.append(images[start : start + count])
            start += count
        if budget is None:
            groups, limits = [images], [images_kwargs]
        else:
            limits = [self._fit_budget(group, budget, images_kwargs, b) for b, group in enumerate(groups)]
        pixel_values, grids, num_grids = [], [], []
        for group, group_kwargs in zip(groups, limits, strict=True):
            if not group:
                continue
            out = self.image_processor(images=group, return_tensors="np", **group_kwargs)
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
            num_grids.append(out["image_num_grids"])
        return np.concatenate(pixel_values), np.concatenate(grids), np.concatenate(num_grids)

    def _fit_budget(self, group, budget: int, images_kwargs: dict, sample: int) -> dict:
        """Image processor arguments that keep the images of one sample within `budget` LLM tokens: max_pixels is
        scaled down by the overshoot (area scales with tokens) until the sample fits."""
        try:
            sizes = [image_size(image, images_kwargs.get("input_data_format")) for image in group]
        except ValueError as err:
            raise ValueError(f"sample {sample}: {err}") from None
        kwargs = dict(images_kwargs)
        max_pixels = kwargs.get("max_pixels", self.image_processor.max_pixels)
        floor = (self.image_processor.patch_size * self.image_processor.merge_size) ** 2
        for _ in range(64):
            kwargs["max_pixels"] = max_pixels
            kwargs["min_pixels"] = min(kwargs.get("min_pixels", self.image_processor.min_pixels), max_pixels)
            total = sum(self.image_processor.num_image_tokens(h, w, kwargs) for h, w in sizes)
            if total <= budget:
                return kwargs
            if max_pixels <= floor * len(sizes):
                break
            max_pixels = max(floor, int(max_pixels * budget / total * 0.95))
        raise ValueError(
            f"sample {sample}: its {len(sizes)} image(s) of sizes {sizes} need {total} tokens even at "
            f"max_pixels={max_pixels}, over max_image_tokens={budget}"
        )

    def _expand(self, texts: list[str], image_tokens: list[int], video_tokens: list[int]):
        """Replaces the i-th image (video) placeholder across the batch by `image_tokens[i]` (`video_tokens[i]`)
        copies of it. Returns the texts and, per text, the character spans moved: {"span", "new_span"}."""
        counts = {self.image_token: iter(image_tokens), self.video_token: iter(video_tokens)}
        expanded, replacements = [], []
        for text in texts:
            out, moved, cursor, length = [], [], 0, 0
            while True:
                hits = [(text.find(tok, cursor), tok) for tok in counts if text.find(tok, cursor) >= 0]
                if not hits:
                    break
                at, token = min(hits)
                out.append(text[cursor:at])
                length += at - cursor
                run = token * next(counts[token])
                moved.append({"span": (at, at + len(token)), "new_span": (length, length + len(run))})
                out.append(run)
                length += len(run)
                cursor = at + len(token)
            out.append(text[cursor:])
            expanded.append("".join(out))
            replacements.append(moved)
        return expanded, replacements

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        """Placeholder tokens per image (height, width) and per video (frames, height, width), without pixels."""
        from transformers.processing_utils import MultiModalData

        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.image_processor.num_image_tokens(h, w) for h, w in image_sizes]
            data["num_image_patches"] = [
                self.image_processor.get_number_of_image_patches(h, w) for h, w in image_sizes
            ]
        if video_sizes is not None:
            data["num_video_tokens"] = [self.image_processor.num_video_tokens(*size) for size in video_sizes]
        return MultiModalData(**data)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decodes generated ids (batch, seq) to strings."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "position_ids",
            "pixel_values",
            "image_grid_thw",
            "image_num_grids",
            "pixel_values_videos",
            "video_grid_thw",
        ]


def _texts(text) -> list[str]:
    """`text` as a list of strings; ValueError naming the value for anything else (an empty list included)."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)) or not text:
        raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r:.200}")
    for i, item in enumerate(text):
        if not isinstance(item, str):
            raise ValueError(f"text[{i}] must be a string, got {item!r:.200} ({type(item).__name__})")
    return list(text)


def _images_per_sample(images) -> list[int] | None:
    """Images of each sample when `images` holds one list per sample, else None (a flat list: images are matched to
    the placeholders in order across the batch)."""
    if isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
        return [len(item) for item in images]
    return None


def _videos_per_sample(videos) -> list[int] | None:
    """Videos of each sample when `videos` holds one list of videos per sample (what `apply_chat_template` passes;
    a sample without videos is an empty list), else None. A video given as a list of frames is not a sample."""
    if not isinstance(videos, (list, tuple)) or not videos or all(_is_frame(x) for x in videos):
        return None
    if all(isinstance(item, (list, tuple)) and not (item and all(_is_frame(x) for x in item)) for item in videos):
        return [len(item) for item in videos]
    return None


def _check_per_sample(name: str, token: str, counts: list[int], per_sample: list[int]) -> None:
    """Per-sample lists of images (videos) must match the samples' placeholders one to one."""
    if len(per_sample) != len(counts):
        raise ValueError(
            f"{name}s were given as {len(per_sample)} per-sample list(s) {per_sample} but there are {len(counts)} "
            f"text(s), holding {counts} {token} placeholder(s)"
        )
    for i, (given, wanted) in enumerate(zip(per_sample, counts, strict=True)):
        if given != wanted:
            raise ValueError(
                f"sample {i}: {given} {name}(s) were given for it but its text holds {wanted} {token} placeholder(s)"
            )


def _is_frame(x) -> bool:
    """One image or video frame: a PIL image, a 2-D/3-D array or tensor, a path or encoded bytes."""
    return isinstance(x, (Image.Image, str, bytes)) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def _flatten_videos(videos) -> list:
    """A flat list of videos from None, one video (a list of frames or a 4-D array), a list of videos, or a list of
    per-sample lists of videos (what `apply_chat_template` passes)."""
    if videos is None:
        return []
    if not isinstance(videos, (list, tuple)) or all(_is_frame(x) for x in videos):
        return [videos]  # one video: a 4-D array or a list of frames
    flat = []
    for item in videos:
        if isinstance(item, (list, tuple)) and item and not all(_is_frame(x) for x in item):
            flat.extend(item)  # one sample's videos
        elif not (isinstance(item, (list, tuple)) and not item):
            flat.append(item)
    return flat


def _flatten(images) -> list:
    """A flat list of images from None, one image, a list, or a list of per-sample lists."""
    if images is None:
        return []
    flat = []
    for item in images if isinstance(images, (list, tuple)) else [images]:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    for i, image in enumerate(flat):
        if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
            raise ValueError(
                f"image {i}: a 4-D array of shape {tuple(image.shape)} is a batch of images, but one placeholder "
                "stands for one image; pass a list with one image per placeholder"
            )
    return flat


__all__ = ["CHAT_TEMPLATE", "NativeVLProcessor", "level_grid", "mrope_position_ids"]
