"""nativevl's vision tower: a NaViT-style ViT over packed native-resolution images, with Qwen2-VL's 2x2 merger.

Mirrors transformers' `models/qwen2_vl/modeling_qwen2_vl.py` (`Qwen2VisionTransformerPretrainedModel`, same
parameter names, so weights map one to one): Conv3d patch embedding (kernel = stride = (2, 14, 14), no bias),
pre-norm blocks with 2D RoPE (half of each head's rotary pairs for the row, half for the column; no absolute
position table), attention within each image of the packed sequence (`cu_seqlens`), and the merger (LayerNorm,
4 rows viewed as one, Linear-GELU-Linear). All images of a batch run as one sequence; the kernel is chosen by
`attention_nativevl.vision_attention_backend`.

This file is remote code: it imports only torch, transformers and single-dot siblings.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.output_capturing import capture_outputs

from .attention_nativevl import NativeVLAttentionSupport, flash_attn_varlen_func, varlen_attn, vision_attention_backend
from .configuration_nativevl import NativeVLVisionConfig


logger = logging.get_logger(__name__)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the GPT-NeoX layout used by Qwen2-VL: channel i pairs with channel i + d/2.

    x: (N, ..., d) in any float dtype; cos, sin: (N, d/2) float32, broadcast over the middle dims. Returns a new
    contiguous float32 tensor shaped like x: (x1 * cos - x2 * sin, x2 * cos + x1 * sin). Without autograd it runs
    four fused kernels into one buffer instead of materialising `rotate_half` (same values as transformers' float32
    path); `out=` kernels cannot be differentiated, so training takes the plain expression, and so does a
    compiled graph (inductor fuses it anyway, and cannot lower `out=` writes into slices of a buffer).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cos.view(shape), sin.view(shape)
    if (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
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

    `attn_implementation` picks the kernel (`vision_attention_backend`): on CUDA in fp16/bf16 one varlen call over
    the whole packed sequence (flash-attn's for `flash_attention_2`, torch's own `varlen_attn` for `sdpa`);
    otherwise, and always for `eager`, one call per run of equal-length segments (consecutive video frames or crop
    tiles share one batched call). Either way memory grows with the sum of per-image squares, not the square of
    the total.
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
        `output_attentions` (eager only: the fused kernels never form the weights; other backends warn once and
        return None, as transformers' sdpa attention does), one (count, H, L, L) float tensor of softmax weights per
        run of equal-length segments, None otherwise."""
        n = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).view(n, 3, self.num_heads, self.head_dim)  # (N, 3, H, d)
        q, k = apply_rotary(qkv[:, :2], *position_embeddings).to(qkv.dtype).unbind(1)  # (N, H, d) each
        v = qkv[:, 2]  # (N, H, d)

        impl = self.config._attn_implementation or "sdpa"
        if output_attentions and impl != "eager":
            # as transformers' sdpa attention does (integrations/sdpa_attention.py): warn once, return no weights
            logger.warning_once(
                f"`{impl}` attention does not support `output_attentions=True`. Please set your attention to `eager` "
                "if you want any of these features (the vision tower returns no attention weights)."
            )
            output_attentions = False
        backend = vision_attention_backend(impl, q)
        if backend == "flash_varlen":
            out = flash_attn_varlen_func(
                q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=self.scaling, causal=False
            )  # (N, H, d)
        elif backend == "torch_varlen":
            out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=self.scaling)  # (N, H, d)
        else:
            out = torch.empty_like(v)  # (N, H, d)
            kept = [] if output_attentions else None
            for start, length, count in segment_runs:
                end = start + length * count
                # (count*L, H, d) -> (count, L, H, d) -> (count, H, L, d), views
                qs, ks, vs = (t[start:end].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
                o, weights = self._segment_attention(qs, ks, vs, eager=backend == "eager")  # (count, H, L, d)
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


@dataclass
class NativeVLVisionModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` of the vision tower / `get_image_features`: `last_hidden_state` (num_patches,
    embed_dim); `pooler_output` (num_patches / 4, width) from the tower, or a tuple with one (tokens_i, LLM width)
    tensor per grid from `get_image_features` (pooled to its image's granularity level when one was given);
    `hidden_states` / `attentions` when requested (attentions: per layer a tuple of (count, heads, L, L) weights,
    one per run of equal-length segments, eager only); `image_granularity` (num_images,) long: the level of each
    image (None: level 0); `image_num_grids` (num_images,) long: the grids of each image (None: one per image)."""

    image_granularity: torch.LongTensor | None = None
    image_num_grids: torch.LongTensor | None = None


class NativeVLVisionModel(NativeVLAttentionSupport, PreTrainedModel):
    """The packed ViT with its merger: pixel patches of many images in, LLM-width (or merger-width) tokens out."""

    config: NativeVLVisionConfig
    config_class = NativeVLVisionConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
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
        `output_attentions` (the weights need eager attention; other backends warn once and return none).
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


def drop_empty(pixels: torch.Tensor | None, grid_thw: torch.LongTensor | None):
    """(None, None) for zero-row pixel values (what the processor returns for a text-only sample, so every sample
    of a batch has the same keys); the inputs unchanged otherwise."""
    if pixels is not None and pixels.shape[0] == 0 and (grid_thw is None or grid_thw.numel() == 0):
        return None, None
    return pixels, grid_thw


__all__ = [
    "NativeVLVisionModel",
    "NativeVLVisionModelOutput",
    "check_grids",
    "drop_empty",
    "vision_patch_positions",
    "vision_segments",
]
