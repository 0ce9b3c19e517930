"""Adaptive visual granularity (AVG-LLaVA, arXiv 2410.02745): the pooling pyramid, the router and its inputs,
and placeholder compaction for a routed prompt.

- Granularity scaler (`pool_grid`): average pooling of one image's projected tokens, alternating 1x2 (width) and
  2x1 (height) steps, each halving the tokens; the released code pools 24x24 crops only, here odd sides pool in
  ceil mode (`positions_nativevl.level_grid` gives the pooled grid).
- Granularity router (`NativeVLGranularityRouter`, inputs from `router_inputs`): one decision per image from the
  tokens of all its levels and the instruction tokens most similar to it (one Transformer layer over the tokens of
  one image, not across crops as the release's missing batch_first did).
- Prompt compaction (`drop_surplus_placeholders`, `compact_image_placeholders`, `next_kept_labels`): a prompt
  expanded for one level, shortened or masked to fit the routed levels.
- Confidence fallback (nativevl's addition; `answer_confidence`, `image_rows`): a sample whose answer at its
  routed level has a token the model gave less than a threshold probability is answered again on the full grid.

This file is remote code: it imports only torch and single-dot siblings.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configuration_nativevl import IGNORE_INDEX, NativeVLConfig
from .positions_nativevl import (
    first_image_tokens,
    grid_levels,
    image_token_counts,
    split_by_image,
    sum_per_image,
    tokens_per_image,
)
from .vision_nativevl import NativeVLVisionModelOutput


def _pair_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Averages neighbouring pairs along `dim` (size n -> ceil(n / 2)); an odd last element is its own average."""
    n = x.shape[dim]
    if n == 1:
        return x
    if n % 2:
        x = torch.cat([x, x.narrow(dim, n - 1, 1)], dim=dim)  # (a + a) / 2 == a: the partial window averages a
    shape = x.shape[:dim] + (x.shape[dim] // 2, 2) + x.shape[dim + 1 :]
    return x.reshape(shape).mean(dim + 1)  # (..., n/2, 2, ...) -> (..., n/2, ...)


def pool_grid(
    features: torch.Tensor, grid: tuple[int, int, int], level: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Granularity scaler: average-pools one image's projected tokens to `level`.

    features: (t*h*w, D), raster order of the merged (h, w) grid per temporal slice; grid: (t, h, w) merged.
    Returns (t*h'*w', D) in the same order and (t, h', w') == `level_grid(t, h, w, level)`. Level 0 returns the
    input unchanged. Released AVG-LLaVA pools 24x24 crops only; here odd sides pool in ceil mode.
    """
    t, h, w = grid
    x = features.view(t, h, w, features.shape[-1])  # (t, h, w, D)
    for step in range(level):
        x = _pair_mean(x, dim=2 if step % 2 == 0 else 1)  # 1x2 over width, then 2x1 over height
    t, h, w = x.shape[:3]
    return x.reshape(t * h * w, x.shape[-1]), (t, h, w)  # (t*h'*w', D)


class NativeVLGranularityRouter(nn.Module):
    """AVG-LLaVA's granularity router, one decision per image.

    Input per image: the tokens of every level (level 0 first) and up to `top_k` instruction tokens. One
    `nn.TransformerEncoderLayer(batch_first=True)` attends across the tokens of one image (the released code
    attends across crops: batch_first was missing), Linear-GELU-Linear gives every token one logit per level, a
    learned voter weight aggregates the tokens, LayerNorm over the L aggregated logits; softmax gives probabilities.

    Voter: token counts vary with the image size, so the voter weights belong to token *slots* rather than absolute
    positions: one learned logit per level (shared by that level's visual tokens) and one per instruction rank (the
    i-th most image-similar instruction token). A token's weight is the softmax of its slot logit over all tokens
    of the image; zeros at init, so the vote starts as a plain mean.
    """

    def __init__(self, config: NativeVLConfig) -> None:
        super().__init__()
        width = config.text_config.hidden_size
        self.num_levels, self.top_k = config.granularity, config.router_top_k
        self.layer = nn.TransformerEncoderLayer(
            width,
            config.router_num_heads,
            config.router_intermediate_size,
            dropout=config.router_dropout,
            activation="gelu",
            batch_first=True,
        )
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, self.num_levels))
        self.voter = nn.Parameter(torch.zeros(self.num_levels + self.top_k))
        self.norm = nn.LayerNorm(self.num_levels)

    def forward(self, tokens: torch.Tensor, slots: torch.LongTensor, padding: torch.Tensor) -> torch.Tensor:
        """tokens: (images, N, D); slots: (images, N) long, level l -> l, instruction rank r -> L + r;
        padding: (images, N) bool, True where there is no token. Returns logits (images, L)."""
        hidden = self.layer(tokens, src_key_padding_mask=padding)  # (images, N, D)
        per_token = self.head(hidden)  # (images, N, L)
        weights = self.voter[slots].masked_fill(padding, float("-inf")).softmax(-1)  # (images, N)
        votes = (weights.unsqueeze(-1) * per_token.float()).sum(1)  # (images, L)
        return self.norm(votes.to(self.norm.weight.dtype))  # (images, L)


def router_inputs(
    parts: tuple[torch.Tensor, ...],
    grids: list[tuple[int, int, int]],
    texts: list[torch.Tensor],
    num_levels: int,
    top_k: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
    """The router's padded batch, one row per image: its tokens at every level (level 0 first) and the `top_k`
    tokens of its instruction `texts[i]` (m_i, D) most cosine-similar to its mean level-0 token.

    parts: one (t*h*w, D) level-0 tensor per image; grids: merged (t, h, w) per image. Returns tokens
    (images, N, D) in `dtype`, slots (images, N) long (level l -> l, instruction rank r -> L + r) and padding
    (images, N) bool (True where there is no token)."""
    tokens, slots = [], []
    for feats, grid, text in zip(parts, grids, texts, strict=True):
        levels = [pool_grid(feats, grid, level)[0] for level in range(num_levels)]
        slot = [torch.full((x.shape[0],), level, dtype=torch.long) for level, x in enumerate(levels)]
        if text.shape[0] and top_k:
            similarity = F.cosine_similarity(text.float(), feats.float().mean(0, keepdim=True), dim=-1)  # (m,)
            top = similarity.topk(min(top_k, text.shape[0])).indices  # most similar first
            levels.append(text[top].to(feats.dtype))
            slot.append(num_levels + torch.arange(top.shape[0]))
        tokens.append(torch.cat(levels))  # (N_i, D)
        slots.append(torch.cat(slot))  # (N_i,)
    longest = max(x.shape[0] for x in tokens)
    device = tokens[0].device
    batch_tokens = torch.zeros(len(tokens), longest, tokens[0].shape[-1], dtype=dtype, device=device)
    batch_slots = torch.zeros(len(tokens), longest, dtype=torch.long, device=device)
    padding = torch.ones(len(tokens), longest, dtype=torch.bool, device=device)
    for i, (x, slot) in enumerate(zip(tokens, slots, strict=True)):
        batch_tokens[i, : x.shape[0]], batch_slots[i, : x.shape[0]], padding[i, : x.shape[0]] = x, slot, False
    return batch_tokens, batch_slots, padding


def drop_surplus_placeholders(
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.LongTensor,
    from_levels: torch.LongTensor | None,
    to_levels: torch.LongTensor,
    image_token_id: int,
    merge_size: int,
) -> torch.Tensor:
    """The attention mask (batch, seq) long of a prompt expanded for `from_levels` with each image's surplus
    placeholders zeroed so it fits `to_levels`: each image keeps the first n(to_level) tokens of its run (the
    placeholders are identical tokens). `attention_mask` None: no padding."""
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    before = image_token_counts(image_grid_thw, from_levels, merge_size)
    after = image_token_counts(image_grid_thw, to_levels, merge_size)
    where = ((input_ids == image_token_id) & mask).nonzero()  # (n, 2) in row-major = placeholder order
    if len(where) != sum(before):
        raise ValueError(f"found {len(where)} image tokens in the prompt but the images need {sum(before)}")
    keep, start = mask.clone(), 0
    for n_before, n_after in zip(before, after, strict=True):
        if n_after > n_before:
            raise ValueError(f"cannot grow an image from {n_before} to {n_after} placeholder tokens")
        drop = where[start + n_after : start + n_before]
        keep[drop[:, 0], drop[:, 1]] = False
        start += n_before
    return keep.long()


def compact_image_placeholders(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, kept: torch.Tensor, pad_token_id: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Removes the tokens `kept` (batch, seq) marks 0 (the surplus placeholders `drop_surplus_placeholders`
    found) and re-pads: input_ids, attention_mask (batch, seq), left or right padded (the side is kept; unpadded
    counts as left). Returns the input_ids and attention_mask (batch, seq'), seq' <= seq."""
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    right = bool((~mask[:, -1]).any()) and not bool((~mask[:, 0]).any())
    keep = kept.bool()
    rows = [input_ids[b][keep[b]] for b in range(input_ids.shape[0])]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros((len(rows), width), dtype=torch.long, device=input_ids.device)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if right else slice(width - len(row), width)
        ids[b, span], new_mask[b, span] = row, 1
    return ids, new_mask


def next_kept_labels(labels: torch.LongTensor, kept: torch.Tensor) -> torch.LongTensor:
    """Shifted labels (batch, seq) for a sequence with holes: position p gets the label of the next position q > p
    with `kept[q]`; holes and the last kept position get -100. kept: (batch, seq), nonzero where attended."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    for b in range(labels.shape[0]):
        where = kept[b].nonzero().squeeze(-1)
        shifted[b, where[:-1]] = labels[b, where[1:]]
    return shifted


def answer_confidence(
    logits: tuple[torch.Tensor, ...], tokens: torch.LongTensor, end_token_ids: list[int]
) -> torch.Tensor:
    """Per row, the lowest probability the model gave a token it generated, up to and including its first end
    token (later steps are padding). logits: one (batch, V) tensor per step (`generate(output_logits=True)`, before
    any logits processor); tokens: (batch, steps) the generated tokens. Returns (batch,) float32 in [0, 1]; a row
    without generated tokens gets 1.0."""
    chosen = torch.ones(tokens.shape, dtype=torch.float32, device=tokens.device)  # (batch, steps)
    for step, step_logits in enumerate(logits):
        log_probs = step_logits.float().log_softmax(-1)  # (batch, V)
        chosen[:, step] = log_probs.gather(-1, tokens[:, step : step + 1].to(log_probs.device)).squeeze(-1).exp()
    is_end = torch.isin(tokens, torch.tensor(end_token_ids, dtype=tokens.dtype, device=tokens.device))
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0  # (batch, steps): past the first end token
    return chosen.masked_fill(after_end, 1.0).amin(-1) if tokens.shape[1] else chosen.new_ones(tokens.shape[0])


def image_rows(
    input_ids: torch.LongTensor,
    image_grid_thw: torch.LongTensor,
    image_granularity: torch.LongTensor | None,
    image_num_grids: torch.LongTensor | None,
    image_token_id: int,
    merge_size: int,
) -> torch.LongTensor:
    """The row of `input_ids` (batch, seq) holding each image, (num_images,) long, for a prompt whose placeholders
    are expanded for `image_granularity` (num_images,) (None: level 0); image_num_grids (num_images,): grids per
    image, None: one."""
    counts = tokens_per_image(image_grid_thw, image_granularity, image_num_grids, merge_size).tolist()
    return first_image_tokens(input_ids, image_token_id, counts) // input_ids.shape[1]


class NativeVLRoutingMixin:
    """AVG routing of `NativeVLModel` (needs `config`, `granularity_router`, `get_input_embeddings`, `_encode` and
    `pool_image_outputs`): per-image levels from user input (`resolve_granularity`), the router's logits and choice
    (`router_logits`, `choose_granularity`, `route_images`), `forward(granularity="auto")`'s routing (`_route`) and
    the placeholders a routed prompt drops (`surplus_placeholder_mask`)."""

    def resolve_granularity(
        self,
        granularity,
        image_grid_thw: torch.LongTensor | None,
        image_num_grids: torch.LongTensor | None = None,
    ) -> torch.LongTensor | None:
        """Per-image levels (num_images,) long from None (None: full grids), an int (every image) or a sequence /
        tensor (one level per image). The images are the entries of `image_num_grids` (num_images,) (grids per
        image, as the processor returns it: crop mode makes one image several grids), or without it the rows of
        `image_grid_thw`. Raises on a count that does not match or levels outside 0..L-1 (when the config sets L)."""
        if granularity is None or image_grid_thw is None:
            return None
        if isinstance(granularity, str):
            raise ValueError(
                f"granularity must be None, 'auto', an int level or per-image levels, got {granularity!r}"
            )
        n_grids = image_grid_thw.shape[0]
        n = n_grids if image_num_grids is None else image_num_grids.shape[0]
        if isinstance(granularity, int):
            levels = torch.full((n,), granularity, dtype=torch.long)
        else:
            levels = torch.as_tensor(granularity, dtype=torch.long).flatten().cpu()
        if levels.shape[0] != n:
            grids = "" if image_num_grids is None else f" (image_num_grids {image_num_grids.tolist()})"
            raise ValueError(
                f"granularity gives {levels.shape[0]} level(s) but there are {n} image(s) in {n_grids} grid(s)"
                f"{grids}: give one level per image"
            )
        top = self.config.granularity
        if levels.numel() and (int(levels.min()) < 0 or (top is not None and int(levels.max()) >= top)):
            raise ValueError(f"granularity levels {levels.tolist()} must lie in 0..{(top or 1) - 1 if top else 'inf'}")
        return levels.to(image_grid_thw.device)

    def router_logits(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        image_granularity: torch.LongTensor | None = None,
        image_num_grids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """The router's logits (num_images, L), one row per image.

        input_ids: (batch, seq) holding the images' placeholders at the levels `image_granularity` (num_images,)
        (None: level 0); image_features: (sum t*h*w/4, D) level-0 tokens of all grids; image_num_grids
        (num_images,): grids per image (None: one). Each grid sees its own levels' tokens plus the `top_k` text
        tokens of its own sample (the row, or the `cu_seq_lens_q` segment of a packed row) most cosine-similar to
        its mean token; an image of several grids (crop mode) averages its grids' logits. Text tokens exclude
        vision tokens, padding (attention_mask 0) and, with `instruction_mask` (batch, seq), every token it marks
        0: the router reads the instruction only (a prompt is all instruction; in a training row the answer tokens,
        `labels != -100`, are not).
        """
        if self.granularity_router is None:
            raise ValueError("this model has no granularity router: set config.granularity to a number of levels")
        router, cfg = self.granularity_router, self.config
        merge = cfg.vision_config.spatial_merge_size
        flat_ids = input_ids.reshape(-1)  # (batch*seq,)
        seq = input_ids.shape[1]
        index = torch.arange(flat_ids.shape[0], device=flat_ids.device)
        if cu_seq_lens_q is not None:
            segment = torch.searchsorted(cu_seq_lens_q.to(index.device, torch.long), index, right=True) - 1
        else:
            segment = index // seq  # (batch*seq,)
        vision_ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
        is_text = ~torch.isin(flat_ids, torch.tensor(vision_ids, device=flat_ids.device))
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            is_text &= attention_mask.reshape(-1).bool()
        if instruction_mask is not None:
            is_text &= instruction_mask.reshape(-1).to(is_text.device).bool()
        embeds = self.get_input_embeddings()(flat_ids)  # (batch*seq, D)
        levels = grid_levels(image_granularity, image_num_grids, image_grid_thw.shape[0])
        counts = image_token_counts(image_grid_thw, levels, merge)
        firsts = first_image_tokens(input_ids, cfg.image_token_id, counts).tolist()
        texts = [embeds[is_text & (segment == segment[first])] for first in firsts]  # each image's own instruction
        parts, grids = split_by_image(image_features, image_grid_thw, merge)
        batch_tokens, batch_slots, padding = router_inputs(
            parts, grids, texts, router.num_levels, router.top_k, router.head[0].weight.dtype
        )
        logits = router(batch_tokens, batch_slots, padding)  # (num_grids, L)
        if image_num_grids is None:
            return logits
        return sum_per_image(logits, image_num_grids) / image_num_grids.to(logits.device).unsqueeze(-1)  # (images, L)

    def choose_granularity(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        image_granularity: torch.LongTensor | None = None,
        image_num_grids: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor]:
        """`granularity="auto"`: runs the vision tower and the router (arguments as `router_logits`). Returns the
        argmax levels (num_images,) long, the router logits (num_images, L) and the level-0 image features
        (sum t*h*w/4, D)."""
        features = self._encode(pixel_values, image_grid_thw).pooler_output
        logits = self.router_logits(
            input_ids,
            features,
            image_grid_thw,
            attention_mask,
            instruction_mask,
            cu_seq_lens_q,
            image_granularity,
            image_num_grids,
        )
        return logits.argmax(-1), logits, features

    def _route(
        self,
        input_ids,
        attention_mask,
        position_ids,
        pixel_values,
        image_grid_thw,
        image_granularity,
        image_num_grids,
        instruction_mask,
        cu_seq_lens_q,
        capture,
    ) -> tuple[torch.LongTensor, torch.LongTensor, NativeVLVisionModelOutput]:
        """`forward(granularity="auto")`: input_ids with the surplus placeholders replaced by padding (so only
        the kept ones are filled and positioned), the attention mask with them zeroed (batch, seq), and the image
        outputs pooled to the router's levels (with gradient to the features when enabled; the router itself runs
        without)."""
        if input_ids is None:
            raise ValueError("granularity='auto' needs input_ids: the router reads the instruction tokens")
        if self.granularity_router is None:
            raise ValueError("granularity='auto' needs a granularity router: this model's config.granularity is None")
        if attention_mask is None and (cu_seq_lens_q is not None or position_ids is not None):
            raise ValueError(
                "granularity='auto' takes padded or single rows (attention_mask or no position_ids); for packed rows "
                "call choose_granularity(..., cu_seq_lens_q=...) and pack the samples at the levels it returns"
            )
        image_out = self._encode(pixel_values, image_grid_thw, **capture)
        levels, mask = self.route_images(
            input_ids, image_out, image_grid_thw, attention_mask, instruction_mask, image_granularity, image_num_grids
        )
        pad, image_id = self.config.text_config.pad_token_id, self.config.image_token_id
        dropped = (input_ids == image_id) & ~mask.bool()
        input_ids = input_ids.masked_fill(dropped, pad if pad is not None and pad != image_id else 0)
        return input_ids, mask, self.pool_image_outputs(image_out, image_grid_thw, levels, image_num_grids)

    def route_images(
        self,
        input_ids: torch.LongTensor,
        image_outputs: NativeVLVisionModelOutput,
        image_grid_thw: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        image_granularity: torch.LongTensor | None = None,
        image_num_grids: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """The router's choice for a prompt expanded for `image_granularity` (None: level 0) and the level-0
        `image_outputs` of `_encode`: levels (num_images,) long (the router runs without gradient; arguments as
        `router_logits`) and the attention mask (batch, seq) with each image's surplus placeholders zeroed."""
        from_levels = self.resolve_granularity(image_granularity, image_grid_thw, image_num_grids)
        with torch.no_grad():
            levels = self.router_logits(
                input_ids,
                image_outputs.pooler_output,
                image_grid_thw,
                attention_mask,
                instruction_mask,
                image_granularity=from_levels,
                image_num_grids=image_num_grids,
            ).argmax(-1)
        kept = self.surplus_placeholder_mask(
            input_ids, attention_mask, image_grid_thw, from_levels, levels, image_num_grids
        )
        return levels, kept

    def surplus_placeholder_mask(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        image_grid_thw: torch.LongTensor,
        from_levels: torch.LongTensor | None,
        to_levels: torch.LongTensor,
        image_num_grids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """`drop_surplus_placeholders` for per-image levels: the attention mask (batch, seq) long of a prompt
        expanded for `from_levels` (num_images,) (None: level 0) with the placeholders each image does not need
        at `to_levels` (num_images,) zeroed (image_num_grids (num_images,): grids per image, None: one)."""
        n_grids = image_grid_thw.shape[0]
        return drop_surplus_placeholders(
            input_ids,
            attention_mask,
            image_grid_thw,
            grid_levels(from_levels, image_num_grids, n_grids),
            grid_levels(to_levels, image_num_grids, n_grids),
            self.config.image_token_id,
            self.config.vision_config.spatial_merge_size,
        )


__all__ = [
    "NativeVLRoutingMixin",
    "NativeVLGranularityRouter",
    "answer_confidence",
    "compact_image_placeholders",
    "drop_surplus_placeholders",
    "image_rows",
    "next_kept_labels",
    "pool_grid",
    "router_inputs",
]
