"""Attention backends of nativevl's model: one chooser for the ViT, one registered backend for the decoder.

- The ViT attends within each image (video frame, crop tile) of a packed sequence. `vision_attention_backend`
  turns the config's `attn_implementation` into the kernel that runs: flash-attn's varlen call
  (`flash_attention_2`, which raises when flash-attn or a CUDA fp16/bf16 input is missing), torch's own varlen
  kernel (`sdpa` / `nativevl_varlen` on CUDA fp16/bf16, torch >= 2.10), or one sdpa / eager call per run of
  equal-length segments. A backend the ViT has no path for (`flex_attention`, custom ones) runs sdpa after one
  warning naming it: never a silent swap.
- The decoder is transformers' Qwen2-VL text model, dispatching through `AttentionInterface`;
  `register_attention()` adds `attn_implementation="nativevl_varlen"` (causal attention per packed segment),
  called explicitly by `NativeVLPreTrainedModel.__init__` and by `import nativevl`.

This file is remote code: it imports only torch and transformers (flash-attn behind an availability check).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import is_flash_attn_2_available, logging


logger = logging.get_logger(__name__)

if is_flash_attn_2_available():
    from flash_attn import flash_attn_varlen_func
else:
    flash_attn_varlen_func = None

try:  # torch >= 2.10: FlashAttention varlen kernel inside torch (CUDA, fp16/bf16)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


class NativeVLAttentionSupport:
    """Attention flags shared by every nativevl model class (mixed in before `PreTrainedModel`)."""

    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True  # the decoder takes transformers' BlockMask (document mask for packed rows)
    _supports_attention_backend = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from the module source; every attention here reads `config._attn_implementation` at
        # call time (the decoder through AttentionInterface), so `set_attn_implementation` always applies
        return True


def vision_attention_backend(impl: str | None, query: torch.Tensor) -> str:
    """The ViT kernel for `attn_implementation` `impl` and a query (N, H, d): "flash_varlen", "torch_varlen",
    "sdpa" (one call per run of equal-length segments) or "eager". Raises for `flash_attention_2` without
    flash-attn or on a CPU / fp32 input; warns once for a backend the ViT has no path for."""
    impl = impl or "sdpa"
    half_on_cuda = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if impl == "eager":
        return "eager"
    if impl == "flash_attention_2":
        if flash_attn_varlen_func is None or not half_on_cuda:
            installed = flash_attn_varlen_func is not None
            raise ValueError(
                f"attn_implementation='flash_attention_2' needs flash-attn (installed: {installed}) and a CUDA "
                f"fp16/bf16 input (got {query.device}, {query.dtype}); use 'sdpa' otherwise"
            )
        return "flash_varlen"
    if impl in ("sdpa", "nativevl_varlen"):
        return "torch_varlen" if half_on_cuda and varlen_attn is not None else "sdpa"
    logger.warning_once(f"the vision tower has no {impl!r} attention path: it runs sdpa within each image")
    return "sdpa"


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


_REGISTERED = False


def register_attention() -> None:
    """Makes `attn_implementation="nativevl_varlen"` known to transformers (masks as sdpa's). Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("nativevl_varlen", varlen_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("nativevl_varlen", sdpa_mask)
    _REGISTERED = True


__all__ = [
    "NativeVLAttentionSupport",
    "register_attention",
    "varlen_sdpa_attention",
    "vision_attention_backend",
]
