"""nativevl's native-resolution vision-language model.

A NaViT-style ViT (patch 14, 2D RoPE, no absolute position table) encodes every image at its own size; a 2x2
merger (and, for NativeRes-LLaVA, an MLP projector) turns the patch grid into LLM tokens; transformers' Qwen2-VL
text decoder places them with M-RoPE (temporal, height, width) or plain 1-D positions.

- Qwen2-VL, arXiv 2409.12191; mirrors transformers' `models/qwen2_vl/modeling_qwen2_vl.py` (same parameter names,
  so weights map one to one).
- NativeRes-LLaVA, arXiv 2506.12776: `projector_type="merger_mlp"`, `position_scheme="1d"`.

Written here: the projector and the model classes (forward, image features, output classes). In sibling files:
the packed vision tower (`vision_nativevl.py`), position ids for both schemes (`positions_nativevl.py`), AVG routing
(`granularity_nativevl.py`), routed / cascade / fallback generation (`generation_nativevl.py`). Reused from
transformers: the decoder (attention dispatch, caches, gradient checkpointing), generation, loss.

This file is remote code: it is copied flat into a model folder and imports only torch, transformers and its
siblings (single dot).

transformers internals the remote-code files (modeling/ and processing/) rely on beyond its public classes
(tests/test_conformance.py imports each by name on every tested release):
- `models.qwen2_vl.modeling_qwen2_vl.Qwen2VLTextModel`, reused as the decoder; the name of its KV-cache argument
  (`cache` from 5.24, `past_key_values` before: `CACHE_NAME`), also the field of `BaseModelOutputWithPast`;
  `models.qwen2_vl.configuration_qwen2_vl.Qwen2VLTextConfig` / `Qwen2VLVisionConfig`, subclassed.
- `utils.output_capturing.capture_outputs` with `_can_record_outputs` (vision hidden states and attentions),
  `utils.can_return_tuple`, `utils.TransformersKwargs`, `processing_utils.Unpack`,
  `modeling_layers.GradientCheckpointingLayer`, `initialization`, `activations.ACT2FN`.
- `GenerationMixin._prepare_position_ids_for_generation` (overridden for M-RoPE in `generation_nativevl.py`),
  `GenerationMixin._expand_inputs_for_generation` (overridden there too: per-image inputs expand by
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
from .granularity_nativevl import NativeVLGranularityRouter, NativeVLRoutingMixin, next_kept_labels, pool_grid
from .positions_nativevl import NativeVLPositionsMixin, grid_levels, split_by_image, sum_per_image
from .vision_nativevl import NativeVLVisionModel, NativeVLVisionModelOutput, check_grids, drop_empty


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


class NativeVLModel(NativeVLPositionsMixin, NativeVLRoutingMixin, NativeVLPreTrainedModel):
    """Vision tower + projector + decoder, without the LM head. Position ids (`get_rope_index`, ...) come from
    `NativeVLPositionsMixin` (positions_nativevl.py), AVG routing (`resolve_granularity`, `router_logits`, ...) from
    `NativeVLRoutingMixin` (granularity_nativevl.py)."""

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
            position_ids = self._compute_position_ids(
                input_ids, inputs_embeds, attention_mask, cache, image_grid_thw, video_grid_thw, levels,
                mm_token_type_ids, num_grids,
            )  # fmt: skip
        else:
            position_ids, packed = self._given_position_ids(
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


__all__ = [
    "CACHE_NAME",
    "NativeVLCausalLMOutputWithPast",
    "NativeVLForConditionalGeneration",
    "NativeVLModel",
    "NativeVLModelOutputWithPast",
    "NativeVLPreTrainedModel",
    "NativeVLProjector",
    "NativeVLTextModel",
]
