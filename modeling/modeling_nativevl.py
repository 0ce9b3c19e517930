"""nativevl's native-resolution vision-language model.

A NaViT-style ViT (patch 14, 2D RoPE, no absolute position table) encodes every image at its own size; a 2x2
merger (and, for NativeRes-LLaVA, an MLP projector) turns the patch grid into LLM tokens; transformers' Qwen2-VL
text decoder places them with M-RoPE (temporal, height, width) or plain 1-D positions.

- Qwen2-VL, arXiv 2409.12191; mirrors transformers' `models/qwen2_vl/modeling_qwen2_vl.py` (same parameter names,
  so weights map one to one).
- NativeRes-LLaVA, arXiv 2506.12776: `projector_type="merger_mlp"`, `position_scheme="1d"`.

Written here: the packed vision tower (all images of a batch in one sequence, attention split at `cu_seqlens`),
the projector, the position ids for both schemes. Reused from transformers: the decoder (attention dispatch,
caches, gradient checkpointing), generation, loss.

This file is remote code: it is copied flat into a model folder and imports only torch, transformers and its
sibling `configuration_nativevl.py`.

transformers internals the remote-code files (modeling/ and processing/) rely on beyond its public classes
(tests/test_conformance.py imports each by name on every tested release):
- `models.qwen2_vl.modeling_qwen2_vl.Qwen2VLTextModel`, reused as the decoder; the name of its KV-cache argument
  (`cache` from 5.24, `past_key_values` before: `CACHE_NAME`), also the field of `BaseModelOutputWithPast`;
  `models.qwen2_vl.configuration_qwen2_vl.Qwen2VLTextConfig` / `Qwen2VLVisionConfig`, subclassed.
- `utils.output_capturing.capture_outputs` with `_can_record_outputs` (vision hidden states and attentions),
  `utils.can_return_tuple`, `utils.TransformersKwargs`, `processing_utils.Unpack`,
  `modeling_layers.GradientCheckpointingLayer`, `initialization`, `activations.ACT2FN`.
- `GenerationMixin._prepare_position_ids_for_generation` (overridden for M-RoPE),
  `GenerationMixin._expand_inputs_for_generation` (overridden in `generation_nativevl.py`: per-image inputs expand by
  sample for beams and `num_return_sequences`) and `generate`'s `mm_encoder_outputs` (the vision tower runs once
  before the prefill, through `get_image_features`).
- `PreTrainedModel._can_set_attn_implementation` (overridden), `AttentionInterface` /
  `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS` / `sdpa_mask` / `integrations.sdpa_attention.sdpa_attention_forward`
  (the `nativevl_varlen` attention), `modeling_utils.slice_logits_to_keep`.
- processing: `processing_utils.ProcessorMixin`, `TextKwargs`, `ImagesKwargs`,
  `image_processing_utils.BaseImageProcessor`.
"""

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .attention_nativevl import NativeVLAttentionSupport, register_attention
from .configuration_nativevl import IGNORE_INDEX, NativeVLConfig, NativeVLTextConfig
from .generation_nativevl import NativeVLGenerationMixin
from .granularity_nativevl import (
    NativeVLGranularityRouter,
    answer_confidence,
    compact_image_placeholders,
    drop_surplus_placeholders,
    image_rows,
    next_kept_labels,
    pool_grid,
    router_inputs,
)
from .positions_nativevl import (
    channels_first_position_ids,
    first_image_tokens,
    grid_levels,
    image_token_counts,
    placeholder_kinds,
    rope_deltas_from_positions,
    rope_index,
    split_by_image,
    sum_per_image,
    text_positions,
    tokens_per_image,
)
from .vision_nativevl import NativeVLVisionModel, NativeVLVisionModelOutput, check_grids


# generation settings a fallback cannot honour (one answer per sample, no per-step outputs)
FALLBACK_REFUSED = (
    "num_beams",
    "num_return_sequences",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
)

# The name of the KV cache in forward arguments and model outputs: `cache` from transformers 5.24 on,
# `past_key_values` before. Both names are accepted by the forwards here; outputs carry the release's own field.
CACHE_NAME = "cache" if "cache" in inspect.signature(Qwen2VLTextModel.forward).parameters else "past_key_values"


@dataclass
class NativeVLModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` (transformers' own, so the cache field is the release's) plus:
    `rope_deltas` (batch, 1): largest position + 1 minus sequence length; `image_granularity` (num_images,) long:
    the level each image was fed at; `visual_tokens` (num_images,) long: the LLM tokens each image used, its grids
    summed (crop mode: global view and tiles) (both None without images); `attention_mask` (batch, seq): the mask
    the LLM ran with when `granularity="auto"` zeroed surplus placeholders (None otherwise); `image_outputs` /
    `video_outputs`: the vision tower's outputs (`NativeVLVisionModelOutput`, with its hidden states and attentions
    when requested)."""

    rope_deltas: torch.LongTensor | None = None
    image_granularity: torch.LongTensor | None = None
    visual_tokens: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class NativeVLCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` (transformers' own) of `NativeVLForConditionalGeneration`: logits (batch, seq,
    vocab), optional loss, plus the fields `NativeVLModelOutputWithPast` adds."""

    rope_deltas: torch.LongTensor | None = None
    image_granularity: torch.LongTensor | None = None
    visual_tokens: torch.LongTensor | None = None
    attention_mask: torch.LongTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


# What `save_pretrained` writes into config.json's `auto_map` so the folder loads with `trust_remote_code=True`.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_nativevl.NativeVLConfig",
    "AutoModel": "modeling_nativevl.NativeVLModel",
    "AutoModelForImageTextToText": "modeling_nativevl.NativeVLForConditionalGeneration",
}


class NativeVLPreTrainedModel(NativeVLAttentionSupport, PreTrainedModel):
    config: NativeVLConfig
    config_class = NativeVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["NativeVLVisionBlock", "Qwen2VLDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Placeholders are counted, images split per grid and M-RoPE ids built on the host (data-dependent shapes), as
    # in transformers' Qwen2-VL the vision part is not traced; the decoder alone compiles (tested).
    _can_compile_fullgraph = False

    def __init__(self, config, *inputs, **kwargs) -> None:
        register_attention()  # `attn_implementation="nativevl_varlen"` must be known before transformers checks it
        super().__init__(config, *inputs, **kwargs)

    def _init_weights(self, module) -> None:
        super()._init_weights(module)
        if isinstance(module, NativeVLGranularityRouter):
            init.zeros_(module.voter)  # uniform vote at init

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` (safetensors); a model marked for export (`import nativevl` marks the
        classes) also lists every Auto class in `auto_map` and gets the remote-code files copied beside it."""
        if self._auto_class is not None and isinstance(self.config, NativeVLConfig):
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **REMOTE_CODE_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)


class NativeVLProjector(nn.Module):
    """NativeRes-LLaVA's `mlp2x_gelu`: Linear(merger width -> hidden) - GELU - Linear(hidden -> LLM width)."""

    def __init__(self, config: NativeVLConfig) -> None:
        super().__init__()
        hidden = config.projector_hidden_size or config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, config.text_config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class NativeVLTextModel(NativeVLAttentionSupport, Qwen2VLTextModel):
    """transformers' Qwen2-VL decoder, unchanged: (3, batch, seq) M-RoPE ids, or (4, batch, seq) with the text
    positions first for packed rows; 2-D ids are broadcast to the three sections (= plain 1-D RoPE)."""

    config: NativeVLTextConfig
    config_class = NativeVLTextConfig


def get_rope_index(
    input_ids: torch.LongTensor,
    config: NativeVLConfig,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    image_granularity: torch.LongTensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    image_num_grids: torch.LongTensor | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """M-RoPE position ids of a (possibly padded) batch, computed from the placeholder tokens alone.

    input_ids: (batch, seq). image_grid_thw / video_grid_thw: (num_grids, 3) in the order the placeholders appear,
    sample after sample. attention_mask: (batch, seq), 0 on padding (left or right). image_granularity:
    (num_images,) long levels (each grid of an image of level l is placed as its pooled grid); None: level 0
    everywhere. image_num_grids: (num_images,) grids per image (crop mode); None: one grid per image.
    mm_token_type_ids: (batch, seq), 0 text / 1 image / 2 video; None: found by token id (`placeholder_kinds`).
    Returns position_ids (3, batch, seq) long (0 on padding, as in transformers' Qwen2-VL) and rope_deltas
    (batch, 1): largest id + 1 - length, so the token at cache position p of sample b decodes at p + deltas[b].
    """
    has_images = image_grid_thw is not None and image_grid_thw.numel() > 0
    has_videos = video_grid_thw is not None and video_grid_thw.numel() > 0
    kinds = placeholder_kinds(
        input_ids, config.image_token_id, config.video_token_id, has_images, has_videos, mm_token_type_ids
    )
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    levels = grid_levels(image_granularity, image_num_grids, image_grid_thw.shape[0]) if has_images else None
    return rope_index(kinds, config.vision_config.spatial_merge_size, image_grid_thw, video_grid_thw, mask, levels)


# ----------------------------------------------------------------------------------------------------------------
# Full model
# ----------------------------------------------------------------------------------------------------------------


class NativeVLModel(NativeVLPreTrainedModel):
    """Vision tower + projector + decoder, without the LM head."""

    _checkpoint_conversion_mapping = {}
    # The loss is computed per token by the head; gradient accumulation normalises with num_items_in_batch.
    accepts_loss_kwargs = False

    def __init__(self, config: NativeVLConfig) -> None:
        super().__init__(config)
        self.visual = NativeVLVisionModel._from_config(config.vision_config)
        self.multi_modal_projector = NativeVLProjector(config) if config.projector_type == "merger_mlp" else None
        self.language_model = NativeVLTextModel._from_config(config.text_config)
        self.granularity_router = NativeVLGranularityRouter(config) if config.granularity is not None else None
        # (batch, 1): set at every prefill from the position ids it ran with, used to place decoded tokens
        self.rope_deltas = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _encode(
        self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, grid_name: str = "image_grid_thw", **kwargs
    ) -> NativeVLVisionModelOutput:
        """Vision tower + projector: `pooler_output` (sum t*h*w/4, LLM width), level 0, all grids concatenated.
        Bad grids raise here, naming the caller's argument (`grid_name`)."""
        check_grids(pixel_values, grid_thw, self.config.vision_config.spatial_merge_size, grid_name)
        capture = {k: v for k, v in kwargs.items() if k in ("output_hidden_states", "output_attentions")}
        outputs = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw, **capture)
        if self.multi_modal_projector is not None:
            outputs.pooler_output = self.multi_modal_projector(outputs.pooler_output)
        return outputs

    def pool_image_outputs(
        self,
        outputs: NativeVLVisionModelOutput,
        image_grid_thw: torch.LongTensor,
        levels: torch.LongTensor | None,
        image_num_grids: torch.LongTensor | None = None,
    ) -> NativeVLVisionModelOutput:
        """Splits `outputs.pooler_output` (sum t*h*w/4, D), level-0 tokens of all grids, into one tensor per grid,
        each average-pooled to its image's level (`pool_grid`; levels (num_images,), image_num_grids
        (num_images,) grids per image, None: one); records both in `image_granularity` / `image_num_grids`."""
        features = outputs.pooler_output
        if not isinstance(features, torch.Tensor):
            features = torch.cat(features)
        merge = self.config.vision_config.spatial_merge_size
        parts, grids = split_by_image(features, image_grid_thw, merge)
        per_grid = grid_levels(levels, image_num_grids, len(grids))
        if per_grid is not None and bool((per_grid != 0).any()):
            parts = [pool_grid(p, g, int(lv))[0] for p, g, lv in zip(parts, grids, per_grid.tolist(), strict=True)]
        outputs.pooler_output = tuple(parts)
        outputs.image_granularity, outputs.image_num_grids = levels, image_num_grids
        return outputs

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        image_granularity: torch.LongTensor | int | None = None,
        image_num_grids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLVisionModelOutput:
        """Qwen2-VL's contract: pixel_values (num_patches, 1176), image_grid_thw (num_grids, 3). Returns the vision
        tower's output with `pooler_output` a tuple of one (tokens_i, LLM width) tensor per grid, pooled to its
        image's level when `image_granularity` is given (None: level 0; an int or one level per image; the grids
        of each image from `image_num_grids` (num_images,), None: one grid per image); `hidden_states` /
        `attentions` of the tower with `output_hidden_states` / `output_attentions`."""
        levels = self.resolve_granularity(image_granularity, image_grid_thw, image_num_grids)
        outputs = self._encode(pixel_values, image_grid_thw, **kwargs)
        return self.pool_image_outputs(outputs, image_grid_thw, levels, image_num_grids)

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLVisionModelOutput:
        """As `get_image_features` for videos (never pooled): `pooler_output` one tensor per video."""
        outputs = self._encode(pixel_values_videos, video_grid_thw, "video_grid_thw", **kwargs)
        return self.pool_image_outputs(outputs, video_grid_thw, None)

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
        `position_scheme="1d"` the three rows are the plain positions the model uses and the deltas are 0."""
        if self.config.position_scheme == "1d":
            batch, seq_len = input_ids.shape
            mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
            positions = text_positions(batch, seq_len, 0, mask, input_ids.device)
            if mask is not None:
                positions = positions.masked_fill(~mask.bool(), 0)
            zeros = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)
            return positions.unsqueeze(0).expand(3, -1, -1).clone(), zeros
        num_grids = kwargs.get("image_num_grids")
        levels = self.resolve_granularity(kwargs.get("image_granularity"), image_grid_thw, num_grids)
        return get_rope_index(
            input_ids,
            self.config,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            levels,
            mm_token_type_ids,
            num_grids,
        )

    def _scatter(self, inputs_embeds, input_ids, token_id, features, name) -> torch.Tensor:
        """Writes `features` (n, D) into the `token_id` positions of inputs_embeds (batch, seq, D), in order."""
        if input_ids is not None:
            mask = input_ids == token_id
        else:
            token_embed = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == token_embed).all(-1)
        n_tokens = int(mask.sum())
        if n_tokens != features.shape[0]:
            raise ValueError(
                f"{name.capitalize()} features and {name} tokens do not match, tokens: {n_tokens}, features: "
                f"{features.shape[0]}: found {n_tokens} {name} tokens in the input but the {name}s give "
                f"{features.shape[0]} features; "
                f"each {name} of grid (t, h, w) needs t*h*w/4 placeholder tokens (at granularity level l > 0, the "
                f"count of its pooled grid level_grid(t, h/2, w/2, l))"
            )
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

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

    def compute_position_ids(
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
            position_ids, self.rope_deltas = get_rope_index(
                input_ids,
                self.config,
                image_grid_thw,
                video_grid_thw,
                mask_2d,
                image_granularity,
                mm_token_type_ids,
                image_num_grids,
            )
            return position_ids
        positions = text_positions(batch, seq_len, past_length, mask_2d, inputs_embeds.device)
        if past_length == 0:
            self.rope_deltas = torch.zeros(batch, 1, dtype=torch.long, device=positions.device)
        elif self.rope_deltas is not None:
            deltas = self.rope_deltas.to(positions.device)
            positions = positions + deltas.repeat_interleave(batch // deltas.shape[0], dim=0)
        return positions.unsqueeze(0).expand(3, -1, -1)

    def given_position_ids(
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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        rope_deltas: torch.LongTensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        granularity: str | int | torch.LongTensor | None = None,
        image_granularity: torch.LongTensor | None = None,
        image_num_grids: torch.LongTensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLModelOutputWithPast:
        """input_ids: (batch, seq). pixel_values: (num_patches, 1176) for all images of the batch, image_grid_thw
        (num_grids, 3), image_num_grids (num_images,) the grids of each image (crop mode makes one image a global
        view plus tiles; None: one grid per image); videos likewise (zero rows count as none).
        `mm_encoder_outputs`: {"image"|"video": output of `get_image_features` / `get_video_features`} in place of
        pixels (what `generate` passes). position_ids:
        (batch, seq), (3, batch, seq), the processor's (batch, seq, 3), or (4, batch, seq) with plain per-sample
        positions first (packed rows); computed from the placeholders when None. `mm_token_type_ids` (batch, seq):
        0 text / 1 image / 2 video; without it placeholders are found by token id. The KV cache is `cache` (5.24 on)
        or `past_key_values` (earlier releases).

        granularity: None (full grids), an int level for every image, or (num_images,) long levels, one per image;
        the tokens of each grid of an image are average-pooled to the image's level before they fill its
        placeholders, whose count must be the pooled count. `image_granularity` (num_images,) (as the processor and
        `PackingCollator` return it) is used when `granularity` is None, and says what the placeholders were
        expanded for when it is `"auto"`.

        `granularity="auto"` (padded or single rows; `input_ids` needed): the router picks each image's level from
        its level-0 tokens and its sample's instruction: the attended text tokens, only those `instruction_mask`
        (batch, seq) marks nonzero when given (`NativeVLForConditionalGeneration` passes `labels == -100`, so the
        answer tokens stay unseen, as at inference where the prompt holds no answer).
        The sequence keeps its length: each image's surplus placeholders are masked out of attention (zeros in
        the returned `attention_mask`) and position ids are recomputed over the kept tokens, so every kept
        position gets the logits of the prompt shortened to the chosen levels (what `generate` feeds). Given
        `position_ids` are ignored then (they describe the full grids). Packed rows take explicit levels."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape)
        if 0 in shape[:2]:
            raise ValueError(f"empty batch: the inputs have shape {shape}")
        if rope_deltas is not None:
            self.rope_deltas = rope_deltas
        capture = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
        pixel_values, image_grid_thw = drop_empty(pixel_values, image_grid_thw)
        image_num_grids = image_num_grids if image_grid_thw is not None else None  # zero rows: no images
        routed_mask = None
        if isinstance(granularity, str):
            if granularity != "auto":
                raise ValueError(
                    f"granularity must be None, 'auto', an int level or per-image levels, got {granularity!r}"
                )
            if pixel_values is not None:  # else nothing to route (text only, or a decoding step after the prefill)
                input_ids, routed_mask, routed = self._route(
                    input_ids, attention_mask, position_ids, pixel_values, image_grid_thw, image_granularity,
                    image_num_grids, instruction_mask, kwargs.get("cu_seq_lens_q"), capture,
                )  # fmt: skip
                attention_mask, position_ids, pixel_values = routed_mask, None, None
                mm_encoder_outputs = {**(mm_encoder_outputs or {}), "image": routed}
            granularity = None
        encoded = self.encode_vision(
            pixel_values, image_grid_thw, image_num_grids, pixel_values_videos, video_grid_thw, mm_encoder_outputs,
            granularity if granularity is not None else image_granularity, capture,
        )  # fmt: skip
        inputs_embeds = self.embed_with_vision(input_ids, inputs_embeds, encoded)
        levels = getattr(encoded.get("image"), "image_granularity", None)
        num_grids = getattr(encoded.get("image"), "image_num_grids", None)
        num_grids = num_grids if num_grids is not None else image_num_grids
        if position_ids is None:
            position_ids = self.compute_position_ids(
                input_ids, inputs_embeds, attention_mask, cache, image_grid_thw, video_grid_thw, levels,
                mm_token_type_ids, num_grids,
            )  # fmt: skip
        else:
            position_ids, packed = self.given_position_ids(
                position_ids, inputs_embeds, attention_mask, cache, bool(encoded)
            )
            use_cache = False if packed else use_cache  # a cache would skip the per-sample mask: samples would mix
        outputs = self.language_model(
            input_ids=None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return self._model_output(outputs, encoded, routed_mask, num_grids)

    def encode_vision(
        self,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.LongTensor | None,
        image_num_grids: torch.LongTensor | None,
        pixel_values_videos: torch.Tensor | None,
        video_grid_thw: torch.LongTensor | None,
        mm_encoder_outputs: dict | None,
        image_levels,
        capture: dict,
    ) -> dict[str, NativeVLVisionModelOutput]:
        """{"image"|"video": vision outputs} from pixel values (zero rows count as none; images pooled to
        `image_levels`, one per image of `image_num_grids`) or from pre-computed `mm_encoder_outputs`, never both
        for one modality."""
        pixel_values, image_grid_thw = drop_empty(pixel_values, image_grid_thw)
        pixel_values_videos, video_grid_thw = drop_empty(pixel_values_videos, video_grid_thw)
        encoded = {k: v for k, v in (mm_encoder_outputs or {}).items() if v is not None}
        for name, pixels in (("image", pixel_values), ("video", pixel_values_videos)):
            if pixels is not None and name in encoded:
                raise ValueError(f"give the {name}s as pixel values or as mm_encoder_outputs['{name}'], not both")
        if pixel_values is not None:
            encoded["image"] = self.get_image_features(
                pixel_values, image_grid_thw, image_levels, image_num_grids, **capture
            )
        if pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, video_grid_thw, **capture)
        return encoded

    def embed_with_vision(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None, encoded: dict
    ) -> torch.Tensor:
        """The LLM input embeddings (batch, seq, D) with each modality's features written into its placeholders."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        for name, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            if name in encoded:
                features = torch.cat(tuple(encoded[name].pooler_output))  # (sum of tokens, D)
                inputs_embeds = self._scatter(inputs_embeds, input_ids, token_id, features, name)
        return inputs_embeds

    def _model_output(
        self, outputs, encoded: dict, routed_mask: torch.Tensor | None, image_num_grids: torch.LongTensor | None
    ) -> NativeVLModelOutputWithPast:
        """The decoder's output plus the vision outputs, each image's level and visual token count (its grids
        summed: `image_num_grids` (num_images,), None: one grid per image)."""
        image_out = encoded.get("image")
        levels = visual_tokens = None
        if image_out is not None:
            counts = [part.shape[0] for part in image_out.pooler_output]  # per grid
            visual_tokens = torch.tensor(counts, dtype=torch.long, device=outputs.last_hidden_state.device)
            num_grids = None if image_num_grids is None else image_num_grids.to(visual_tokens.device)
            visual_tokens = sum_per_image(visual_tokens, num_grids)  # (num_images,)
            levels = getattr(image_out, "image_granularity", None)
            levels = torch.zeros_like(visual_tokens) if levels is None else levels
        return NativeVLModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=self.rope_deltas,
            image_granularity=levels,
            visual_tokens=visual_tokens,
            attention_mask=routed_mask,
            image_outputs=image_out,
            video_outputs=encoded.get("video"),
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

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


def drop_empty(pixels: torch.Tensor | None, grid_thw: torch.LongTensor | None):
    """(None, None) for zero-row pixel values (what the processor returns for a text-only sample, so every sample
    of a batch has the same keys); the inputs unchanged otherwise."""
    if pixels is not None and pixels.shape[0] == 0 and (grid_thw is None or grid_thw.numel() == 0):
        return None, None
    return pixels, grid_thw


class NativeVLForConditionalGeneration(NativeVLGenerationMixin, NativeVLPreTrainedModel, GenerationMixin):
    """`NativeVLModel` + LM head; `generate` places decoded tokens after the images' M-RoPE ids."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    accepts_loss_kwargs = True

    def __init__(self, config: NativeVLConfig) -> None:
        super().__init__(config)
        self.model = NativeVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLVisionModelOutput:
        """`NativeVLModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLVisionModelOutput:
        """`NativeVLModel.get_video_features`."""
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

    def get_rope_index(self, *args, **kwargs) -> tuple[torch.LongTensor, torch.LongTensor]:
        """`NativeVLModel.get_rope_index`."""
        return self.model.get_rope_index(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        rope_deltas: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        granularity: str | int | torch.LongTensor | None = None,
        image_granularity: torch.LongTensor | None = None,
        image_num_grids: torch.LongTensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLCausalLMOutputWithPast:
        """Arguments as `NativeVLModel.forward`; labels (batch, seq) with -100 on ignored tokens (shifted inside).
        Returns logits (batch, seq, vocab) (the last `logits_to_keep` positions when nonzero) and the mean loss,
        plus the level and the visual tokens of each image. With `granularity="auto"` and labels, the router reads
        the tokens the loss ignores (`instruction_mask = labels == -100` unless one is given): the prompt, never
        the answer (see `NativeVLModel.forward`)."""
        if granularity == "auto" and instruction_mask is None and labels is not None:
            instruction_mask = labels == IGNORE_INDEX
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            rope_deltas=rope_deltas,
            mm_encoder_outputs=mm_encoder_outputs,
            granularity=granularity,
            image_granularity=image_granularity,
            image_num_grids=image_num_grids,
            instruction_mask=instruction_mask,
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None and outputs.attention_mask is not None:
            # granularity="auto" masked surplus placeholders out: each kept token predicts the next KEPT token,
            # as in the shortened prompt
            kwargs["shift_labels"] = next_kept_labels(labels, outputs.attention_mask.to(labels.device))
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return NativeVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            rope_deltas=outputs.rope_deltas,
            image_granularity=outputs.image_granularity,
            visual_tokens=outputs.visual_tokens,
            attention_mask=outputs.attention_mask,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

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
        # the prefill forward derives rope_deltas from these ids (`given_position_ids`)
        num_grids = model_kwargs.get("image_num_grids")
        mrope_ids, _ = get_rope_index(
            input_ids,
            self.config,
            grids,
            model_kwargs.get("video_grid_thw"),
            mask if mask is not None and mask.dim() == 2 else None,
            self.model.resolve_granularity(model_kwargs.get("image_granularity"), grids, num_grids),
            model_kwargs.get("mm_token_type_ids"),
            num_grids,
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
        also carries `image_granularity` (num_images,).

        `fallback_threshold` (nativevl's addition, with `"auto"` or `"cascade"`): a sample whose answer at its
        images' levels has a token the model gave a probability below the threshold (`answer_confidence`, up to
        its first end token) is answered again with its images on the full grid (level 0), from the same vision
        features; the other samples keep their answers. `"cascade"` answers every image at the coarsest level
        first (no router; threshold `config.cascade_threshold` unless given). With a fallback, `image_granularity`
        is each image's final level, `visual_tokens` (num_images,) the placeholders its passes fed the LLM (first
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
        prompt ids in front of the generated tokens and, as a dict, `image_granularity`."""
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
        out.sequences = sequences
        out["image_granularity"] = levels
        return out

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
        out = type(first)(sequences=sequences)
        out["image_granularity"], out["visual_tokens"], out["fallback"] = final_levels, visual_tokens, fallback
        out["confidence"] = confidence
        return out

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
    "CACHE_NAME",
    "NativeVLCausalLMOutputWithPast",
    "NativeVLForConditionalGeneration",
    "NativeVLModel",
    "NativeVLModelOutputWithPast",
    "NativeVLPreTrainedModel",
    "NativeVLProjector",
    "NativeVLTextModel",
    "get_rope_index",
]
