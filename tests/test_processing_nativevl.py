"""NativeVLProcessor: placeholder expansion, position ids equal to the model's, token budgets, chat template."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nativevl.testing import build_tiny


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["mrope", "1d"])
def tiny(request):
    return build_tiny(position_scheme=request.param, max_pixels=224 * 224)


def prompts(processor, image_counts: list[int], video_counts=None) -> list[str]:
    video_counts = video_counts or [0] * len(image_counts)
    conversations = []
    for n_images, n_videos in zip(image_counts, video_counts, strict=True):
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
        conversations.append([{"role": "user", "content": content + [{"type": "text", "text": "What is it?"}]}])
    return processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_position_ids_equal_the_models(tiny, padding_side):
    model, processor = tiny
    images = [[noise(61, 117, 0), noise(300, 45, 1)], [], [noise(29, 29, 2)]]
    video = [noise(90, 120, s) for s in range(3)]
    inputs = processor(
        images=images,
        videos=[video],
        text=prompts(processor, [2, 0, 1], [0, 1, 0]),
        padding_side=padding_side,
    )
    if model.config.position_scheme == "1d":
        expected = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    else:
        expected, _ = model.get_rope_index(
            inputs["input_ids"],
            None,
            inputs["image_grid_thw"],
            inputs["video_grid_thw"],
            inputs["attention_mask"],
        )
        expected = expected.permute(1, 2, 0)  # the processor's batch-first (batch, seq, 3)
    assert torch.equal(inputs["position_ids"], expected)
    with torch.no_grad():
        given_ids = model(**inputs).logits
        inputs.pop("position_ids")
        computed = model(**inputs).logits
    assert torch.equal(given_ids, computed)


def test_placeholder_count_mismatch_names_the_numbers(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"holds 2 <\|image_pad\|> placeholder\(s\) \[2\] per sample but 1 image"):
        processor(images=[noise(56, 56)], text=prompts(processor, [2]))


def test_token_budget_scales_images_down_not_tokens(tiny):
    _, processor = tiny
    big = [noise(400, 600, 0), noise(500, 300, 1)]
    text = prompts(processor, [2, 1])
    free = processor(images=[big, [noise(64, 64, 2)]], text=text)
    capped = processor(images=[big, [noise(64, 64, 2)]], text=text, max_image_tokens=60)
    tokens_per_grid = (capped["image_grid_thw"].prod(-1) // 4).tolist()
    assert sum(tokens_per_grid[:2]) <= 60 < sum((free["image_grid_thw"].prod(-1) // 4)[:2].tolist())
    assert capped["image_grid_thw"][2].tolist() == free["image_grid_thw"][2].tolist()  # the small one untouched
    image_token_id = processor.image_token_id
    assert int((capped["input_ids"] == image_token_id).sum()) == sum(tokens_per_grid)
    with pytest.raises(ValueError, match="over max_image_tokens=1"):
        processor(images=[big, [noise(64, 64, 2)]], text=text, max_image_tokens=1)


def test_chat_template_marks_assistant_tokens(tiny):
    _, processor = tiny
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": noise(56, 84)}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    )
    out = processor.apply_chat_template(
        [conversation], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    mask = out["assistant_masks"][0].bool()
    assert processor.tokenizer.decode(out["input_ids"][0][mask]) == "red<|im_end|>"
    assert int((out["input_ids"] == processor.image_token_id).sum()) == int(out["image_grid_thw"].prod() // 4)


def test_crop_mode_tiles_share_one_placeholder(tiny):
    model, processor = tiny
    image = noise(200, 500)
    inputs = processor(
        images=[image], text=prompts(processor, [1]), images_kwargs={"mode": "crop", "crop_base_size": 56}
    )
    grids = inputs["image_grid_thw"]
    assert len(grids) > 1  # global view + tiles, all for one image
    assert inputs["image_num_grids"].tolist() == [len(grids)]  # one entry per image: its grids
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == int(grids.prod(-1).sum() // 4)
    assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum()) == 1
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@settings(deadline=None, max_examples=25)
@given(
    sizes=st.lists(
        st.tuples(st.integers(1, 300), st.integers(1, 300)).filter(lambda s: max(s) <= 200 * min(s)),
        min_size=1,
        max_size=3,
    ),
    mode=st.sampled_from(["native", "fixed", "crop"]),
)
def test_placeholder_expansion_matches_grids(sizes, mode):
    _, processor = build_tiny(max_pixels=224 * 224)
    images = [noise(h, w, i) for i, (h, w) in enumerate(sizes)]
    kwargs = {"mode": mode, "fixed_pixels": 112 * 112, "crop_base_size": 56}
    inputs = processor(images=images, text=prompts(processor, [len(images)]), images_kwargs=kwargs)
    n_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert n_tokens == int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert n_tokens == sum(processor.image_processor.num_image_tokens(h, w, kwargs) for h, w in sizes)
    assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod(-1).sum())
    assert len(inputs["image_num_grids"]) == len(images)
    assert int(inputs["image_num_grids"].sum()) == len(inputs["image_grid_thw"])


def test_processing_positions_are_generated_from_the_models(tmp_path):
    """One source of grids, token counts and M-RoPE ids: the processor's file is generated from the model's
    (`python -m nativevl.modeling.sync_copies`), each of its functions the model's source unchanged, and an edit
    of the source makes the copy stale."""
    import ast
    import shutil
    from pathlib import Path

    import nativevl
    from nativevl.modeling import sync_copies

    root = Path(nativevl.__file__).parent
    copy_path = root / "processing" / "processing_positions_nativevl.py"
    assert sync_copies.stale_copies(root) == [], "run `python -m nativevl.modeling.sync_copies`"
    assert sync_copies.main(["--check"]) == 0
    copy = copy_path.read_text()
    source = (root / "modeling" / "positions_nativevl.py").read_text()
    assert copy.startswith('"""GENERATED from modeling/positions_nativevl.py by `python -m nativevl.modeling.sync')
    functions = [n for n in ast.parse(copy).body if isinstance(n, ast.FunctionDef)]
    assert {"batch_mrope_positions", "grid_token_counts", "placeholder_kinds"} <= {n.name for n in functions}
    for node in functions:
        assert ast.get_source_segment(copy, node) in source, node.name
    for folder in ("modeling", "processing"):
        shutil.copytree(root / folder, tmp_path / folder)
    edited = tmp_path / "modeling" / "positions_nativevl.py"
    edited.write_text(source.replace("rounding up", "rounding up (edited)"))
    assert sync_copies.stale_copies(tmp_path) == [tmp_path / "processing" / "processing_positions_nativevl.py"]
