"""Grids, token counts and M-RoPE positions: pure functions, one source for the model and the processor.

- Token counts: a patch grid (t, h, w) becomes t*h*w / merge**2 LLM tokens; at AVG-LLaVA granularity level l
  (arXiv 2410.02745) the merged grid is pooled to `level_grid(t, h/m, w/m, l)` (1x2 then 2x1 steps, ceil mode).
- M-RoPE (Qwen2-VL, arXiv 2409.12191; transformers' `Qwen2VLModel.get_rope_index`): rows (temporal, height,
  width). Text takes its running position on all three rows; the tokens of a grid take start + (frame, row, col)
  over its merged grid; the next token resumes at the largest id so far + 1.
- Images and grids: an image is one grid (`image_grid_thw` row), or in crop mode several (the global view, then
  the tiles: `image_num_grids` per image). Users give one granularity level per image; `repeat_per_grid` alone turns
  per-image values into per-grid ones, and the grid functions here take one level per grid.

- `NativeVLPositionsMixin` (of `NativeVLModel`): the model's one M-RoPE entry `get_rope_index` (transformers'
  contract) over the pure `rope_index`, the ids `forward` computes or checks, packed rows included.

This file is remote code and imports only numpy, torch and transformers. The processor's functions here (and those
they call) are copied into `processing/processing_positions_nativevl.py` by `python -m nativevl.modeling.sync_copies`
(remote-code folders cannot import each other; tests/test_processing_nativevl.py fails when the copy is stale), so the
processor and the model compute grids, counts and position ids with the same functions.
"""

from collections.abc import Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache


def level_grid(t: int, h: int, w: int, level: int) -> tuple[int, int, int]:
    """Merged grid (t, h', w') of granularity `level` for a merged grid (t, h, w) (tokens, not patches).

    Step s = 0, 1, 2, ... halves the width (even s, 1x2 pooling) or the height (odd s, 2x1 pooling), rounding up
    (ceil mode); a side of 1 stays 1, so no level goes below one token per row and column.
    """
    for step in range(level):
        if step % 2 == 0:
            w = (w + 1) // 2
        else:
            h = (h + 1) // 2
    return t, h, w


def pooled_grids(
    grids: Sequence[Sequence[int]], levels: Sequence[int] | None, merge_size: int
) -> list[tuple[int, int, int]]:
    """Patch grids [t, h, w] that describe images pooled to `levels` (one per grid; None: level 0):
    (t, h' * m, w' * m) for the merged grid (t, h', w') of each level, so that placeholder counts and M-RoPE
    (row, col) ids follow the pooled grid."""
    if levels is None:
        return [(int(t), int(h), int(w)) for t, h, w in grids]
    if len(levels) != len(grids):
        raise ValueError(f"{len(levels)} granularity level(s) for {len(grids)} image grid(s)")
    out = []
    for (t, h, w), level in zip(grids, levels, strict=True):
        t, gh, gw = level_grid(int(t), int(h) // merge_size, int(w) // merge_size, int(level))
        out.append((t, gh * merge_size, gw * merge_size))
    return out


def repeat_per_grid(values: Sequence[int], image_num_grids: Sequence[int] | None, num_grids: int) -> list[int]:
    """One value per image grid from one value per image: image i's value repeated for its `image_num_grids[i]`
    grids (crop mode: the global view, then the tiles), in grid order. None: one grid per image. Raises, naming the
    counts, when the values do not give one per image or the images do not add up to `num_grids` grids. The one
    place per-image values (granularity levels, image indices) become per-grid ones."""
    values = [int(v) for v in values]
    counts = [1] * num_grids if image_num_grids is None else [int(n) for n in image_num_grids]
    if sum(counts) != num_grids or any(n < 1 for n in counts):
        raise ValueError(f"image_num_grids {counts} must be >= 1 each and add up to the {num_grids} image grid(s)")
    if len(values) != len(counts):
        raise ValueError(
            f"{len(values)} value(s) {values} for {len(counts)} image(s) (image_num_grids {counts}): one per image"
        )
    return [v for v, n in zip(values, counts, strict=True) for _ in range(n)]


def grid_token_counts(
    grids: Sequence[Sequence[int]], merge_size: int, levels: Sequence[int] | None = None
) -> list[int]:
    """LLM tokens (placeholders) of each patch grid [t, h, w] at its level (None: level 0)."""
    return [t * h * w // merge_size**2 for t, h, w in pooled_grids(grids, levels, merge_size)]


def _mrope_positions(
    kinds: np.ndarray, image_grids: list[list[int]], video_grids: list[list[int]], merge_size: int
) -> np.ndarray:
    """M-RoPE ids (3, seq) int64 of one unpadded sequence; consumes grids from the front of `image_grids` /
    `video_grids`. kinds: (seq,) ints, 0 text, 1 image placeholder, 2 video placeholder."""
    seq_len = kinds.shape[0]
    positions = np.empty((3, seq_len), dtype=np.int64)
    cursor, next_pos = 0, 0
    while cursor < seq_len:
        kind = int(kinds[cursor])
        if kind == 0:
            rest = np.flatnonzero(kinds[cursor:] != 0)
            end = cursor + int(rest[0]) if rest.size else seq_len
            positions[:, cursor:end] = np.arange(next_pos, next_pos + end - cursor)
            next_pos, cursor = next_pos + end - cursor, end
            continue
        grids, name = (image_grids, "image") if kind == 1 else (video_grids, "video")
        if not grids:
            raise ValueError(f"found more {name} placeholder tokens than {name} grids (at position {cursor})")
        t, h, w = (int(x) for x in grids.pop(0))
        gh, gw = h // merge_size, w // merge_size
        n_tok = t * gh * gw
        if cursor + n_tok > seq_len or not bool((kinds[cursor : cursor + n_tok] == kind).all()):
            other = np.flatnonzero(kinds[cursor:] != kind)
            found = int(other[0]) if other.size else seq_len - cursor
            raise ValueError(
                f"{name} grid {[t, h, w]} needs {n_tok} consecutive {name} tokens but {found} start at position {cursor}"
            )
        frame, row, col = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")  # (t, gh, gw) each
        positions[:, cursor : cursor + n_tok] = np.stack([frame, row, col]).reshape(3, n_tok) + next_pos
        next_pos, cursor = next_pos + max(t, gh, gw), cursor + n_tok
    return positions


def batch_mrope_positions(
    kinds: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grids: Sequence[Sequence[int]],
    video_grids: Sequence[Sequence[int]],
    merge_size: int,
    levels_per_grid: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE ids of a padded batch: kinds (batch, seq) (0 text / 1 image / 2 video), attention_mask (batch, seq)
    (0 on left or right padding; None: no padding), grids in placeholder order sample after sample,
    levels_per_grid one granularity level per image grid (crop tiles repeat their image's level:
    `repeat_per_grid`). Returns ids (3, batch, seq) int64, 0 on padding (as transformers' Qwen2-VL), and rope
    deltas (batch,): largest id + 1 - unpadded length. Raises when a grid finds no placeholders or placeholders no
    grid."""
    image_left = [list(g) for g in pooled_grids(image_grids, levels_per_grid, merge_size)]
    video_left = [list(g) for g in video_grids]
    batch, seq_len = kinds.shape
    positions = np.zeros((3, batch, seq_len), dtype=np.int64)
    deltas = np.zeros(batch, dtype=np.int64)
    for b in range(batch):
        keep = np.ones(seq_len, dtype=bool) if attention_mask is None else attention_mask[b].astype(bool)
        pos = _mrope_positions(kinds[b][keep], image_left, video_left, merge_size)
        positions[:, b, keep] = pos
        deltas[b] = (int(pos.max()) + 1 if pos.size else 0) - pos.shape[1]
    if image_left or video_left:
        raise ValueError(
            f"{len(image_left)} image grid(s) and {len(video_left)} video grid(s) have no placeholder tokens left"
        )
    return positions, deltas


def placeholder_kinds(
    input_ids: torch.LongTensor,
    image_token_id: int,
    video_token_id: int,
    has_images: bool,
    has_videos: bool,
    mm_token_type_ids: torch.Tensor | None = None,
) -> torch.LongTensor:
    """(batch, seq) long: 0 text, 1 image, 2 video. `mm_token_type_ids` when given; else a token is an image (video)
    placeholder when it holds the image (video) token id AND the batch has images (videos), so text-only inputs
    holding those ids are text, as in transformers' Qwen2-VL."""
    if mm_token_type_ids is not None:
        return mm_token_type_ids.long()
    kinds = torch.zeros_like(input_ids, dtype=torch.long)
    if has_images:
        kinds[input_ids == image_token_id] = 1
    if has_videos:
        kinds[input_ids == video_token_id] = 2
    return kinds


def rope_index(
    kinds: torch.LongTensor,
    merge_size: int,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    levels_per_grid: torch.LongTensor | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`batch_mrope_positions` on tensors: kinds (batch, seq) from `placeholder_kinds`, grids (num, 3), mask
    (batch, seq), levels_per_grid (num_image_grids,) (`grid_levels`). Returns position ids (3, batch, seq) and
    rope_deltas (batch, 1) long on the device of `kinds`."""
    positions, deltas = batch_mrope_positions(
        kinds.cpu().numpy(),
        None if attention_mask is None else attention_mask.cpu().numpy(),
        [] if image_grid_thw is None else image_grid_thw.tolist(),
        [] if video_grid_thw is None else video_grid_thw.tolist(),
        merge_size,
        None if levels_per_grid is None else [int(x) for x in levels_per_grid.tolist()],
    )
    device = kinds.device
    return torch.from_numpy(positions).to(device), torch.from_numpy(deltas).to(device).unsqueeze(1)


def text_positions(
    batch: int, seq_len: int, past_length: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.LongTensor:
    """Plain positions (batch, seq_len) of the newest `seq_len` tokens: count of attended tokens before each one
    (so left padding is skipped), or past_length + arange without a mask."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, past + seq)
        return positions[:, -seq_len:].to(device)
    return torch.arange(past_length, past_length + seq_len, device=device).expand(batch, seq_len)


def channels_first_position_ids(position_ids: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Position ids in the decoder's layout: (batch, seq) or (rows, batch, seq). The processor's batch-first M-RoPE
    ids (batch, seq, 3) (a layout every padding collator pads along the sequence) are moved to (3, batch, seq).
    A shape that reads both ways ((3, 3, 3) for 3 sequences of 3 tokens) is taken as (rows, batch, seq)."""
    if position_ids.dim() != 3 or tuple(position_ids.shape[1:]) == (batch, seq_len):
        return position_ids
    if tuple(position_ids.shape[:2]) == (batch, seq_len) and position_ids.shape[2] in (3, 4):
        return position_ids.permute(2, 0, 1)  # (batch, seq, rows) -> (rows, batch, seq)
    raise ValueError(
        f"position_ids of shape {tuple(position_ids.shape)} fit neither (rows, batch, seq) nor (batch, seq, rows) "
        f"for batch {batch} and sequence length {seq_len}"
    )


def rope_deltas_from_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.LongTensor:
    """rope_deltas (batch, 1) of given M-RoPE ids (3 or 4, batch, seq): largest id over the attended tokens + 1
    minus their count, so cached decoding continues where the given ids end."""
    rows = position_ids[-3:]  # (3, batch, seq): the M-RoPE rows (a leading plain row of packed ids is skipped)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return (rows.amax(dim=(0, 2)) + 1 - rows.shape[-1]).unsqueeze(1)
    mask = attention_mask.to(rows.device).bool()
    largest = rows.masked_fill(~mask.unsqueeze(0), -1).amax(dim=(0, 2))  # (batch,)
    return (largest + 1 - mask.sum(-1)).unsqueeze(1)


def pooled_grid_thw(
    image_grid_thw: torch.LongTensor, levels_per_grid: torch.LongTensor | None, merge_size: int
) -> torch.LongTensor:
    """`pooled_grids` on a (num_grids, 3) tensor: the patch grids pooled to their levels (num_grids,)."""
    if levels_per_grid is None:
        return image_grid_thw
    grids = pooled_grids(image_grid_thw.tolist(), levels_per_grid.tolist(), merge_size)
    return torch.tensor(grids, dtype=torch.long, device=image_grid_thw.device).view(-1, 3)


def image_token_counts(
    image_grid_thw: torch.LongTensor, levels_per_grid: torch.LongTensor | None, merge_size: int
) -> list[int]:
    """`grid_token_counts` on tensors: placeholder tokens of each image grid at its level (num_grids,) (None:
    level 0)."""
    levels = None if levels_per_grid is None else levels_per_grid.tolist()
    return grid_token_counts(image_grid_thw.tolist(), merge_size, levels)


def grid_levels(
    image_granularity: torch.LongTensor | None, image_num_grids: torch.LongTensor | None, num_grids: int
) -> torch.LongTensor | None:
    """`repeat_per_grid` on tensors: per-image levels (num_images,) -> per-grid levels (num_grids,) long on the
    levels' device; None stays None."""
    if image_granularity is None:
        return None
    counts = None if image_num_grids is None else image_num_grids.tolist()
    levels = repeat_per_grid(image_granularity.tolist(), counts, num_grids)
    return torch.tensor(levels, dtype=torch.long, device=image_granularity.device)


def sum_per_image(values: torch.Tensor, image_num_grids: torch.LongTensor | None) -> torch.Tensor:
    """Per-grid values (num_grids, ...) summed over each image's grids: (num_images, ...). None: one grid per
    image (returned unchanged)."""
    if image_num_grids is None:
        return values
    n_images = image_num_grids.shape[0]
    image_of_grid = repeat_per_grid(range(n_images), image_num_grids.tolist(), values.shape[0])
    index = torch.tensor(image_of_grid, dtype=torch.long, device=values.device)
    return values.new_zeros((n_images, *values.shape[1:])).index_add_(0, index, values)


def tokens_per_image(
    image_grid_thw: torch.LongTensor,
    image_granularity: torch.LongTensor | None,
    image_num_grids: torch.LongTensor | None,
    merge_size: int,
) -> torch.LongTensor:
    """Placeholder tokens of each image (num_images,) long, on the host: its grids at its level
    (`image_granularity` (num_images,), None: level 0) summed (`image_num_grids` (num_images,), None: one grid per
    image)."""
    per_grid = grid_levels(image_granularity, image_num_grids, image_grid_thw.shape[0])
    counts = torch.tensor(image_token_counts(image_grid_thw, per_grid, merge_size), dtype=torch.long)
    return sum_per_image(counts, None if image_num_grids is None else image_num_grids.cpu())


def split_by_image(
    features: torch.Tensor, image_grid_thw: torch.LongTensor, merge_size: int
) -> tuple[tuple[torch.Tensor, ...], list[tuple[int, int, int]]]:
    """Level-0 tokens (sum t*h*w/m^2, D) of all images split per image, with each image's merged grid (t, h/m, w/m)."""
    grids = [(t, h // merge_size, w // merge_size) for t, h, w in image_grid_thw.tolist()]
    return features.split([t * h * w for t, h, w in grids]), grids


def first_image_tokens(input_ids: torch.LongTensor, image_token_id: int, counts: list[int]) -> torch.LongTensor:
    """Flat index (into input_ids.reshape(-1)) of each image's first placeholder, for images of `counts`
    placeholders in order (the router's and RGLF's way to find an image's sample). Raises when the placeholders
    do not add up."""
    where = (input_ids.reshape(-1) == image_token_id).nonzero().squeeze(-1)  # (num image tokens,)
    if where.shape[0] != sum(counts):
        raise ValueError(f"found {where.shape[0]} image tokens in the input but the images need {sum(counts)}")
    starts = torch.tensor([0] + counts[:-1], dtype=torch.long).cumsum(0).to(where.device)
    return where[starts]


class NativeVLPositionsMixin:
    """Position ids of `NativeVLModel` (needs `config`, `resolve_granularity` and a `rope_deltas` attribute): the
    one public M-RoPE entry `get_rope_index` (transformers' Qwen2-VL contract, over the pure `rope_index`), the
    ids `forward` computes when none are given, and the checks on ids a caller gives (packed rows included)."""

    def get_rope_index(
        self,
        input_ids: torch.LongTensor,
        mm_token_type_ids: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """transformers' `Qwen2VLModel.get_rope_index` contract: position ids (3, batch, seq) long (0 on padding)
        and rope_deltas (batch, 1). `mm_token_type_ids` (batch, seq), 0 text / 1 image / 2 video, may be omitted
        (placeholders are then found by token id, and only when grids of their kind are given). Extra keywords:
        `image_granularity` (num_images,) levels and `image_num_grids` (num_images,) grids per image. Under
        `position_scheme="1d"` the three rows are the plain positions the model uses and the deltas are 0.
        Computed on the host from the placeholders (`placeholder_kinds`, then the pure `rope_index`)."""
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if self.config.position_scheme == "1d":
            batch, seq_len = input_ids.shape
            positions = text_positions(batch, seq_len, 0, mask, input_ids.device)
            if mask is not None:
                positions = positions.masked_fill(~mask.bool(), 0)
            zeros = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)
            return positions.unsqueeze(0).expand(3, -1, -1).clone(), zeros
        num_grids = kwargs.get("image_num_grids")
        levels = self.resolve_granularity(kwargs.get("image_granularity"), image_grid_thw, num_grids)
        has_images = image_grid_thw is not None and image_grid_thw.numel() > 0
        has_videos = video_grid_thw is not None and video_grid_thw.numel() > 0
        config = self.config
        kinds = placeholder_kinds(
            input_ids, config.image_token_id, config.video_token_id, has_images, has_videos, mm_token_type_ids
        )
        per_grid = grid_levels(levels, num_grids, image_grid_thw.shape[0]) if has_images else None
        return rope_index(
            kinds, config.vision_config.spatial_merge_size, image_grid_thw, video_grid_thw, mask, per_grid
        )

    def _compute_position_ids(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        image_grid_thw: torch.LongTensor | None,
        video_grid_thw: torch.LongTensor | None,
        image_granularity: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        image_num_grids: torch.LongTensor | None = None,
    ) -> torch.LongTensor:
        """Position ids when the caller gave none: (batch, seq) for the 1-D scheme, (3, batch, seq) for M-RoPE
        (image_granularity, image_num_grids: (num_images,) levels and grids per image).

        M-RoPE at prefill (empty cache) is computed from the placeholder tokens and sets `rope_deltas` (0 for a
        prompt given as embeddings: it has no placeholders to read); during cached decoding the new tokens are
        text, placed at their plain position + `rope_deltas`.
        """
        batch, seq_len = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        mask_2d = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        if self.config.position_scheme == "1d":
            return text_positions(batch, seq_len, past_length, mask_2d, inputs_embeds.device)
        if past_length == 0 and input_ids is not None:
            position_ids, self.rope_deltas = self.get_rope_index(
                input_ids,
                mm_token_type_ids,
                image_grid_thw,
                video_grid_thw,
                mask_2d,
                image_granularity=image_granularity,
                image_num_grids=image_num_grids,
            )
            return position_ids
        positions = text_positions(batch, seq_len, past_length, mask_2d, inputs_embeds.device)
        if past_length == 0:
            self.rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=positions.device)
        elif self.rope_deltas is not None:
            deltas = self.rope_deltas.to(positions.device)
            positions = positions + deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
        return positions.unsqueeze(0).expand(3, -1, -1)

    def _given_position_ids(
        self,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        has_vision: bool,
    ) -> tuple[torch.LongTensor, bool]:
        """Checks and prepares caller-given position ids: the processor's batch-first (batch, seq, 3) layout is
        moved to (3, batch, seq); ids that do not fit `config.position_scheme` raise (naming both); packed rows
        are made safe (`_packed_position_ids`); at prefill `rope_deltas` is derived from these ids. Returns the ids
        and whether the rows are packed (then the KV cache must stay off)."""
        batch, seq_len = inputs_embeds.shape[:2]
        position_ids = channels_first_position_ids(position_ids, batch, seq_len)
        scheme = self.config.position_scheme
        if scheme == "1d" and position_ids.dim() == 3 and not bool((position_ids[-3:] == position_ids[-1:]).all()):
            raise ValueError(
                f"position_ids carry distinct M-RoPE rows {tuple(position_ids.shape)} but this model's "
                "config.position_scheme is '1d' (plain positions): use a processor with position_scheme='1d'"
            )
        packed = False
        if attention_mask is None and cache is None:
            position_ids, packed = self._packed_position_ids(position_ids, has_vision)
        if scheme == "mrope" and position_ids.dim() == 2 and has_vision:
            raise ValueError(
                f"position_ids are plain {tuple(position_ids.shape)} but this model's config.position_scheme is "
                "'mrope' and the inputs hold images or videos: pass the processor's M-RoPE ids (a processor with "
                "position_scheme='mrope') or none, so the model computes them"
            )
        if scheme == "mrope" and (cache is None or cache.get_seq_length() == 0):
            rows = position_ids if position_ids.dim() == 3 else position_ids.unsqueeze(0).expand(3, -1, -1)
            self.rope_deltas = rope_deltas_from_positions(rows, attention_mask)
        return position_ids, packed

    def _packed_position_ids(self, position_ids, has_vision: bool) -> tuple[torch.Tensor, bool]:
        """Position ids of a batch without attention mask, made safe for packed rows (several samples per row).

        Packing shows as plain positions restarting inside a row. transformers builds the per-sample mask from the
        plain row of (4, batch, seq) ids only: (batch, seq) ids are expanded to that form (exact for the 1-D scheme
        and for text under M-RoPE); (3, batch, seq) ids lack the plain row and (batch, seq) ids lack the M-RoPE rows
        of images, so both raise rather than let samples attend to each other. Returns the ids and whether packed.
        """
        plain = position_ids if position_ids.dim() == 2 else position_ids[0]
        if position_ids.dim() == 3 and position_ids.shape[0] == 3:
            plain = None  # (3, batch, seq): no plain row; the temporal row only falls where a new sample starts
            restarts = (position_ids[0, :, 1:] < position_ids[0, :, :-1]).any()
        else:
            restarts = (plain[:, 1:] - plain[:, :-1] != 1).any()
        if not restarts:
            return position_ids, False
        if plain is None:
            raise ValueError(
                "position_ids (3, batch, seq) restart inside a row but carry no plain row: pass packed rows as "
                "(4, batch, seq) ids, plain per-sample positions first (as PackingCollator does)"
            )
        if position_ids.dim() == 2:
            if self.config.position_scheme == "mrope" and has_vision:
                raise ValueError(
                    "packed rows with images under M-RoPE need (4, batch, seq) position ids (plain row, then "
                    "temporal/height/width); (batch, seq) ids would drop the images' 2-D positions"
                )
            position_ids = position_ids.unsqueeze(0).expand(4, -1, -1)
        return position_ids, True


__all__ = [
    "NativeVLPositionsMixin",
    "batch_mrope_positions",
    "channels_first_position_ids",
    "first_image_tokens",
    "grid_levels",
    "grid_token_counts",
    "image_token_counts",
    "level_grid",
    "placeholder_kinds",
    "pooled_grid_thw",
    "pooled_grids",
    "repeat_per_grid",
    "rope_deltas_from_positions",
    "rope_index",
    "split_by_image",
    "sum_per_image",
    "text_positions",
    "tokens_per_image",
]
