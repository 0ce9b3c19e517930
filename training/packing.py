"""Padding-free multimodal packing: many samples per row, images of all of them in one vision call, no leakage.

TRL 1.16 refuses packing and padding-free for vision datasets; NativeRes-LLaVA (arXiv 2506.12776) packs the vision
side only. `PackingCollator` packs both sides: each row holds whole samples back to back, each sample's position
ids restart at 0 (the plain row first, then the three M-RoPE rows: `(4, rows, seq)`), the boundaries travel as
`cu_seq_lens_q/k` and `max_length_q/k` for varlen kernels, and there is no attention mask: transformers builds the
block-diagonal causal mask (sdpa, eager, flex) from the restarting plain positions, flash-attn reads the
boundaries. Labels are -100 on prompt tokens (assistant-only by default), on image and video tokens, on padding,
and at every segment start.

Mirrors TRL's `DataCollatorWithFlattening` / `padding_free` (trl/trainer/sft_trainer.py) for text, extended to
images; the conversational format is TRL's (`{"messages": [...], "images": [...]}`).
"""

import copy
import random
import re
from collections.abc import Sequence

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from nativevl.modeling.configuration_nativevl import IGNORE_INDEX
from nativevl.processing.image_io_nativevl import load_image


GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")
# The processor's vision keys a packed batch concatenates in row order: per patch (pixel values), per grid
# (image_grid_thw) and per image (image_num_grids, image_granularity); each stays aligned with its unit.
VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "image_num_grids",
    "image_granularity",
    "pixel_values_videos",
    "video_grid_thw",
)


def best_fit_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices grouped into rows whose lengths sum to at most `max_tokens`.

    Each item goes, longest first, into the open row it fills most tightly, or a new row. Raises ValueError naming an
    item longer than `max_tokens`.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        if length > max_tokens:
            raise ValueError(f"sample {index} has {length} tokens (images included), over max_tokens={max_tokens}")
        fits = [r for r in range(len(rows)) if room[r] >= length]
        if fits:
            best = min(fits, key=lambda r: room[r])
            rows[best].append(index)
            room[best] -= length
        else:
            rows.append([index])
            room.append(max_tokens - length)
    return [sorted(row) for row in rows]


def _load_image(image, where: str):
    """What the processor reads from what datasets store: a PIL image, a path, bytes, or {"bytes": ..., "path": ...}.
    Bytes are decoded here, by the processor's reader (`image_io_nativevl.load_image`), so that a bad sample is
    named; paths and PIL images go to the processor as they are."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        try:
            image = load_image(image)
        except ValueError as error:
            raise ValueError(f"{where}: cannot decode image bytes ({error})") from error
    return image


def assistant_spans(messages: list[dict], chat_template: str, index: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    With `{% generation %}` markers in the template the spans are the marked ones (TRL's contract). Without them
    (e.g. a converted Qwen2-VL or NativeRes-LLaVA folder keeps its source's template) they are derived from the
    rendering itself: for the assistant message k, the text `messages[: k + 1]` adds to `messages[:k]` rendered
    with the generation prompt. Raises ValueError naming sample `index` when a template does not render a
    conversation as the concatenation of its prefixes (the spans would be wrong).
    """
    prompts, generation = render_jinja_template(
        conversations=[copy.deepcopy(messages)], chat_template=chat_template, return_assistant_tokens_mask=True
    )
    prompt = prompts[0]
    if GENERATION_MARKER.search(chat_template):
        return prompt, [tuple(span) for span in generation[0]]
    spans = []
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        (before,), _ = render_jinja_template(
            conversations=[copy.deepcopy(messages[:k])], chat_template=chat_template, add_generation_prompt=True
        )
        (after,), _ = render_jinja_template(
            conversations=[copy.deepcopy(messages[: k + 1])], chat_template=chat_template
        )
        if not (after.startswith(before) and prompt.startswith(after)):
            raise ValueError(
                f"sample {index}: the chat template does not render the conversation as the concatenation of its "
                f"prefixes (assistant message {k}: ...{before[-40:]!r} is not a prefix of ...{after[-40:]!r} or that of "
                "the whole prompt), so its assistant tokens cannot be found; add {% generation %} markers to the "
                "template or pass assistant_only_loss=False"
            )
        spans.append((len(before), len(after)))
    return prompt, spans


class PackingCollator:
    """Collates TRL conversational vision examples into packed, padding-free batches for `model(**batch)`.

    Args:
        processor: a `NativeVLProcessor`; assistant turns are found by `assistant_spans` (markers not needed).
        max_tokens: most tokens (text and image tokens) per row; None puts every sample of the batch in one row.
        assistant_only_loss: train on assistant tokens only (default); False trains on every text token.
        messages_key, images_key: example fields holding the conversation and its images.
        granularity_training: AVG-LLaVA stage 1 (multi-granularity instruction tuning) over `num_levels` levels:
            None (full grids), `"random"` (each image of each sample gets one random level) or `"all"` (each sample
            with images appears once per level, every image at that level; text-only samples appear once). With
            `"all"` the packed loss is the token-weighted mean over every copy; the copies of one sample share
            their answer tokens, so this is the mean over levels of each level's loss.
        num_levels: the model's `config.granularity` (needed by `granularity_training`).
        granularity: a level forced on every image (e.g. RGLF's per-level batches); None: no forcing. Levels are
            per image: crop mode's tiles take their image's level.
        seed: seed of the random levels.

    Returns from `__call__` a dict: `input_ids`, `labels` (rows, seq) long; `position_ids` (4, rows, seq) long;
    `cu_seq_lens_q`, `cu_seq_lens_k` (segments + 1,) int32 over the flattened rows; `max_length_q`, `max_length_k`
    int; `use_cache` False; `pixel_values` (patches, 1176), `image_grid_thw` (grids, 3) and `image_num_grids`
    (images,) in row order when the batch has images (videos likewise), `image_granularity` (images,) when levels
    are chosen. Rows shorter than the
    longest end with a padding segment of their own.
    """

    def __init__(
        self,
        processor,
        max_tokens: int | None = None,
        assistant_only_loss: bool = True,
        messages_key: str = "messages",
        images_key: str = "images",
        granularity_training: str | None = None,
        num_levels: int | None = None,
        granularity: int | None = None,
        seed: int = 0,
    ) -> None:
        if granularity_training not in (None, "all", "random"):
            raise ValueError(f"granularity_training must be None, 'all' or 'random', got {granularity_training!r}")
        if granularity_training is not None and not num_levels:
            raise ValueError(
                f"granularity_training={granularity_training!r} needs num_levels (the model's config.granularity), "
                f"got {num_levels!r}"
            )
        self.granularity_training = granularity_training
        self.num_levels = num_levels
        self.granularity = granularity
        self.rng = random.Random(seed)
        self.processor = processor
        self.max_tokens = max_tokens
        self.assistant_only_loss = assistant_only_loss
        self.messages_key = messages_key
        self.images_key = images_key
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.vision_token_ids = {processor.image_token_id, processor.video_token_id}
        self.filled_tokens = 0  # running totals behind `fill_rate`
        self.row_tokens = 0

    @property
    def fill_rate(self) -> float:
        """Share of row slots holding sample tokens (not padding) over every batch collated so far."""
        return self.filled_tokens / self.row_tokens if self.row_tokens else 0.0

    def encode(self, example: dict, index: int = 0, granularity: int | list[int] | None = None) -> dict:
        """One sample alone: input_ids, labels (seq,), position_ids (3, seq), and its pixel tensors; its images at
        `granularity` (one level, or one per image) when given."""
        messages = example[self.messages_key]
        images = [
            _load_image(im, f"sample {index} image {i}") for i, im in enumerate(example.get(self.images_key) or [])
        ]
        prompt, spans = assistant_spans(messages, self.processor.chat_template, index)
        try:
            out = self.processor(
                images=images or None,
                text=[prompt],
                return_offsets_mapping=True,
                return_text_replacement_offsets=True,
                return_tensors="pt",
                padding=False,
                granularity=granularity if images else None,
            )
        except ValueError as error:
            raise ValueError(f"sample {index}: {error}") from error
        input_ids = out["input_ids"][0]
        if self.assistant_only_loss:
            keep = self._assistant_mask(out["offset_mapping"][0].tolist(), spans, out["text_replacement_offsets"][0])
            if not keep.any():
                raise ValueError(
                    f"sample {index} has no assistant tokens to train on (roles: {[m.get('role') for m in messages]})"
                )
        else:
            keep = torch.ones_like(input_ids, dtype=torch.bool)
        for token_id in self.vision_token_ids:
            keep &= input_ids != token_id
        labels = torch.where(keep, input_ids, IGNORE_INDEX)
        # the processor's (1, seq, 3) M-RoPE ids -> (3, seq); 1-D (1, seq) ids -> the same on the three rows
        positions = out["position_ids"][0].T if out["position_ids"].dim() == 3 else out["position_ids"]
        encoded = {"input_ids": input_ids, "labels": labels, "position_ids": positions.expand(3, -1)}
        for key in VISION_KEYS:
            if key in out and out[key].shape[0]:  # the processor returns zero rows for no images / videos
                encoded[key] = out[key]
        return encoded

    def encode_all(self, examples: list[dict]) -> list[dict]:
        """Encodes the batch at the levels `granularity` / `granularity_training` ask for (see the class)."""
        encoded = []
        for i, example in enumerate(examples):
            n_images = len(example.get(self.images_key) or [])
            if self.granularity is not None:
                encoded.append(self.encode(example, i, self.granularity))
            elif self.granularity_training == "random" and n_images:
                levels = [self.rng.randrange(self.num_levels) for _ in range(n_images)]
                encoded.append(self.encode(example, i, levels))
            elif self.granularity_training == "all" and n_images:
                encoded.extend(self.encode(example, i, level) for level in range(self.num_levels))
            else:
                encoded.append(self.encode(example, i))
        if self.granularity is not None or self.granularity_training is not None:
            for sample in encoded:  # every image carries a level, so the model pools each one as encoded
                if "image_num_grids" in sample and "image_granularity" not in sample:
                    sample["image_granularity"] = torch.zeros(len(sample["image_num_grids"]), dtype=torch.long)
        return encoded

    @staticmethod
    def _assistant_mask(offsets: list, spans: list, replacements: list) -> torch.Tensor:
        """True on tokens overlapping an assistant span (characters of the rendered prompt), the spans shifted past
        the placeholders the processor expanded (its `text_replacement_offsets`, transformers' public contract of
        `return_text_replacement_offsets`, as `ProcessorMixin.apply_chat_template` reads it)."""
        ends = [r["span"][1] for r in replacements]
        gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
        mask = torch.zeros(len(offsets), dtype=torch.bool)
        for start, end in spans:
            start += gained[sum(e <= start for e in ends)]
            end += gained[sum(e <= end - 1 for e in ends)]
            for pos, (token_start, token_end) in enumerate(offsets):
                if token_start < end and token_end > start:
                    mask[pos] = True
        return mask

    def __call__(self, examples: list[dict]) -> dict:
        encoded = self.encode_all(examples)
        lengths = [e["input_ids"].shape[0] for e in encoded]
        rows = best_fit_rows(lengths, self.max_tokens) if self.max_tokens else [list(range(len(encoded)))]
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((4, len(rows), width), dtype=torch.long)
        seqlens: list[int] = []
        vision: dict[str, list[torch.Tensor]] = {}
        for r, row in enumerate(rows):
            cursor = 0
            for i in row:
                sample, n = encoded[i], lengths[i]
                input_ids[r, cursor : cursor + n] = sample["input_ids"]
                labels[r, cursor : cursor + n] = sample["labels"]
                labels[r, cursor] = IGNORE_INDEX  # never predict a sample's first token from its neighbour
                position_ids[0, r, cursor : cursor + n] = torch.arange(n)
                position_ids[1:, r, cursor : cursor + n] = sample["position_ids"]
                for key in VISION_KEYS:
                    if key in sample:
                        vision.setdefault(key, []).append(sample[key])
                seqlens.append(n)
                cursor += n
            if cursor < width:  # padding tail: a segment of its own, positions restart, nothing to learn
                position_ids[:, r, cursor:] = torch.arange(width - cursor)
                seqlens.append(width - cursor)
        if not (labels != IGNORE_INDEX).any():
            raise ValueError(
                f"batch of {len(examples)} sample(s) has no token to train on: every label is ignored (prompt, "
                f"image or first tokens only; lengths {lengths})"
            )
        self.filled_tokens += sum(lengths)
        self.row_tokens += len(rows) * width
        cu_seqlens = torch.tensor([0] + seqlens).cumsum(0).to(torch.int32)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max(seqlens),
            "max_length_k": max(seqlens),
            "use_cache": False,
        }
        batch.update({key: torch.cat(parts) for key, parts in vision.items()})
        return batch


class PaddedCollator:
    """One sample per row, right-padded with an attention mask: `nativevl train --multimodal_packing false`.

    Each sample is encoded by `PackingCollator.encode`, as in a packed row: the assistant turns are found by
    `assistant_spans` (with or without `{% generation %}` markers, so a converted folder's own template trains
    unpacked too), vision tokens are never labels. So both paths train on the same tokens; here the model computes the
    position ids from the attention mask, as for any padded batch (TRL's `DataCollatorForVisionLanguageModeling`
    layout: `input_ids`, `attention_mask`, `labels` (rows, seq), then the vision keys in sample order).

    Args: `processor`, `assistant_only_loss`, `messages_key`, `images_key` as `PackingCollator`'s.
    """

    def __init__(
        self, processor, assistant_only_loss: bool = True, messages_key: str = "messages", images_key: str = "images"
    ) -> None:
        self.encoder = PackingCollator(
            processor, assistant_only_loss=assistant_only_loss, messages_key=messages_key, images_key=images_key
        )
        self.pad_token_id = self.encoder.pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        encoded = [self.encoder.encode(example, i) for i, example in enumerate(examples)]
        lengths = [e["input_ids"].shape[0] for e in encoded]
        input_ids = torch.full((len(encoded), max(lengths)), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros_like(input_ids)
        vision: dict[str, list[torch.Tensor]] = {}
        for row, (sample, n) in enumerate(zip(encoded, lengths, strict=True)):
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = sample["input_ids"], sample["labels"], 1
            for key in VISION_KEYS:
                if key in sample:
                    vision.setdefault(key, []).append(sample[key])
        if not (labels != IGNORE_INDEX).any():
            raise ValueError(
                f"batch of {len(examples)} sample(s) has no token to train on: every label is ignored (prompt or "
                f"image tokens only; lengths {lengths})"
            )
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch.update({key: torch.cat(parts) for key, parts in vision.items()})
        return batch
