"""Generation support for nativevl: expanding per-image inputs for beam search and `num_return_sequences`.

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

import torch

from .positions_nativevl import grid_levels, image_token_counts, sum_per_image


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
    """Overrides transformers' `_expand_inputs_for_generation` so beam search and `num_return_sequences` expand
    nativevl's per-image, per-grid and per-patch inputs by sample (see the module docstring)."""

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


__all__ = ["NativeVLGenerationMixin", "expansion_index", "rows_of_items"]
