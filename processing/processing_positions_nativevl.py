"""GENERATED from modeling/positions_nativevl.py by `python -m nativevl.modeling.sync_copies`: do not edit.

The functions of modeling/positions_nativevl.py this folder imports (`__all__`) and those they call, their source
unchanged: remote-code folders cannot import each other. Edit the source and rerun the command;
tests/test_processing_nativevl.py fails when this file is stale.
"""

from collections.abc import Sequence

import numpy as np
import torch


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


__all__ = [
    "batch_mrope_positions",
    "grid_token_counts",
    "level_grid",
    "placeholder_kinds",
    "repeat_per_grid",
]
