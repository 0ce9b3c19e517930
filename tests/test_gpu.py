"""CUDA paths (bf16 varlen attention in the ViT and the decoder); skipped without a GPU."""

import pytest
import torch
from test_training_packing import examples

from nativevl.testing import build_tiny
from nativevl.training import PackingCollator


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_varlen_vision_equals_per_image_loop_bf16():
    model, processor = build_tiny(max_pixels=224 * 224)
    model = model.to("cuda", torch.bfloat16).eval()
    batch = PackingCollator(processor)(examples())
    pixel_values, grids = batch["pixel_values"].to("cuda", torch.bfloat16), batch["image_grid_thw"].to("cuda")
    with torch.no_grad():
        varlen = model.model.visual(pixel_values, grids).pooler_output  # one varlen call
        model.set_attn_implementation("eager")  # per-image loop
        loop = model.model.visual(pixel_values, grids).pooler_output
    torch.testing.assert_close(varlen.float(), loop.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("attn", ["nativevl_varlen", "sdpa"])
def test_packed_equals_each_sample_alone_bf16(attn):
    model, processor = build_tiny(max_pixels=224 * 224)
    model = model.to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation(attn)
    collator = PackingCollator(processor)
    on_gpu = lambda b: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    with torch.no_grad():
        packed = model(**on_gpu(collator(examples()))).logits[0].float()
        start = 0
        for example in examples():
            alone = model(**on_gpu(collator([example]))).logits[0].float()
            torch.testing.assert_close(packed[start : start + alone.shape[0]], alone, atol=5e-2, rtol=5e-2)
            start += alone.shape[0]
