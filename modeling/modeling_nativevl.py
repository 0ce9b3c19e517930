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

transformers internals it relies on (tests/test_conformance.py checks each by name on every tested release):
- `models.qwen2_vl.modeling_qwen2_vl.Qwen2VLTextModel`, reused as the decoder; the name of its KV-cache argument
  (`cache` from 5.24, `past_key_values` before: `CACHE_NAME`), also the field of `BaseModelOutputWithPast`.
- `utils.output_capturing.capture_outputs` with `_can_record_outputs` (vision hidden states and attentions).
- `GenerationMixin._prepare_position_ids_for_generation` (overridden for M-RoPE) and `generate`'s
  `mm_encoder_outputs` (the vision tower runs once before the prefill, through `get_image_features`).
- `PreTrainedModel._can_set_attn_implementation` (overridden), `AttentionInterface` /
  `masking_utils.ALL_MASK_ATTENTION_FUNCTIONS` / `sdpa_mask` / `integrations.sdpa_attention.sdpa_attention_forward`
  (the `nativevl_varlen` attention), `modeling_utils.slice_logits_to_keep`.
"""

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_flash_attn_2_available
from transformers.utils.output_capturing import capture_outputs

from .configuration_nativevl import NativeVLConfig, NativeVLTextConfig, NativeVLVisionConfig


if is_flash_attn_2_available():
    from flash_attn import flash_attn_varlen_func
else:
    flash_attn_varlen_func = None

try:  # torch >= 2.10: FlashAttention varlen kernel inside torch (CUDA, fp16/bf16)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


# ----------------------------------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------------------------------


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the GPT-NeoX layout used by Qwen2-VL: channel i pairs with channel i + d/2.

    x: (N, ..., d) in any float dtype; cos, sin: (N, d/2) float32, broadcast over the middle dims. Returns a new
    contiguous float32 tensor shaped like x: (x1 * cos - x2 * sin, x2 * cos + x1 * sin). Without autograd it runs
    four fused kernels into one buffer instead of materialising `rotate_half` (same values as transformers' float32
    path); `out=` kernels cannot be differentiated, so training takes the plain expression.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos.view(shape), sin.view(shape)
    if torch.is_grad_enabled() and x.requires_grad:
        x1, x2 = x1.float(), x2.float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin)
    return out


def vision_patch_positions(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """(row, col) of every patch, in the merge-block-major order of `pixel_values` rows.

    grid_thw: (num_grids, 3) long [t, h, w] in patches. Returns (num_patches, 2) long. Rows of one grid are ordered
    2x2 block by 2x2 block in raster order, the patches of a block in raster order inside it, and the whole
    (h, w) layout repeated for each of the t temporal patches.
    """
    positions = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        hw = torch.stack([rows, cols], dim=-1)  # (h, w, 2)
        hw = hw.view(h // merge_size, merge_size, w // merge_size, merge_size, 2)  # (h/m, m, w/m, m, 2)
        hw = hw.permute(0, 2, 1, 3, 4).reshape(h * w, 2)  # (h*w, 2), block-major
        positions.append(hw.repeat(t, 1))  # (t*h*w, 2)
    return torch.cat(positions, dim=0)


class NativeVLVisionRotaryEmbedding(nn.Module):
    """2D RoPE for the ViT: half of each head's rotary pairs rotate with the row, half with the column.

    Channel layout of the returned (num_patches, head_dim / 2) cos/sin: [row (d/4), col (d/4)], the angles of the
    pairs (i, i + d/2) for i < d/2 (`apply_rotary` uses them for both halves). Same angles as transformers'
    `Qwen2VLVisionRotaryEmbedding`, whose (d,) tables repeat these twice. The inverse frequencies are derived from the config on each call
    (a few dozen floats), so no buffer needs re-initialising after meta-device loading.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (num_patches, 2) long (row, col). Returns cos, sin: (num_patches, head_dim / 2) float32."""
        spatial_dim = self.head_dim // 2
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float, device=device) / spatial_dim)
        )  # (head_dim/4,)
        max_pos = int(positions.max()) + 1 if positions.numel() else 1
        table = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float), inv_freq)  # (max_pos, d/4)
        freqs = table[positions.to(device)].flatten(1)  # (num_patches, d/2): [row (d/4), col (d/4)]
        return freqs.cos(), freqs.sin()


class NativeVLVisionPatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal_patch, patch, patch) and no bias, applied to pre-cut patches."""

    def __init__(self, config: NativeVLVisionConfig) -> None:
        super().__init__()
        self.in_channels = config.in_channels
        self.temporal_patch_size = config.temporal_patch_size
        self.patch_size = config.patch_size
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (num_patches, C*T*P*P), rows in (C, T, P, P) order. Returns (num_patches, embed_dim)."""
        # A conv whose kernel covers its whole input is a matmul: (N, C*T*P*P) @ (C*T*P*P, D).
        weight = self.proj.weight.view(self.proj.out_channels, -1)  # (D, C*T*P*P)
        return F.linear(pixel_values.to(weight.dtype), weight)


class NativeVLVisionAttention(nn.Module):
    """Multi-head self-attention over a packed sequence of images, never across image boundaries.

    `attn_implementation` picks the kernel. On CUDA in fp16/bf16, `flash_attention_2` and `sdpa` run one varlen
    call over the whole packed sequence (flash-attn's when installed, else torch's own `varlen_attn`). Otherwise,
    and always for `eager`, one call per run of equal-length segments (consecutive video frames or crop tiles share
    one batched call). Either way memory grows with the sum of per-image squares, not the square of the total.
    """

    def __init__(self, config: NativeVLVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        segment_runs: list[tuple[int, int, int]],
        max_seqlen: int,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """hidden_states: (N, D). cu_seqlens: (num_segments + 1,) int32 boundaries. segment_runs: (start, length,
        count) for runs of `count` consecutive segments of equal `length`. Returns (N, D) and, when
        `output_attentions` (eager only: the fused kernels never form the weights), one (count, H, L, L) float tensor
        of softmax weights per run of equal-length segments, None otherwise."""
        n = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).view(n, 3, self.num_heads, self.head_dim)  # (N, 3, H, d)
        q, k = apply_rotary(qkv[:, :2], *position_embeddings).to(qkv.dtype).unbind(1)  # (N, H, d) each
        v = qkv[:, 2]  # (N, H, d)

        impl = self.config._attn_implementation or "sdpa"
        if output_attentions and impl != "eager":
            raise ValueError(
                f"output_attentions needs attn_implementation='eager' in the vision tower, got {impl!r}: the fused "
                "kernels never form the attention weights"
            )
        varlen_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and impl != "eager"
        if varlen_ok and flash_attn_varlen_func is not None:
            out = flash_attn_varlen_func(
                q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=self.scaling, causal=False
            )  # (N, H, d)
        elif varlen_ok and varlen_attn is not None:
            out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=self.scaling)  # (N, H, d)
        else:
            out = torch.empty_like(v)  # (N, H, d)
            kept = [] if output_attentions else None
            for start, length, count in segment_runs:
                end = start + length * count
                # (count*L, H, d) -> (count, L, H, d) -> (count, H, L, d), views
                qs, ks, vs = (t[start:end].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
                o, weights = self._segment_attention(qs, ks, vs, eager=impl == "eager")  # (count, H, L, d)
                out[start:end].view(count, length, *out.shape[1:]).copy_(o.transpose(1, 2))
                if kept is not None:
                    kept.append(weights)
                del o, weights  # the next segment's scores are allocated without this one's alive
            return self.proj(out.reshape(n, -1)), None if kept is None else tuple(kept)  # (N, D)
        return self.proj(out.reshape(n, -1)), None  # (N, D)

    def _segment_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eager: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k, v: (count, H, L, d). Returns (count, H, L, d) and the eager softmax weights (count, H, L, L) (None
        under sdpa). A function of its own so that one segment's scores are freed before the next one's exist."""
        if not eager:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scaling), None
        weights = torch.matmul(q * self.scaling, k.transpose(-1, -2))  # (count, H, L, L)
        weights = weights.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(weights, v), weights


class NativeVLVisionMLP(nn.Module):
    def __init__(self, config: NativeVLVisionConfig) -> None:
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class NativeVLVisionBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block (LayerNorm eps 1e-6, as Qwen2-VL's `Qwen2VLVisionBlock`)."""

    def __init__(self, config: NativeVLVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = NativeVLVisionAttention(config)
        self.mlp = NativeVLVisionMLP(config)

    def forward(
        self, hidden_states, cu_seqlens, segment_runs, max_seqlen, position_embeddings, output_attentions=False
    ) -> torch.Tensor:
        attn_out, _ = self.attn(
            self.norm1(hidden_states), cu_seqlens, segment_runs, max_seqlen, position_embeddings, output_attentions
        )  # the weights reach `attentions` through transformers' output-capturing hook on the attention module
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.norm2(hidden_states))


class NativeVLPatchMerger(nn.Module):
    """LayerNorm, then 4 consecutive rows (one 2x2 block) viewed as one, Linear-GELU-Linear to `hidden_size`."""

    def __init__(self, config: NativeVLVisionConfig) -> None:
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, config.hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, embed_dim), N a multiple of merge**2. Returns (N / merge**2, hidden_size)."""
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))  # (N/4, 4*embed_dim) -> (N/4, hidden_size)


SEGMENT_BATCH_PATCHES = 2048  # equal-length segments are batched up to the scores of one segment this long


def vision_segments(grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]], int]:
    """Attention segments of a packed vision sequence: one per image, one per temporal patch of a video.

    Returns cu_seqlens (num_segments + 1,) int32, the runs of consecutive equal-length segments as
    (start, length, count), and the longest segment. A run is batched into one attention call only while its
    count x length^2 scores stay within those of the longest segment (or of a 2048-patch one, if larger), so
    batching video frames or tiles never raises the peak memory of the per-segment path.
    """
    lengths = []
    for t, h, w in grid_thw.tolist():
        lengths.extend([h * w] * t)
    budget = max(max(lengths, default=0), SEGMENT_BATCH_PATCHES) ** 2
    runs: list[tuple[int, int, int]] = []
    start = 0
    for length in lengths:
        if runs and runs[-1][1] == length and (runs[-1][2] + 1) * length**2 <= budget:
            runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
        else:
            runs.append((start, length, 1))
        start += length
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return cu_seqlens, runs, max(lengths, default=0)


# The name of the KV cache in forward arguments and model outputs: `cache` from transformers 5.24 on,
# `past_key_values` before. Both names are accepted by the forwards here; outputs carry the release's own field.
CACHE_NAME = "cache" if "cache" in inspect.signature(Qwen2VLTextModel.forward).parameters else "past_key_values"


@dataclass
class NativeVLVisionModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` of the vision tower / `get_image_features`: `last_hidden_state` (num_patches,
    embed_dim); `pooler_output` (num_patches / 4, width) from the tower, or a tuple with one (tokens_i, LLM width)
    tensor per grid from `get_image_features` (pooled to each grid's granularity level when one was given);
    `hidden_states` / `attentions` when requested (attentions: per layer a tuple of (count, heads, L, L) weights,
    one per run of equal-length segments, eager only); `image_granularity` (num_grids,) long levels or None."""

    image_granularity: torch.LongTensor | None = None


@dataclass
class NativeVLModelOutputWithPast(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` (transformers' own, so the cache field is the release's) plus:
    `rope_deltas` (batch, 1): largest position + 1 minus sequence length; `image_granularity` (num_grids,) long: the
    level each image grid was fed at; `visual_tokens` (num_grids,) long: the LLM tokens each grid used (both None
    without images); `attention_mask` (batch, seq): the mask the LLM ran with when `granularity="auto"` zeroed
    surplus placeholders (None otherwise); `image_outputs` / `video_outputs`: the vision tower's outputs
    (`NativeVLVisionModelOutput`, with its hidden states and attentions when requested)."""

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


class NativeVLPreTrainedModel(PreTrainedModel):
    config: NativeVLConfig
    config_class = NativeVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["NativeVLVisionBlock", "Qwen2VLDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Placeholders are counted, images split per grid and M-RoPE ids built on the host (data-dependent shapes), as
    # in transformers' Qwen2-VL the vision part is not traced; the decoder alone compiles (tested).
    _can_compile_fullgraph = False

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from the module source; every attention here reads `config._attn_implementation` at
        # call time (the decoder through AttentionInterface), so `set_attn_implementation` always applies
        return True

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


class NativeVLVisionModel(NativeVLPreTrainedModel):
    """The packed ViT with its merger: pixel patches of many images in, LLM-width (or merger-width) tokens out."""

    config: NativeVLVisionConfig
    config_class = NativeVLVisionConfig
    input_modalities = ("image", "video")
    _no_split_modules = ["NativeVLVisionBlock"]
    _input_embed_layer = "patch_embed"
    # transformers' output capturing: block outputs become `hidden_states`, eager weights `attentions`
    _can_record_outputs = {"hidden_states": NativeVLVisionBlock, "attentions": NativeVLVisionAttention}

    def __init__(self, config: NativeVLVisionConfig) -> None:
        super().__init__(config)
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = NativeVLVisionPatchEmbed(config)
        rope_theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
        self.rotary_pos_emb = NativeVLVisionRotaryEmbedding(config.embed_dim // config.num_heads, rope_theta)
        self.blocks = nn.ModuleList([NativeVLVisionBlock(config) for _ in range(config.depth)])
        self.merger = NativeVLPatchMerger(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> NativeVLVisionModelOutput:
        """pixel_values: (num_patches, C*T*P*P) in merge-block-major order; grid_thw: (num_grids, 3) long.

        Returns `last_hidden_state` (num_patches, embed_dim) and `pooler_output` (num_patches / 4, hidden_size);
        `hidden_states` (depth + 1 of (num_patches, embed_dim)) and `attentions` with `output_hidden_states` /
        `output_attentions` (the latter needs eager attention).
        """
        check_grids(pixel_values, grid_thw, self.spatial_merge_size, "grid_thw")
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        cu_seqlens, segment_runs, max_seqlen = vision_segments(grid_thw)
        cu_seqlens = cu_seqlens.to(pixel_values.device)
        hidden_states = self.patch_embed(pixel_values)  # (N, embed_dim)
        positions = vision_patch_positions(grid_thw, self.spatial_merge_size)  # (N, 2)
        position_embeddings = self.rotary_pos_emb(positions, hidden_states.device)  # 2 x (N, head_dim)
        for block in self.blocks:
            hidden_states = block(
                hidden_states, cu_seqlens, segment_runs, max_seqlen, position_embeddings, bool(output_attentions)
            )
        return NativeVLVisionModelOutput(last_hidden_state=hidden_states, pooler_output=self.merger(hidden_states))


def check_grids(pixel_values: torch.Tensor, grid_thw: torch.Tensor | None, merge_size: int, name: str) -> None:
    """Raises ValueError, naming the values, unless `grid_thw` (num_grids, 3) describes the rows of
    `pixel_values` (num_patches, C*T*P*P) with sides divisible by `merge_size`."""
    if grid_thw is None:
        raise ValueError(f"pixel values of {pixel_values.shape[0]} patch rows need {name} (num_grids, 3), got None")
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"{name} must be (num_grids, 3) [t, h, w], got shape {tuple(grid_thw.shape)}")
    expected = int(grid_thw.prod(-1).sum())
    if pixel_values.shape[0] != expected:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} patch rows but {name} {grid_thw.tolist()} describes {expected}"
        )
    bad = [g for g in grid_thw.tolist() if g[1] % merge_size or g[2] % merge_size or min(g) < 1]
    if bad:
        raise ValueError(f"{name} rows {bad} must be positive with h and w divisible by the merge size {merge_size}")


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


class NativeVLTextModel(Qwen2VLTextModel):
    """transformers' Qwen2-VL decoder, unchanged: (3, batch, seq) M-RoPE ids, or (4, batch, seq) with the text
    positions first for packed rows; 2-D ids are broadcast to the three sections (= plain 1-D RoPE)."""

    config: NativeVLTextConfig
    config_class = NativeVLTextConfig
    _supports_flex_attn = True  # the decoder takes transformers' BlockMask (document mask for packed rows)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # Qwen2-VL's decoder dispatches through AttentionInterface (transformers' guess reads this file)


# ----------------------------------------------------------------------------------------------------------------
# Packed attention for the decoder without flash-attn
# ----------------------------------------------------------------------------------------------------------------


def varlen_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`attn_implementation="nativevl_varlen"`: causal attention per packed segment, never over the whole row.

    query: (batch, heads, seq, d); key, value: (batch, kv_heads, seq, d). With `cu_seq_lens_q` (packed rows from
    `PackingCollator`, boundaries over the flattened rows) each segment attends causally to itself only: one
    `varlen_attn` call on CUDA in fp16/bf16, else one sdpa call per segment, so the cost is the sum of per-sample
    squares (sdpa with transformers' block-diagonal mask pays the square of the row). Anything else (padding masks,
    KV-cache decoding) is transformers' sdpa. Returns (batch, seq, heads, d).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    # (batch, h, seq, d) -> (batch*seq, h, d): the rows laid end to end, as cu_seq_lens counts them
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim) for t in (query, key, value))
    dropout = dropout if module.training else 0.0
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_attn is not None and dropout == 0.0:
        if kv_heads != heads:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        longest = int(max_length_q) if max_length_q is not None else int(cu_seq_lens_q.diff().max())
        cu = cu_seq_lens_q.to(torch.int32)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0))  # (N, h, d)
    else:
        out = torch.empty_like(q)  # (batch*seq, h, d)
        bounds = cu_seq_lens_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            # (n, h, d) -> (1, h, n, d)
            qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=kv_heads != heads
            )
            out[start:end] = o[0].transpose(0, 1)
    return out.view(batch, seq, heads, dim), None


def register_attention() -> None:
    """Makes `attn_implementation="nativevl_varlen"` known to transformers (masks as sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("nativevl_varlen", varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("nativevl_varlen", sdpa_mask)


register_attention()


# ----------------------------------------------------------------------------------------------------------------
# Position ids
# ----------------------------------------------------------------------------------------------------------------


def mrope_positions_for_sequence(
    kinds: torch.Tensor,
    image_grids: list[list[int]],
    video_grids: list[list[int]],
    merge_size: int,
) -> torch.Tensor:
    """M-RoPE ids of one unpadded sequence. Consumes grids from the front of `image_grids` / `video_grids`.

    kinds: (seq,) long, 0 text, 1 image placeholder, 2 video placeholder (transformers' `mm_token_type_ids`).
    Returns (3, seq) long: rows (temporal, height, width). A text token gets its running position on all three
    rows; the tokens of a grid (t, h, w) get start + (frame, row, col) over the merged (t, h/m, w/m) grid; the next
    token resumes at the largest id so far + 1 (Qwen2-VL's rule).
    """
    kinds = kinds.cpu().long()
    seq_len = kinds.shape[0]
    positions = torch.empty(3, seq_len, dtype=torch.long)
    cursor, next_pos = 0, 0
    while cursor < seq_len:
        kind = int(kinds[cursor])
        if kind == 0:
            change = (kinds[cursor:] != 0).nonzero()
            end = cursor + int(change[0]) if len(change) else seq_len
            positions[:, cursor:end] = torch.arange(next_pos, next_pos + end - cursor)
            next_pos += end - cursor
            cursor = end
            continue
        grids = image_grids if kind == 1 else video_grids
        name = "image" if kind == 1 else "video"
        if not grids:
            raise ValueError(f"found more {name} placeholder tokens than {name} grids (at position {cursor})")
        t, h, w = grids.pop(0)
        gh, gw = h // merge_size, w // merge_size
        n_tok = t * gh * gw
        if cursor + n_tok > seq_len or not bool((kinds[cursor : cursor + n_tok] == kind).all()):
            run = (kinds[cursor:] != kind).nonzero()
            found = int(run[0]) if len(run) else seq_len - cursor
            raise ValueError(
                f"{name} grid {[t, h, w]} needs {n_tok} consecutive {name} tokens but {found} start at position {cursor}"
            )
        frame = torch.arange(t).view(t, 1, 1).expand(t, gh, gw)
        row = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw)
        col = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw)
        positions[:, cursor : cursor + n_tok] = torch.stack([frame, row, col]).view(3, n_tok) + next_pos
        next_pos += max(t, gh, gw)
        cursor += n_tok
    return positions


def placeholder_kinds(
    input_ids: torch.LongTensor,
    config: NativeVLConfig,
    image_grid_thw: torch.LongTensor | None,
    video_grid_thw: torch.LongTensor | None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> torch.LongTensor:
    """(batch, seq) long: 0 text, 1 image, 2 video. `mm_token_type_ids` when given; else a token is an image (video)
    placeholder when it holds the image (video) token id AND the batch has image (video) grids, so text-only
    inputs holding those ids are text, as in transformers' Qwen2-VL."""
    if mm_token_type_ids is not None:
        return mm_token_type_ids.long()
    kinds = torch.zeros_like(input_ids, dtype=torch.long)
    if image_grid_thw is not None and image_grid_thw.numel():
        kinds[input_ids == config.image_token_id] = 1
    if video_grid_thw is not None and video_grid_thw.numel():
        kinds[input_ids == config.video_token_id] = 2
    return kinds


def get_rope_index(
    input_ids: torch.LongTensor,
    config: NativeVLConfig,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    image_granularity: torch.LongTensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """M-RoPE position ids of a (possibly padded) batch, computed from the placeholder tokens alone.

    input_ids: (batch, seq). image_grid_thw / video_grid_thw: (num, 3) in the order the placeholders appear,
    sample after sample. attention_mask: (batch, seq), 0 on padding (left or right). image_granularity:
    (num_images,) long levels; an image of level l is placed as its pooled grid `level_grid(...)` (its own
    (row, col) ids, `level_grid`'s count of placeholders); None: level 0 everywhere. mm_token_type_ids: (batch,
    seq), 0 text / 1 image / 2 video; None: derived by `placeholder_kinds`. Returns position_ids (3, batch, seq)
    long (padding gets 0, as in transformers' Qwen2-VL) and rope_deltas (batch, 1): largest id + 1 - length, so
    that the token at cache position p of sample b decodes at p + rope_deltas[b].
    """
    merge = config.vision_config.spatial_merge_size
    kinds = placeholder_kinds(input_ids, config, image_grid_thw, video_grid_thw, mm_token_type_ids)
    if image_grid_thw is not None:
        image_grid_thw = pooled_grid_thw(image_grid_thw, image_granularity, merge)
    image_grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    video_grids = video_grid_thw.tolist() if video_grid_thw is not None else []
    batch, seq_len = input_ids.shape
    position_ids = torch.zeros(3, batch, seq_len, dtype=torch.long)
    deltas = []
    for b in range(batch):
        keep = attention_mask[b].bool().cpu() if attention_mask is not None else torch.ones(seq_len, dtype=torch.bool)
        pos = mrope_positions_for_sequence(kinds[b].cpu()[keep], image_grids, video_grids, merge)
        position_ids[:, b, keep] = pos
        deltas.append((int(pos.max()) + 1 if pos.numel() else 0) - pos.shape[1])
    if image_grids or video_grids:
        raise ValueError(
            f"{len(image_grids)} image grid(s) and {len(video_grids)} video grid(s) have no placeholder tokens left"
        )
    device = input_ids.device
    return position_ids.to(device), torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)


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


def text_positions(
    batch: int, seq_len: int, past_length: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.LongTensor:
    """Plain positions (batch, seq_len) of the newest `seq_len` tokens: count of attended tokens before each one
    (so left padding is skipped), or past_length + arange without a mask."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, past + seq)
        return positions[:, -seq_len:].to(device)
    return torch.arange(past_length, past_length + seq_len, device=device).expand(batch, seq_len)


# ----------------------------------------------------------------------------------------------------------------
# Adaptive visual granularity (AVG-LLaVA, arXiv 2410.02745): granularity scaler and router
# ----------------------------------------------------------------------------------------------------------------


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


def pooled_grid_thw(
    image_grid_thw: torch.LongTensor, image_granularity: torch.LongTensor | None, merge_size: int
) -> torch.LongTensor:
    """Patch grids (num_images, 3) that describe the pooled images: (t, h' * m, w' * m) for the merged grid
    (t, h', w') of each image's level, so the placeholder count and M-RoPE (row, col) ids follow the pooled grid."""
    if image_granularity is None:
        return image_grid_thw
    rows = []
    for (t, h, w), level in zip(image_grid_thw.tolist(), image_granularity.tolist(), strict=True):
        t, gh, gw = level_grid(t, h // merge_size, w // merge_size, int(level))
        rows.append([t, gh * merge_size, gw * merge_size])
    return torch.tensor(rows, dtype=torch.long, device=image_grid_thw.device).view(-1, 3)


def split_by_image(
    features: torch.Tensor, image_grid_thw: torch.LongTensor, merge_size: int
) -> tuple[tuple[torch.Tensor, ...], list[tuple[int, int, int]]]:
    """Level-0 tokens (sum t*h*w/m^2, D) of all images split per image, with each image's merged grid (t, h/m, w/m)."""
    grids = [(t, h // merge_size, w // merge_size) for t, h, w in image_grid_thw.tolist()]
    return features.split([t * h * w for t, h, w in grids]), grids


def image_token_counts(image_grid_thw: torch.LongTensor, image_granularity: torch.LongTensor | None, merge_size: int):
    """Placeholder tokens of each image (list of int) at its level (level 0 when `image_granularity` is None)."""
    grids = pooled_grid_thw(image_grid_thw, image_granularity, merge_size)
    return [t * h * w // merge_size**2 for t, h, w in grids.tolist()]


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
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.LongTensor,
    from_levels: torch.LongTensor | None,
    to_levels: torch.LongTensor,
    image_token_id: int,
    merge_size: int,
    pad_token_id: int,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Removes each image's surplus placeholders so a prompt expanded for `from_levels` fits `to_levels`.

    input_ids, attention_mask: (batch, seq), left or right padded (the side is kept; unpadded counts as left).
    Returns the re-padded input_ids and attention_mask (batch, seq'), seq' <= seq; each image keeps the first
    n(to_level) tokens of its run (`drop_surplus_placeholders`).
    """
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    right = bool((~mask[:, -1]).any()) and not bool((~mask[:, 0]).any())
    keep = drop_surplus_placeholders(
        input_ids, mask, image_grid_thw, from_levels, to_levels, image_token_id, merge_size
    ).bool()
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
    shifted = torch.full_like(labels, -100)
    for b in range(labels.shape[0]):
        where = kept[b].nonzero().squeeze(-1)
        shifted[b, where[:-1]] = labels[b, where[1:]]
    return shifted


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
        self.rope_deltas = (
            None  # (batch, 1), set at every prefill from the ids it ran with, used to place decoded tokens
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, **kwargs) -> NativeVLVisionModelOutput:
        """Vision tower + projector: `pooler_output` (sum t*h*w/4, LLM width), level 0, all grids concatenated."""
        capture = {k: v for k, v in kwargs.items() if k in ("output_hidden_states", "output_attentions")}
        outputs = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw, **capture)
        if self.multi_modal_projector is not None:
            outputs.pooler_output = self.multi_modal_projector(outputs.pooler_output)
        return outputs

    def pool_image_outputs(
        self, outputs: NativeVLVisionModelOutput, image_grid_thw: torch.LongTensor, levels: torch.LongTensor | None
    ) -> NativeVLVisionModelOutput:
        """Splits `outputs.pooler_output` (sum t*h*w/4, D), level-0 tokens of all grids, into one tensor per grid,
        each average-pooled to its level (`pool_grid`); records the levels in `image_granularity`."""
        features = outputs.pooler_output
        if not isinstance(features, torch.Tensor):
            features = torch.cat(features)
        merge = self.config.vision_config.spatial_merge_size
        parts, grids = split_by_image(features, image_grid_thw, merge)
        if levels is not None and bool((levels != 0).any()):
            parts = [pool_grid(p, g, int(lv))[0] for p, g, lv in zip(parts, grids, levels.tolist(), strict=True)]
        outputs.pooler_output = tuple(parts)
        outputs.image_granularity = levels
        return outputs

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        image_granularity: torch.LongTensor | int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLVisionModelOutput:
        """Qwen2-VL's contract: pixel_values (num_patches, 1176), image_grid_thw (num_grids, 3). Returns the vision
        tower's output with `pooler_output` a tuple of one (tokens_i, LLM width) tensor per grid, pooled to
        `image_granularity` (None: level 0; an int or one level per grid) when given; `hidden_states` /
        `attentions` of the tower with `output_hidden_states` / `output_attentions`."""
        merge = self.config.vision_config.spatial_merge_size
        check_grids(pixel_values, image_grid_thw, merge, "image_grid_thw")
        levels = self.resolve_granularity(image_granularity, image_grid_thw)
        return self.pool_image_outputs(self._encode(pixel_values, image_grid_thw, **kwargs), image_grid_thw, levels)

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_grid_thw: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLVisionModelOutput:
        """As `get_image_features` for videos (never pooled): `pooler_output` one tensor per video."""
        check_grids(
            pixel_values_videos, video_grid_thw, self.config.vision_config.spatial_merge_size, "video_grid_thw"
        )
        return self.pool_image_outputs(
            self._encode(pixel_values_videos, video_grid_thw, **kwargs), video_grid_thw, None
        )

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
        (placeholders are then found by token id, and only when grids of their kind are given). Extra keyword:
        `image_granularity` (num_grids,) levels. Under `position_scheme="1d"` the three rows are the plain
        positions the model uses and the deltas are 0."""
        if self.config.position_scheme == "1d":
            batch, seq_len = input_ids.shape
            mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
            positions = text_positions(batch, seq_len, 0, mask, input_ids.device)
            if mask is not None:
                positions = positions.masked_fill(~mask.bool(), 0)
            zeros = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device)
            return positions.unsqueeze(0).expand(3, -1, -1).clone(), zeros
        levels = self.resolve_granularity(kwargs.get("image_granularity"), image_grid_thw)
        return get_rope_index(
            input_ids, self.config, image_grid_thw, video_grid_thw, attention_mask, levels, mm_token_type_ids
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
                f"found {n_tokens} {name} tokens in the input but the {name}s give {features.shape[0]} features; "
                f"each {name} of grid (t, h, w) needs t*h*w/4 placeholder tokens (at granularity level l > 0, the "
                f"count of its pooled grid level_grid(t, h/2, w/2, l))"
            )
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def resolve_granularity(self, granularity, image_grid_thw: torch.LongTensor | None) -> torch.LongTensor | None:
        """Per-grid levels (num_grids,) long from None (None: full grid), an int (every grid) or a sequence /
        tensor (one level per image grid). Raises on levels outside 0..L-1 (when the config sets L) or below 0."""
        if granularity is None or image_grid_thw is None:
            return None
        if isinstance(granularity, str):
            raise ValueError(
                f"granularity must be None, 'auto', an int level or per-image levels, got {granularity!r}"
            )
        n = image_grid_thw.shape[0]
        if isinstance(granularity, int):
            levels = torch.full((n,), granularity, dtype=torch.long)
        else:
            levels = torch.as_tensor(granularity, dtype=torch.long).flatten().cpu()
        if levels.shape[0] != n:
            raise ValueError(f"granularity gives {levels.shape[0]} level(s) but there are {n} image grid(s)")
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
        labels: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        image_granularity: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """The router's logits (num_images, L), one row per image grid.

        input_ids: (batch, seq) holding the images' placeholders at the levels `image_granularity` (None: level 0);
        image_features: (sum t*h*w/4, D) level-0 tokens. Each image sees its own levels' tokens plus the `top_k`
        text tokens of its own sample (the row, or the `cu_seq_lens_q` segment of a packed row) most
        cosine-similar to its mean token; text tokens exclude vision tokens, padding (attention_mask 0) and answer
        tokens (labels != -100), so the router sees the instruction only.
        """
        if self.granularity_router is None:
            raise ValueError("this model has no granularity router: set config.granularity to a number of levels")
        router, cfg = self.granularity_router, self.config
        merge, levels_n = cfg.vision_config.spatial_merge_size, router.num_levels
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
        if labels is not None:
            is_text &= labels.reshape(-1) == -100
        embeds = self.get_input_embeddings()(flat_ids)  # (batch*seq, D)
        where = (flat_ids == cfg.image_token_id).nonzero().squeeze(-1)  # (num image tokens,)
        counts = image_token_counts(image_grid_thw, image_granularity, merge)
        if where.shape[0] != sum(counts):
            raise ValueError(f"found {where.shape[0]} image tokens in the input but the images need {sum(counts)}")
        firsts = where[torch.tensor([0] + counts[:-1], dtype=torch.long).cumsum(0).to(where.device)]
        parts, grids = split_by_image(image_features, image_grid_thw, merge)
        tokens, slots = [], []
        for feats, grid, first in zip(parts, grids, firsts.tolist(), strict=True):
            levels = [pool_grid(feats, grid, level)[0] for level in range(levels_n)]
            slot = [torch.full((x.shape[0],), level, dtype=torch.long) for level, x in enumerate(levels)]
            text = embeds[is_text & (segment == segment[first])]  # (m, D), the own sample's instruction
            if text.shape[0] and router.top_k:
                similarity = F.cosine_similarity(text.float(), feats.float().mean(0, keepdim=True), dim=-1)  # (m,)
                top = similarity.topk(min(router.top_k, text.shape[0])).indices  # most similar first
                levels.append(text[top].to(feats.dtype))
                slot.append(levels_n + torch.arange(top.shape[0]))
            tokens.append(torch.cat(levels))  # (N_i, D)
            slots.append(torch.cat(slot))  # (N_i,)
        longest = max(x.shape[0] for x in tokens)
        dtype = router.head[0].weight.dtype
        batch_tokens = torch.zeros(len(tokens), longest, tokens[0].shape[-1], dtype=dtype, device=embeds.device)
        batch_slots = torch.zeros(len(tokens), longest, dtype=torch.long, device=embeds.device)
        padding = torch.ones(len(tokens), longest, dtype=torch.bool, device=embeds.device)
        for i, (x, slot) in enumerate(zip(tokens, slots, strict=True)):
            batch_tokens[i, : x.shape[0]], batch_slots[i, : x.shape[0]], padding[i, : x.shape[0]] = x, slot, False
        return router(batch_tokens, batch_slots, padding)  # (num_images, L)

    def choose_granularity(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        image_granularity: torch.LongTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor]:
        """`granularity="auto"`: runs the vision tower and the router. Returns the argmax levels (num_images,)
        long, the router logits (num_images, L) and the level-0 image features (sum t*h*w/4, D)."""
        features = self._encode(pixel_values, image_grid_thw).pooler_output
        logits = self.router_logits(
            input_ids, features, image_grid_thw, attention_mask, labels, cu_seq_lens_q, image_granularity
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
    ) -> torch.LongTensor:
        """Position ids when the caller gave none: (batch, seq) for the 1-D scheme, (3, batch, seq) for M-RoPE.

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
                input_ids, self.config, image_grid_thw, video_grid_thw, mask_2d, image_granularity, mm_token_type_ids
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
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLModelOutputWithPast:
        """input_ids: (batch, seq). pixel_values: (num_patches, 1176) for all images of the batch, image_grid_thw
        (num_images, 3); videos likewise (zero rows count as none). `mm_encoder_outputs`: {"image"|"video": output
        of `get_image_features` / `get_video_features`} in place of pixels (what `generate` passes). position_ids:
        (batch, seq), (3, batch, seq), the processor's (batch, seq, 3), or (4, batch, seq) with plain per-sample
        positions first (packed rows); computed from the placeholders when None. `mm_token_type_ids` (batch, seq):
        0 text / 1 image / 2 video; without it placeholders are found by token id. The KV cache is `cache` (5.24 on)
        or `past_key_values` (earlier releases).

        granularity: None (full grids), an int level for every image, or (num_images,) long levels; each image's
        tokens are average-pooled to its level before they fill its placeholders, whose count must be the pooled
        count. `image_granularity` (as the processor and `PackingCollator` return it) is used when `granularity`
        is None, and says what the placeholders were expanded for when it is `"auto"`.

        `granularity="auto"` (padded or single rows; `input_ids` needed): the router picks each image's level from
        its level-0 tokens and its sample's instruction (`labels` != -100 marks answer tokens it must not see).
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
        pixel_values, image_grid_thw = drop_empty(pixel_values, image_grid_thw)
        pixel_values_videos, video_grid_thw = drop_empty(pixel_values_videos, video_grid_thw)
        encoded = {k: v for k, v in (mm_encoder_outputs or {}).items() if v is not None}
        for name, pixels in (("image", pixel_values), ("video", pixel_values_videos)):
            if pixels is not None and name in encoded:
                raise ValueError(f"give the {name}s as pixel values or as mm_encoder_outputs['{name}'], not both")
        capture = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
        routed_mask = None
        if isinstance(granularity, str):
            if granularity != "auto":
                raise ValueError(
                    f"granularity must be None, 'auto', an int level or per-image levels, got {granularity!r}"
                )
            if pixel_values is not None:  # else nothing to route (text only, or a decoding step after the prefill)
                input_ids, routed_mask, encoded["image"] = self._route(
                    input_ids, attention_mask, position_ids, pixel_values, image_grid_thw, image_granularity,
                    labels, kwargs.get("cu_seq_lens_q"), capture,
                )  # fmt: skip
                attention_mask, position_ids, pixel_values = routed_mask, None, None
            granularity = None
        if pixel_values is not None:
            levels = granularity if granularity is not None else image_granularity
            encoded["image"] = self.get_image_features(pixel_values, image_grid_thw, levels, **capture)
        if pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, video_grid_thw, **capture)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        for name, token_id in (("image", self.config.image_token_id), ("video", self.config.video_token_id)):
            if name in encoded:
                features = torch.cat(tuple(encoded[name].pooler_output))  # (sum of tokens, D)
                inputs_embeds = self._scatter(inputs_embeds, input_ids, token_id, features, name)
        image_out = encoded.get("image")
        levels = getattr(image_out, "image_granularity", None)
        if position_ids is None:
            position_ids = self.compute_position_ids(
                input_ids, inputs_embeds, attention_mask, cache, image_grid_thw, video_grid_thw, levels,
                mm_token_type_ids,
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
        visual_tokens = None
        if image_out is not None:
            counts = [part.shape[0] for part in image_out.pooler_output]
            visual_tokens = torch.tensor(counts, dtype=torch.long, device=inputs_embeds.device)
            if levels is None:
                levels = torch.zeros_like(visual_tokens)
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
        labels,
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
        from_levels = self.resolve_granularity(image_granularity, image_grid_thw)
        check_grids(pixel_values, image_grid_thw, self.config.vision_config.spatial_merge_size, "image_grid_thw")
        image_out = self._encode(pixel_values, image_grid_thw, **capture)
        with torch.no_grad():
            levels = self.router_logits(
                input_ids,
                image_out.pooler_output,
                image_grid_thw,
                attention_mask,
                labels,
                image_granularity=from_levels,
            ).argmax(-1)
        merge, image_id = self.config.vision_config.spatial_merge_size, self.config.image_token_id
        mask = drop_surplus_placeholders(
            input_ids, attention_mask, image_grid_thw, from_levels, levels, image_id, merge
        )
        pad = self.config.text_config.pad_token_id
        dropped = (input_ids == image_id) & ~mask.bool()
        input_ids = input_ids.masked_fill(dropped, pad if pad is not None and pad != image_id else 0)
        return input_ids, mask, self.pool_image_outputs(image_out, image_grid_thw, levels)


def drop_empty(pixels: torch.Tensor | None, grid_thw: torch.LongTensor | None):
    """(None, None) for zero-row pixel values (what the processor returns for a text-only sample, so every sample
    of a batch has the same keys); the inputs unchanged otherwise."""
    if pixels is not None and pixels.shape[0] == 0 and (grid_thw is None or grid_thw.numel() == 0):
        return None, None
    return pixels, grid_thw


class NativeVLForConditionalGeneration(NativeVLPreTrainedModel, GenerationMixin):
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
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | NativeVLCausalLMOutputWithPast:
        """Arguments as `NativeVLModel.forward`; labels (batch, seq) with -100 on ignored tokens (shifted inside).
        Returns logits (batch, seq, vocab) (the last `logits_to_keep` positions when nonzero) and the mean loss,
        plus the level and the visual tokens of each image (`granularity="auto"`: see `NativeVLModel.forward`)."""
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
            labels=labels if isinstance(granularity, str) else None,
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
            self.model.rope_deltas = torch.zeros(text_ids.shape[0], 1, dtype=torch.long, device=text_ids.device)
            return text_ids.unsqueeze(0).expand(4, -1, -1)
        mask = model_kwargs.get("attention_mask")
        grids = model_kwargs.get("image_grid_thw")
        mrope_ids, self.model.rope_deltas = get_rope_index(
            input_ids,
            self.config,
            grids,
            model_kwargs.get("video_grid_thw"),
            mask if mask is not None and mask.dim() == 2 else None,
            self.model.resolve_granularity(model_kwargs.get("image_granularity"), grids),
            model_kwargs.get("mm_token_type_ids"),
        )
        return torch.cat([text_ids.unsqueeze(0).to(mrope_ids.device), mrope_ids], dim=0)  # (4, batch, seq)

    def generate(self, *args, granularity: str | int | torch.LongTensor | None = None, **kwargs):
        """`GenerationMixin.generate` plus `granularity`: None (full grids), an int level or per-image levels
        (the prompt's placeholders must already match, e.g. from `processor(..., granularity=...)`), or `"auto"`.

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
        """
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None and args and isinstance(args[0], torch.Tensor):
            input_ids, args = args[0], args[1:]
        for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            kept = drop_empty(kwargs.get(pixels), kwargs.get(grid))
            for key, value in zip((pixels, grid), kept, strict=True):
                if value is None:
                    kwargs.pop(key, None)
        if kwargs.get("position_ids") is not None and input_ids is not None:
            kwargs["position_ids"] = channels_first_position_ids(kwargs["position_ids"], *input_ids.shape[:2])
        if isinstance(granularity, str) and granularity != "auto":
            raise ValueError(f"granularity must be None, an int, per-image levels or 'auto', got {granularity!r}")
        grids = kwargs.get("image_grid_thw")
        if not isinstance(granularity, str):
            if granularity is not None and grids is not None:
                kwargs["image_granularity"] = self.model.resolve_granularity(granularity, grids)
            return super().generate(*args, input_ids=input_ids, **kwargs)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None or input_ids is None:  # nothing to route
            return super().generate(*args, input_ids=input_ids, **kwargs)
        from_levels = self.model.resolve_granularity(kwargs.pop("image_granularity", None), grids)
        mask = kwargs.get("attention_mask")
        with torch.no_grad():
            check_grids(pixel_values, grids, self.config.vision_config.spatial_merge_size, "image_grid_thw")
            image_out = self.model._encode(pixel_values, grids)
            levels = self.model.router_logits(
                input_ids, image_out.pooler_output, grids, mask, image_granularity=from_levels
            ).argmax(-1)
        pad = self.generation_config.pad_token_id
        pad = pad if pad is not None else (self.config.text_config.pad_token_id or 0)
        compact_ids, compact_mask = compact_image_placeholders(
            input_ids,
            mask,
            grids,
            from_levels,
            levels,
            self.config.image_token_id,
            self.config.vision_config.spatial_merge_size,
            int(pad if not isinstance(pad, torch.Tensor) else pad.flatten()[0]),
        )
        kwargs.pop("position_ids", None)  # the processor's ids describe the full grids; recomputed for the levels
        kwargs.pop("pixel_values")
        kwargs["attention_mask"] = compact_mask
        kwargs["image_granularity"] = levels
        kwargs["mm_encoder_outputs"] = {"image": self.model.pool_image_outputs(image_out, grids, levels)}
        out = super().generate(*args, input_ids=compact_ids, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        sequences = torch.cat([input_ids.to(sequences.device), sequences[:, compact_ids.shape[1] :]], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        out["image_granularity"] = levels
        return out


__all__ = [
    "NativeVLForConditionalGeneration",
    "NativeVLGranularityRouter",
    "NativeVLModel",
    "NativeVLPreTrainedModel",
    "NativeVLTextModel",
    "NativeVLVisionModel",
    "compact_image_placeholders",
    "get_rope_index",
    "level_grid",
    "pool_grid",
]
