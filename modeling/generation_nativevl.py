"""Generation for nativevl: `NativeVLGenerationMixin` of `NativeVLForConditionalGeneration`.

- `generate` (transformers' `GenerationMixin.generate` plus `granularity` and `fallback_threshold`): routed
  (`"auto"`) and cascade (`"cascade"`) decoding on a compacted prompt, and the confidence fallback to the full grids;
  its dict outputs are `NativeVLGenerateOutput` / `NativeVLGenerateBeamOutput`, transformers' own output classes
  with the fields nativevl adds declared.
- `_prepare_position_ids_for_generation` (overridden): M-RoPE ids of the prompt, with the plain row first.
- `_expand_inputs_for_generation` (overridden): per-image inputs expand by sample for beam search and
  `num_return_sequences`.

Expanding per-image inputs:

transformers' `GenerationMixin._expand_inputs_for_generation` (generation/utils.py) repeats every batch-first
tensor of the model kwargs along dim 0, row by row. nativevl's image inputs are not batch first: pixel values are
per patch, `image_grid_thw` per grid, `image_num_grids` / `image_granularity` per image, and the vision outputs
`generate` computes before the prefill (`mm_encoder_outputs`) per grid with per-image fields. Expanding a batch of
rows [r0, r1] to [r0, r0, r1, r1] must expand each row's images as a group, in placeholder order: images [A, B] of
r0 and C of r1 become [A, B, A, B, C, C]. `expansion_index` computes that order once per modality, and every per
-image, per-grid and per-patch input follows it.

This file is remote code: it imports only torch, transformers and its siblings.
"""

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from .granularity_nativevl import answer_confidence, compact_image_placeholders, image_rows
from .positions_nativevl import (
    channels_first_position_ids,
    grid_levels,
    image_token_counts,
    split_by_image,
    sum_per_image,
    tokens_per_image,
)
from .vision_nativevl import NativeVLVisionModelOutput, drop_empty


# generation settings a fallback cannot honour (one answer per sample, no per-step outputs)
FALLBACK_REFUSED = (
    "num_beams",
    "num_return_sequences",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
)


@dataclass
class NativeVLGenerateOutput(GenerateDecoderOnlyOutput):
    """`GenerateDecoderOnlyOutput` (transformers' own) of `generate(granularity="auto" | "cascade")`:
    `image_granularity` (num_images,) long: the level each image was answered at; with `fallback_threshold`
    (then `sequences` alone of the parent's fields is set) also `visual_tokens` (num_images,) long: the
    placeholders each image fed the LLM over both passes, `fallback` (batch,) bool: the samples answered again on
    the full grids, `confidence` (batch,) float32: the confidence of each first answer."""

    image_granularity: torch.LongTensor | None = None
    visual_tokens: torch.LongTensor | None = None
    fallback: torch.BoolTensor | None = None
    confidence: torch.FloatTensor | None = None


@dataclass
class NativeVLGenerateBeamOutput(GenerateBeamDecoderOnlyOutput):
    """`GenerateBeamDecoderOnlyOutput` (transformers' own) of `generate(granularity="auto" | "cascade",
    num_beams > 1)`: `image_granularity` (num_images,) long, the level each image was answered at. The other
    fields stay None (a fallback refuses beam search); declared so both outputs read alike."""

    image_granularity: torch.LongTensor | None = None
    visual_tokens: torch.LongTensor | None = None
    fallback: torch.BoolTensor | None = None
    confidence: torch.FloatTensor | None = None


def rows_of_items(item_tokens: Sequence[int], row_tokens: Sequence[int], name: str) -> list[int]:
    """The row of each item (image or video, in placeholder order) given each item's placeholder count and the
    placeholder count of each row; raises, naming both counts, when the items do not fill the rows exactly."""
    if sum(item_tokens) != sum(row_tokens):
        raise ValueError(
            f"{name.capitalize()} features and {name} tokens do not match, tokens: {sum(row_tokens)}, features: "
            f"{sum(item_tokens)}: the {name}s need {list(item_tokens)} placeholders each, the rows hold "
            f"{list(row_tokens)}"
        )
    ends = torch.tensor(list(row_tokens), dtype=torch.long).cumsum(0).tolist()  # exclusive end of each row
    rows, start = [], 0
    for count in item_tokens:
        row = bisect.bisect_right(ends, start)
        if start + count > ends[row]:
            raise ValueError(
                f"{name} {len(rows)} ({count} placeholders from token {start}) straddles rows {row} and {row + 1}: "
                f"the rows hold {list(row_tokens)} {name} placeholders"
            )
        rows.append(row)
        start += count
    return rows


def expansion_index(item_rows: Sequence[int], num_rows: int, expand_size: int) -> torch.LongTensor:
    """(num_items * expand_size,) long: the items of each row repeated as a group `expand_size` times, rows in
    order, matching `input_ids.repeat_interleave(expand_size, dim=0)`."""
    groups = [[i for i, r in enumerate(item_rows) if r == row] for row in range(num_rows)]
    return torch.tensor([i for group in groups for _ in range(expand_size) for i in group], dtype=torch.long)


def _sub_index(index: torch.LongTensor, sizes: Sequence[int]) -> torch.LongTensor:
    """The index of the sub-elements (grids of images, patches of grids) that follow `index` over the elements
    whose sizes are `sizes`: each element's sub-elements in order."""
    starts = [0] + torch.tensor(list(sizes), dtype=torch.long).cumsum(0).tolist()
    return torch.tensor([j for i in index.tolist() for j in range(starts[i], starts[i + 1])], dtype=torch.long)


class NativeVLGenerationMixin:
    """`generate` with routed, cascade and fallback decoding, M-RoPE prompt positions, and per-image inputs
    expanded by sample for beam search and `num_return_sequences` (see the module docstring). Needs `config`,
    `generation_config`, `model` (a `NativeVLModel`) and transformers' `GenerationMixin` after it in the MRO."""

    # (modality, token-id attribute of the config, per-patch key, per-grid key, per-image keys)
    _PER_ITEM_KEYS = (
        ("image", "image_token_id", "pixel_values", "image_grid_thw", ("image_num_grids", "image_granularity")),
        ("video", "video_token_id", "pixel_values_videos", "video_grid_thw", ()),
    )

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor, dict]:
        if expand_size == 1:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        encoded = dict(model_kwargs.pop("mm_encoder_outputs", None) or {})
        expanded = {}
        for modality, token_attr, patch_key, grid_key, image_keys in self._PER_ITEM_KEYS:
            output = encoded.get(modality)
            own = {
                k: model_kwargs.pop(k) for k in (patch_key, grid_key, *image_keys) if model_kwargs.get(k) is not None
            }
            if output is None and grid_key not in own:
                continue
            if input_ids is None:
                raise ValueError(
                    f"num_beams / num_return_sequences with {modality}s need input_ids: the {modality} placeholders "
                    "tell which row each one belongs to"
                )
            grid_tokens, image_grids = self._item_sizes(output, own, grid_key, image_keys)
            item_tokens = sum_per_image(grid_tokens, image_grids).tolist()
            row_tokens = (input_ids == getattr(self.config, token_attr)).sum(-1).tolist()
            items = expansion_index(rows_of_items(item_tokens, row_tokens, modality), len(row_tokens), expand_size)
            grids_per_item = [1] * len(item_tokens) if image_grids is None else image_grids.tolist()
            grids = _sub_index(items, grids_per_item)
            for key in image_keys:
                if key in own and isinstance(own[key], torch.Tensor) and own[key].dim() > 0:
                    own[key] = own[key][items.to(own[key].device)]
            if grid_key in own:
                if patch_key in own:
                    patches = _sub_index(grids, own[grid_key].prod(-1).tolist())
                    own[patch_key] = own[patch_key][patches.to(own[patch_key].device)]
                own[grid_key] = own[grid_key][grids.to(own[grid_key].device)]
            expanded.update(own)
            if output is not None:
                encoded[modality] = self._expand_vision_output(output, items, grids)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(expanded)
        if encoded:
            model_kwargs["mm_encoder_outputs"] = encoded
        return input_ids, model_kwargs

    def _item_sizes(self, output, own: dict, grid_key: str, image_keys: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Placeholder tokens of each grid (num_grids,) and grids of each image (num_images,) or None (one each),
        from the vision output when there is one (its per-grid `pooler_output`), else from the raw inputs."""
        if output is not None:
            features = output.pooler_output
            if isinstance(features, torch.Tensor):
                raise ValueError(
                    "num_beams / num_return_sequences need mm_encoder_outputs whose pooler_output holds one tensor "
                    "per grid (what get_image_features / get_video_features return), got one tensor of shape "
                    f"{tuple(features.shape)}"
                )
            grid_tokens = torch.tensor([part.shape[0] for part in features], dtype=torch.long)
            image_grids = getattr(output, "image_num_grids", None)
        else:
            merge = self.config.vision_config.spatial_merge_size
            image_grids = own.get("image_num_grids") if "image_num_grids" in image_keys else None
            levels = self.model.resolve_granularity(own.get("image_granularity"), own[grid_key], image_grids)
            per_grid = grid_levels(levels, image_grids, own[grid_key].shape[0])
            grid_tokens = torch.tensor(image_token_counts(own[grid_key], per_grid, merge), dtype=torch.long)
        return grid_tokens, None if image_grids is None else image_grids.cpu()

    @staticmethod
    def _expand_vision_output(output, items: torch.LongTensor, grids: torch.LongTensor):
        """A copy of a vision output with its per-grid `pooler_output` and per-image fields in expanded order."""
        fields = dict(output.items())
        fields["pooler_output"] = tuple(output.pooler_output[g] for g in grids.tolist())
        for key in ("image_granularity", "image_num_grids"):
            value = fields.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                fields[key] = value[items.to(value.device)]
        return type(output)(**fields)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """Prompt position ids for `generate`: plain for the 1-D scheme; for M-RoPE (4, batch, seq) with the plain
        positions first and the (t, h, w) ids after; `generate` then extends every row by +1 per new token."""
        text_ids = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)  # (batch, seq)
        if self.config.position_scheme == "1d":
            return text_ids
        input_ids = model_kwargs.get("input_ids")
        if input_ids is None or input_ids.shape[1] == 0:
            input_ids = inputs_tensor
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int, torch.long):
            # Prompt given as embeddings: no placeholder tokens to read, so plain positions on all rows.
            return text_ids.unsqueeze(0).expand(4, -1, -1)
        mask = model_kwargs.get("attention_mask")
        grids = model_kwargs.get("image_grid_thw")
        # the prefill forward derives rope_deltas from these ids (`_given_position_ids`)
        num_grids = model_kwargs.get("image_num_grids")
        mrope_ids, _ = self.model.get_rope_index(
            input_ids,
            model_kwargs.get("mm_token_type_ids"),
            grids,
            model_kwargs.get("video_grid_thw"),
            mask if mask is not None and mask.dim() == 2 else None,
            image_granularity=model_kwargs.get("image_granularity"),
            image_num_grids=num_grids,
        )
        return torch.cat([text_ids.unsqueeze(0).to(mrope_ids.device), mrope_ids], dim=0)  # (4, batch, seq)

    def generate(
        self,
        *args,
        granularity: str | int | torch.LongTensor | None = None,
        fallback_threshold: float | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate` plus `granularity`: None (full grids), an int level or one level per image
        (the prompt's placeholders must already match, e.g. from `processor(..., granularity=...)`; crop mode's
        tiles take their image's level through the processor's `image_num_grids`), `"auto"` or `"cascade"`.

        The processor's batch-first M-RoPE ids (batch, seq, 3) are accepted as `position_ids`; zero-row pixel
        values (text-only samples) count as none. The vision tower runs once, before the prefill, through
        transformers' `mm_encoder_outputs`.

        `"auto"` (prompt expanded for level 0, as the processor does by default): the vision tower and the router
        run once on the prompt and pick each image's level; the prompt is compacted (each image keeps the
        placeholders of its level, rows re-padded on the same side, attention mask rebuilt), its position ids are
        computed for the pooled grids, and the standard `generate` runs on it with the pooled features. The
        returned sequences are the ORIGINAL prompt ids followed by the generated tokens, so slicing off
        `input_ids.shape[1]` (as `pipeline` does) stays correct; with `return_dict_in_generate=True` the output
        is a `NativeVLGenerateOutput` (`NativeVLGenerateBeamOutput` for beam search) carrying `image_granularity`
        (num_images,).

        `fallback_threshold` (nativevl's addition, with `"auto"` or `"cascade"`): a sample whose answer at its
        images' levels has a token the model gave a probability below the threshold (`answer_confidence`, up to
        its first end token) is answered again with its images on the full grid (level 0), from the same vision
        features; the other samples keep their answers. `"cascade"` answers every image at the coarsest level
        first (no router; threshold `config.cascade_threshold` unless given). With a fallback, the returned
        `NativeVLGenerateOutput` holds `sequences` and: `image_granularity`, each image's final level, `visual_tokens` (num_images,) the placeholders its passes fed the LLM (first
        level plus, after a fallback, level 0), `fallback` (batch,) bool the samples answered again and
        `confidence` (batch,) the confidence of each first answer; per-step outputs (scores, logits, attentions,
        hidden states, the cache) are not returned, streaming and beam search are refused, and sequences are
        right-padded with the pad token after their answer.
        """
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids, args = args[0], args[1:]
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            kept = drop_empty(kwargs.get(pixels), kwargs.get(grid))
            for key, value in zip((pixels, grid), kept, strict=True):
                if value is None:
                    kwargs.pop(key, None)
        if kwargs.get("image_grid_thw") is None:
            kwargs.pop("image_num_grids", None)  # zero rows for a text-only batch
        if kwargs.get("position_ids") is not None and input_ids is not None:
            kwargs["position_ids"] = channels_first_position_ids(kwargs["position_ids"], *input_ids.shape[:2])
        if isinstance(granularity, str) and granularity not in ("auto", "cascade"):
            raise ValueError(
                f"granularity must be None, an int, per-image levels, 'auto' or 'cascade', got {granularity!r}"
            )
        if fallback_threshold is not None and granularity not in ("auto", "cascade"):
            raise ValueError(f"fallback_threshold needs granularity='auto' or 'cascade', got {granularity!r}")
        if granularity == "cascade":
            if not self.config.granularity:
                raise ValueError("granularity='cascade' needs a model with granularity levels (config.granularity)")
            fallback_threshold = self.config.cascade_threshold if fallback_threshold is None else fallback_threshold
        if fallback_threshold is not None and not 0.0 <= fallback_threshold <= 1.0:
            raise ValueError(f"fallback_threshold is a probability in [0, 1], got {fallback_threshold}")
        grids = kwargs.get("image_grid_thw")
        if not isinstance(granularity, str):
            if granularity is not None and grids is not None:
                kwargs["image_granularity"] = self.model.resolve_granularity(
                    granularity, grids, kwargs.get("image_num_grids")
                )
            return super().generate(*args, input_ids=input_ids, **kwargs)
        if kwargs.get("pixel_values") is None or input_ids is None:  # nothing to route
            return super().generate(*args, input_ids=input_ids, **kwargs)
        if fallback_threshold is None:
            return self._generate_routed(input_ids, *args, granularity=granularity, **kwargs)
        return self._generate_with_fallback(
            input_ids, *args, granularity=granularity, threshold=fallback_threshold, **kwargs
        )

    def _first_levels(self, granularity: str, input_ids: torch.LongTensor, kwargs: dict):
        """Runs the vision tower once and returns the first pass's levels (num_images,), kept-placeholder mask
        (batch, seq) and level-0 vision outputs: the router's choice (`"auto"`) or the coarsest level for every
        image (`"cascade"`). Pops `pixel_values` and `image_granularity` from `kwargs`."""
        grids, num_grids, mask = kwargs["image_grid_thw"], kwargs.get("image_num_grids"), kwargs.get("attention_mask")
        from_levels = kwargs.pop("image_granularity", None)
        with torch.no_grad():
            image_out = self.model._encode(kwargs.pop("pixel_values"), grids)
        if granularity == "auto":
            levels, kept = self.model.route_images(input_ids, image_out, grids, mask, None, from_levels, num_grids)
            return levels, kept, image_out
        from_levels = self.model.resolve_granularity(from_levels, grids, num_grids)
        n_images = grids.shape[0] if num_grids is None else num_grids.shape[0]
        levels = torch.full((n_images,), self.config.granularity - 1, dtype=torch.long)
        kept = self.model.surplus_placeholder_mask(input_ids, mask, grids, from_levels, levels, num_grids)
        return levels, kept, image_out

    def _pad_id(self) -> int:
        pad = self.generation_config.pad_token_id
        pad = pad if pad is not None else (self.config.text_config.pad_token_id or 0)
        return int(pad if not isinstance(pad, torch.Tensor) else pad.flatten()[0])

    def _generate_routed(self, input_ids: torch.LongTensor, *args, granularity: str = "auto", **kwargs):
        """`generate(granularity="auto" | "cascade")` without fallback (see `generate`): choose the levels,
        compact the prompt, generate on pooled features."""
        levels, kept, image_out = self._first_levels(granularity, input_ids, kwargs)
        return self._generate_at_levels(input_ids, levels, kept, image_out, *args, **kwargs)

    def _generate_at_levels(self, input_ids, levels, kept, image_out, *args, **kwargs):
        """One `generate` of a prompt expanded for level 0 whose images are pooled to `levels` (num_images,):
        the placeholders `kept` (batch, seq) marks 0 are removed. Returns generate's output with the ORIGINAL
        prompt ids in front of the generated tokens; a dict output becomes a `NativeVLGenerateOutput` (or
        `NativeVLGenerateBeamOutput`) with `image_granularity`."""
        grids, num_grids = kwargs["image_grid_thw"], kwargs.get("image_num_grids")
        compact_ids, compact_mask = compact_image_placeholders(
            input_ids, kwargs.get("attention_mask"), kept, self._pad_id()
        )
        kwargs.pop("position_ids", None)  # the processor's ids describe the full grids; recomputed for the levels
        kwargs["attention_mask"] = compact_mask
        kwargs["image_granularity"] = levels
        pooled = self.model.pool_image_outputs(image_out, grids, levels, num_grids)
        kwargs["mm_encoder_outputs"] = {"image": pooled}
        out = super().generate(*args, input_ids=compact_ids, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompts = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)  # num_return_sequences
        sequences = torch.cat([prompts.to(sequences.device), sequences[:, compact_ids.shape[1] :]], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        declared = (
            NativeVLGenerateBeamOutput if isinstance(out, GenerateBeamDecoderOnlyOutput) else NativeVLGenerateOutput
        )
        return declared(**{**out, "sequences": sequences, "image_granularity": levels})

    def _generate_with_fallback(self, input_ids, *args, granularity: str, threshold: float, **kwargs):
        """`generate` with `fallback_threshold` (see `generate`): a first pass at the chosen levels, then the
        samples whose answer confidence is below `threshold` again at level 0, from the same vision features."""
        config = kwargs.get("generation_config") or self.generation_config
        setting = {name: kwargs.get(name, getattr(config, name, None)) for name in FALLBACK_REFUSED}
        refused = {k: v for k, v in setting.items() if v is not None and v is not False and (v is True or v != 1)}
        if refused:  # None / False: not asked; 1: one beam, one sequence
            raise ValueError(f"fallback_threshold cannot be combined with {refused}")
        for name in FALLBACK_REFUSED:
            kwargs.pop(name, None)
        if kwargs.get("streamer") is not None:
            raise ValueError("fallback_threshold cannot stream: a sample may be answered twice")
        return_dict = kwargs.pop("return_dict_in_generate", getattr(config, "return_dict_in_generate", False))
        grids, num_grids = kwargs["image_grid_thw"], kwargs.get("image_num_grids")
        merge = self.config.vision_config.spatial_merge_size
        from_levels = self.model.resolve_granularity(kwargs.get("image_granularity"), grids, num_grids)
        if from_levels is not None and bool((from_levels != 0).any()):
            raise ValueError(
                "fallback_threshold needs the prompt expanded for the full grids (the processor's default)"
            )
        rows = image_rows(input_ids, grids, None, num_grids, self.config.image_token_id, merge).cpu()  # (images,)
        levels, kept, image_out = self._first_levels(granularity, input_ids, kwargs)
        features = image_out.pooler_output  # read before the first pass pools image_out in place
        features = features if isinstance(features, torch.Tensor) else torch.cat(features)  # level 0, all grids
        first = self._generate_at_levels(
            input_ids, levels, kept, image_out, *args, return_dict_in_generate=True, output_logits=True, **kwargs
        )
        prompt_len = input_ids.shape[1]
        new_tokens = first.sequences[:, prompt_len:]  # (batch, steps)
        answers = list(new_tokens)
        end_ids = config.eos_token_id if kwargs.get("eos_token_id") is None else kwargs["eos_token_id"]
        end_ids = [end_ids] if isinstance(end_ids, int) else list(end_ids or [])
        confidence = answer_confidence(first.logits, new_tokens, end_ids).cpu()  # (batch,)
        coarse_rows = set(rows[levels.cpu() > 0].tolist())
        redo = [b for b in range(input_ids.shape[0]) if b in coarse_rows and confidence[b] < threshold]
        visual_tokens = tokens_per_image(grids, levels, num_grids, merge)  # (images,)
        full_tokens = tokens_per_image(grids, None, num_grids, merge)
        final_levels = levels.clone()
        if redo:
            images, second = self._answer_on_full_grids(input_ids, redo, rows, features, *args, **kwargs)
            for i, b in enumerate(redo):
                answers[b] = second[i, prompt_len:]
            final_levels[images] = 0
            visual_tokens[images] += full_tokens[images]
        width = max(len(a) for a in answers)
        pad = self._pad_id()
        sequences = input_ids.new_full((input_ids.shape[0], prompt_len + width), pad)
        sequences[:, :prompt_len] = input_ids
        for b, answer in enumerate(answers):
            sequences[b, prompt_len : prompt_len + len(answer)] = answer.to(sequences.device)
        if not return_dict:
            return sequences
        fallback = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        fallback[redo] = True
        return NativeVLGenerateOutput(
            sequences=sequences,
            image_granularity=final_levels,
            visual_tokens=visual_tokens,
            fallback=fallback,
            confidence=confidence,
        )

    def _answer_on_full_grids(self, input_ids, redo: list[int], rows, features, *args, **kwargs):
        """The fallback pass: rows `redo` of `input_ids` (a prompt expanded for level 0) generated again with their
        images on the full grids, from the level-0 `features` (sum t*h*w/4, D) of all grids; `rows` (num_images,)
        is the row of each image. Returns the indices of those images (k,) and the sequences (len(redo), seq')."""
        grids, num_grids = kwargs["image_grid_thw"], kwargs.get("image_num_grids")
        images = torch.isin(rows, torch.tensor(redo)).nonzero().squeeze(-1)  # (k,), in order
        per_image = num_grids.cpu() if num_grids is not None else torch.ones(len(rows), dtype=torch.long)
        grid_ids = (
            torch.isin(torch.repeat_interleave(torch.arange(len(rows)), per_image), images).nonzero().squeeze(-1)
        )
        parts, _ = split_by_image(features, grids, self.config.vision_config.spatial_merge_size)
        sub_out = NativeVLVisionModelOutput(pooler_output=torch.cat([parts[g] for g in grid_ids.tolist()]))
        index = torch.tensor(redo, device=input_ids.device)
        sub = {k: v for k, v in kwargs.items() if k not in ("position_ids", "image_granularity")}
        sub["image_grid_thw"] = grids[grid_ids.to(grids.device)]
        if num_grids is not None:
            sub["image_num_grids"] = num_grids[images.to(num_grids.device)]
        for name in ("attention_mask", "mm_token_type_ids"):  # per-row inputs
            if sub.get(name) is not None:
                sub[name] = sub[name][index.to(sub[name].device)]
        sub_ids, full = input_ids[index], torch.zeros(len(images), dtype=torch.long)
        kept = self.model.surplus_placeholder_mask(
            sub_ids, sub.get("attention_mask"), sub["image_grid_thw"], None, full, sub.get("image_num_grids")
        )  # nothing is dropped at level 0; the rows are re-padded
        out = self._generate_at_levels(sub_ids, full, kept, sub_out, *args, **sub)
        return images, out if isinstance(out, torch.Tensor) else out.sequences


__all__ = [
    "FALLBACK_REFUSED",
    "NativeVLGenerateBeamOutput",
    "NativeVLGenerateOutput",
    "NativeVLGenerationMixin",
    "expansion_index",
    "rows_of_items",
]
