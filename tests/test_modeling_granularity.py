"""Adaptive visual granularity (AVG-LLaVA, arXiv 2410.02745): scaler, M-RoPE of pooled grids, forced levels,
router per sample, `generate(granularity="auto")`, processor and packing at chosen levels."""

import copy
import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LEVELS, TinyVLTester
from PIL import Image
from test_training_packing import example

from nativevl import NativeVLForConditionalGeneration
from nativevl.modeling import NativeVLModel, level_grid, pool_grid
from nativevl.modeling.granularity_nativevl import compact_image_placeholders, drop_surplus_placeholders
from nativevl.modeling.positions_nativevl import pooled_grid_thw, repeat_per_grid, sum_per_image, tokens_per_image
from nativevl.processing.processing_nativevl import level_grid as processor_level_grid
from nativevl.processing.processing_nativevl import mrope_position_ids
from nativevl.testing import build_tiny
from nativevl.training.packing import PackingCollator
from nativevl.training.rglf import image_segments


def test_level_grid_golden_and_released_levels():
    # AVG-LLaVA's released levels for a 24x24 grid: 576, 288, 144, 72, 36 tokens
    assert [int(np.prod(level_grid(1, 24, 24, lv))) for lv in range(5)] == [576, 288, 144, 72, 36]
    assert [level_grid(1, 3, 5, lv) for lv in range(6)] == [(1, 3, 5), (1, 3, 3), (1, 2, 3), (1, 2, 2), (1, 1, 2)] + [
        (1, 1, 1)
    ]
    assert level_grid(1, 1, 1, 7) == (1, 1, 1)  # never below one token per row and column
    assert level_grid(2, 1, 6, 2) == (2, 1, 3)  # a side of 1 does not pool: the width step still halves
    for grid in [(1, 3, 5), (2, 7, 1), (1, 24, 24)]:
        for lv in range(6):
            assert processor_level_grid(*grid, lv) == level_grid(*grid, lv)


@pytest.mark.parametrize("grid", [(1, 3, 5), (2, 5, 3), (1, 1, 7), (1, 4, 4)])
def test_pool_grid_is_ceil_mode_average_pooling(grid):
    t, h, w = grid
    features = torch.randn(t * h * w, 6, dtype=torch.float64)
    reference = features.view(t, h, w, 6).permute(0, 3, 1, 2)  # (t, D, h, w) for avg_pool2d
    for level in range(5):
        pooled, out_grid = pool_grid(features, grid, level)
        assert out_grid == level_grid(t, h, w, level)
        assert pooled.shape == (int(np.prod(out_grid)), 6)
        torch.testing.assert_close(pooled.view(*out_grid, 6).permute(0, 3, 1, 2), reference, atol=1e-12, rtol=0)
        step = (1, 2) if level % 2 == 0 else (2, 1)
        if reference.shape[-1 if step == (1, 2) else -2] > 1:
            # a partial window at an odd edge averages only what it covers (no zero padding counted)
            reference = F.avg_pool2d(reference, step, step, ceil_mode=True, count_include_pad=False)


def test_pool_grid_values_by_hand():
    features = torch.arange(15, dtype=torch.float32).view(15, 1)  # 3x5 grid, raster order
    level1, grid1 = pool_grid(features, (1, 3, 5), 1)
    assert grid1 == (1, 3, 3)
    assert level1.flatten().tolist() == [0.5, 2.5, 4.0, 5.5, 7.5, 9.0, 10.5, 12.5, 14.0]
    level2, grid2 = pool_grid(features, (1, 3, 5), 2)
    assert grid2 == (1, 2, 3)
    assert level2.flatten().tolist() == [3.0, 5.0, 6.5, 10.5, 12.5, 14.0]


def test_mrope_ids_of_pooled_grids(tester):
    config = tester.nativevl_config()
    # (1, 4, 6) patches = 2x3 merged; level 1 -> 2x2, level 2 -> 1x2
    for level, (rows, cols) in [(1, (2, 2)), (2, (1, 2))]:
        batch = tester.batch([[2, ("image", (1, rows * 2, cols * 2)), 2]])
        levels = torch.tensor([level])
        positions, deltas = NativeVLModel(config).get_rope_index(
            batch["input_ids"], image_grid_thw=torch.tensor([[1, 4, 6]]), image_granularity=levels
        )
        n = rows * cols
        image = positions[:, 0, 3 : 3 + n]
        assert image[0].tolist() == [3] * n
        assert image[1].tolist() == [3 + r for r in range(rows) for _ in range(cols)]
        assert image[2].tolist() == [3 + c for _ in range(rows) for c in range(cols)]
        assert positions[:, 0, 3 + n].tolist() == [3 + max(rows, cols)] * 3  # vision_end after the pooled grid
        assert deltas.item() == int(positions.max()) + 1 - batch["input_ids"].shape[1]
        processor_ids = mrope_position_ids(
            batch["input_ids"].numpy(),
            batch["attention_mask"].numpy(),
            [[1, 4, 6]],
            [],
            tester.image_token_id,
            tester.video_token_id,
            2,
            [level],
        )
        assert np.array_equal(processor_ids, positions.numpy())
    assert pooled_grid_thw(torch.tensor([[1, 6, 10], [2, 2, 2]]), torch.tensor([2, 3]), 2).tolist() == [
        [1, 4, 6],
        [2, 2, 2],
    ]


def granularity_model() -> tuple[TinyVLTester, NativeVLForConditionalGeneration]:
    """A tester and a random tiny model with LEVELS levels and a small router (seeded)."""
    tester = TinyVLTester()
    torch.manual_seed(0)
    config = tester.nativevl_config(
        granularity=LEVELS, router_num_heads=4, router_top_k=4, router_intermediate_size=64
    )
    return tester, NativeVLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model():
    return granularity_model()


GRIDS = [(1, 6, 10), (1, 2, 6), (1, 4, 4)]  # merged 3x5, 1x3, 2x2


def pooled_batch(tester, levels, padding_side="left"):
    """A batch whose placeholders match `levels`, with the pixel values of the full GRIDS."""
    pooled = pooled_grid_thw(torch.tensor(GRIDS), torch.tensor(levels), 2).tolist()
    samples = [[5, ("image", pooled[0]), 3, ("image", pooled[1]), 4], [2, ("image", pooled[2]), 6]]
    batch = tester.batch(samples, padding_side=padding_side)
    batch["pixel_values"] = tester.pixel_values(GRIDS)
    batch["image_grid_thw"] = torch.tensor(GRIDS)
    return batch, torch.tensor(pooled)


@pytest.mark.parametrize("levels", [[1, 1, 1], [2, 0, 1]])
def test_forced_level_equals_pooled_features_by_hand(model, levels):
    tester, ours = model
    batch, pooled_grids = pooled_batch(tester, levels)
    granularity = levels[0] if len(set(levels)) == 1 else torch.tensor(levels)
    with torch.no_grad():
        out = ours(**batch, granularity=granularity)
        parts = ours.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        by_hand = torch.cat(
            [pool_grid(p, (t, h // 2, w // 2), lv)[0] for p, (t, h, w), lv in zip(parts, GRIDS, levels)]
        )
        embeds = ours.get_input_embeddings()(batch["input_ids"])
        mask = (batch["input_ids"] == tester.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, by_hand)
        # the pooled image is placed exactly as an image of the pooled grid would be
        positions, _ = ours.get_rope_index(batch["input_ids"], None, pooled_grids, None, batch["attention_mask"])
        expected = ours(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=positions).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], expected[keep], atol=1e-6, rtol=0)
    assert out.image_granularity.tolist() == levels
    assert out.visual_tokens.tolist() == [int(np.prod(g)) // 4 for g in pooled_grids.tolist()]


def test_level_zero_and_none_agree_and_mismatch_names_both_numbers(model):
    tester, ours = model
    batch, _ = pooled_batch(tester, [0, 0, 0])
    with torch.no_grad():
        full = ours(**batch)
        zero = ours(**batch, granularity=0)
    assert torch.equal(full.logits, zero.logits)
    assert full.image_granularity.tolist() == [0, 0, 0] and full.visual_tokens.tolist() == [15, 3, 4]
    with pytest.raises(ValueError, match="found 22 image tokens in the input but the images give 13 features"):
        ours(**batch, granularity=1)
    with pytest.raises(ValueError, match=r"granularity levels \[0, 3, 0\] must lie in 0..2"):
        ours(**batch, granularity=torch.tensor([0, 3, 0]))
    with pytest.raises(ValueError, match="granularity must be None, 'auto', an int level or per-image levels"):
        ours(**batch, granularity="best")


def test_router_logits_shape_and_gradient(model):
    tester, ours = model
    batch, _ = pooled_batch(tester, [0, 0, 0])
    features = torch.cat(ours.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    features = features.detach()
    logits = ours.model.router_logits(batch["input_ids"], features, batch["image_grid_thw"], batch["attention_mask"])
    assert logits.shape == (3, LEVELS)
    logits.logsumexp(-1).sum().backward()
    router = ours.model.granularity_router
    missing = [n for n, p in router.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    ours.zero_grad()
    assert not missing, missing


def fixed_router(ours, levels):
    """Makes the router pick `levels` (one per image) whatever the inputs."""
    logits = F.one_hot(torch.tensor(levels), LEVELS).float() * 10

    def router_logits(*args, **kwargs):
        return logits

    ours.model.router_logits = router_logits


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_compact_prompt_by_hand(model, padding_side):
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0], padding_side)
    small, _ = pooled_batch(tester, [2, 0, 1], padding_side)
    kept = drop_surplus_placeholders(
        full["input_ids"], full["attention_mask"], full["image_grid_thw"], None, torch.tensor([2, 0, 1]), 120, 2
    )
    ids, mask = compact_image_placeholders(full["input_ids"], full["attention_mask"], kept, 0)
    assert torch.equal(ids, small["input_ids"]) and torch.equal(mask, small["attention_mask"])


def test_generate_auto_equals_forced_levels_on_compacted_prompt(model):
    tester, ours = model
    levels = [2, 0, 1]
    full, _ = pooled_batch(tester, [0, 0, 0])
    small, _ = pooled_batch(tester, levels)
    try:
        fixed_router(ours, levels)
        auto = ours.generate(
            **full, granularity="auto", max_new_tokens=6, do_sample=False, return_dict_in_generate=True
        )
    finally:
        del ours.model.router_logits
    forced = ours.generate(**small, granularity=torch.tensor(levels), max_new_tokens=6, do_sample=False)
    prompt = full["input_ids"].shape[1]
    assert torch.equal(auto.sequences[:, :prompt], full["input_ids"])  # original prompt ids, then new tokens
    assert torch.equal(auto.sequences[:, prompt:], forced[:, small["input_ids"].shape[1] :])
    assert auto.image_granularity.tolist() == levels
    # the real router: generate with its own choice equals generate at the levels it reports; the vision tower
    # runs once (the router's features are reused at prefill)
    calls, vision = [], ours.model.visual.forward
    ours.model.visual.forward = lambda *a, **k: calls.append(1) or vision(*a, **k)
    try:
        auto = ours.generate(
            **full, granularity="auto", max_new_tokens=4, do_sample=False, return_dict_in_generate=True
        )
    finally:
        del ours.model.visual.forward
    assert len(calls) == 1
    chosen = auto.image_granularity.tolist()
    small, _ = pooled_batch(tester, chosen)
    no_cache = ours.generate(**small, granularity=torch.tensor(chosen), max_new_tokens=4, use_cache=False)
    assert torch.equal(auto.sequences[:, prompt:], no_cache[:, small["input_ids"].shape[1] :])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_forward_auto_masks_surplus_placeholders_and_matches_the_compacted_prompt(model, padding_side):
    tester, ours = model
    levels = [2, 0, 1]
    full, _ = pooled_batch(tester, [0, 0, 0], padding_side)
    small, _ = pooled_batch(tester, levels, padding_side)

    def text_labels(batch):  # every text token but the first of each row (left padding would predict it)
        first = batch["attention_mask"].cumsum(-1) == 1
        ignored = (batch["input_ids"] == tester.image_token_id) | (batch["attention_mask"] == 0) | first
        return batch["input_ids"].masked_fill(ignored, -100)

    labels = text_labels(full)
    try:
        fixed_router(ours, levels)
        with torch.no_grad():
            auto = ours(**full, granularity="auto", labels=labels)
    finally:
        del ours.model.router_logits
    with torch.no_grad():
        forced = ours(**small, granularity=torch.tensor(levels), labels=text_labels(small))
    assert auto.logits.shape[:2] == full["input_ids"].shape  # the sequence keeps its length
    assert auto.image_granularity.tolist() == levels and auto.visual_tokens.tolist() == [6, 3, 2]
    kept = auto.attention_mask.bool()
    assert kept.sum(-1).tolist() == small["attention_mask"].sum(-1).tolist()
    assert (full["input_ids"][full["attention_mask"].bool() & ~kept] == tester.image_token_id).all()
    # every kept position has the logits of the shortened prompt; the loss over the text is the same
    torch.testing.assert_close(auto.logits[kept], forced.logits[small["attention_mask"].bool()], atol=1e-5, rtol=0)
    torch.testing.assert_close(auto.loss, forced.loss, atol=1e-5, rtol=0)


def test_forward_auto_with_a_kv_cache_matches_no_cache(model):
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0])
    next_tokens = torch.tensor([[7], [9]])
    try:
        fixed_router(ours, [2, 0, 1])
        with torch.no_grad():
            prefill = ours(**full, granularity="auto", use_cache=True)
            mask = torch.cat([prefill.attention_mask, torch.ones_like(next_tokens)], dim=1)
            step = ours(input_ids=next_tokens, attention_mask=mask, past_key_values=prefill.past_key_values)
            longer = {**full, "input_ids": torch.cat([full["input_ids"], next_tokens], dim=1)}
            longer["attention_mask"] = torch.cat([full["attention_mask"], torch.ones_like(next_tokens)], dim=1)
            no_cache = ours(**longer, granularity="auto")
    finally:
        del ours.model.router_logits
    torch.testing.assert_close(step.logits[:, -1], no_cache.logits[:, -1], atol=1e-5, rtol=0)


def test_forward_auto_uses_the_router_and_refuses_packed_rows(model):
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0])
    with torch.no_grad():
        auto = ours(**full, granularity="auto")
        levels, _, _ = ours.model.choose_granularity(
            full["input_ids"], full["pixel_values"], full["image_grid_thw"], full["attention_mask"]
        )
        small, _ = pooled_batch(tester, levels.tolist())
        forced = ours(**small, granularity=levels)
    assert torch.equal(auto.image_granularity, levels)
    torch.testing.assert_close(
        auto.logits[auto.attention_mask.bool()], forced.logits[small["attention_mask"].bool()], atol=1e-5, rtol=0
    )
    text_only = tester.batch([[5, 6, 7]])
    with torch.no_grad():  # nothing to route: the plain forward
        assert torch.equal(ours(**text_only, granularity="auto").logits, ours(**text_only).logits)
    packed = {k: v for k, v in full.items() if k != "attention_mask"}
    packed["position_ids"] = torch.arange(full["input_ids"].shape[1]).expand_as(full["input_ids"])
    with pytest.raises(ValueError, match="packed rows"):
        ours(**packed, granularity="auto")


def noise(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(max_pixels=112 * 112, granularity=LEVELS)
    return model.eval(), processor


def test_processor_expands_for_levels_and_matches_model(tiny):
    model, processor = tiny
    images = [noise(60, 90, 0), noise(57, 57, 1)]
    text = ["<|image_pad|> one", "two <|image_pad|>"]
    full = processor(images=images, text=text)
    assert "image_granularity" not in full
    merged = [(t, h // 2, w // 2) for t, h, w in full["image_grid_thw"].tolist()]
    for granularity, levels in [(1, [1, 1]), ([2, 0], [2, 0])]:
        out = processor(images=images, text=text, granularity=granularity)
        assert out["image_granularity"].tolist() == levels
        n_tokens = (out["input_ids"] == processor.image_token_id).sum(-1).tolist()
        assert n_tokens == [int(np.prod(level_grid(*g, lv))) for g, lv in zip(merged, levels)]
        expected, _ = model.get_rope_index(
            out["input_ids"],
            None,
            out["image_grid_thw"],
            None,
            out["attention_mask"],
            image_granularity=out["image_granularity"],
        )
        assert torch.equal(out["position_ids"], expected.permute(1, 2, 0))  # processor ids are (batch, seq, 3)
        with torch.no_grad():
            given = model(**out).logits  # processor position ids and image_granularity
            computed = model(**{k: v for k, v in out.items() if k != "position_ids"}).logits
        torch.testing.assert_close(given, computed, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one per image"):
        processor(images=images, text=text, granularity=[1])


def test_pipeline_with_auto_granularity(tiny):
    from transformers import pipeline

    model, processor = tiny
    processor.tokenizer.padding_side = "left"
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    message = [
        {"role": "user", "content": [{"type": "image", "image": noise(80, 120, 3)}, {"type": "text", "text": "Hi?"}]}
    ]
    auto = pipe(text=message, max_new_tokens=4, generate_kwargs={"do_sample": False, "granularity": "auto"})
    assert auto[0]["generated_text"][-1]["role"] == "assistant"
    prompt = processor.apply_chat_template(message, add_generation_prompt=True)
    inputs = processor(images=[noise(80, 120, 3)], text=[prompt])
    out = model.generate(**inputs, granularity="auto", max_new_tokens=4, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert auto[0]["generated_text"][-1]["content"] == answer


def packed_examples(question: str = "What colour is it?"):
    return [
        example([noise(60, 90, 0)], "Read the text.", "hello"),
        example([], "Say hi.", "hi"),
        example([noise(30, 120, 1), noise(100, 40, 2)], question, "red"),
        example([noise(57, 57, 3)], "Which shape?", "circle"),
    ]


def test_router_decisions_are_per_sample_in_a_packed_batch(tiny):
    model, processor = tiny
    collator = PackingCollator(processor)
    logits = []
    for question in ("What colour is it?", "Count every letter on the left side please"):
        batch = collator(packed_examples(question))
        with torch.no_grad():
            _, router_logits, _ = model.model.choose_granularity(
                batch["input_ids"],
                batch["pixel_values"],
                batch["image_grid_thw"],
                instruction_mask=batch["labels"] == -100,
                cu_seq_lens_q=batch["cu_seq_lens_q"],
            )
        logits.append(router_logits)
    a, b = logits
    assert a.shape == (4, LEVELS)  # images: 1 + 2 + 1
    torch.testing.assert_close(a[[0, 3]], b[[0, 3]], atol=1e-5, rtol=0)  # other samples' images do not move
    assert (a[1:3] - b[1:3]).abs().max() > 1e-4  # the changed sample's images do
    # each sample alone gives the same logits as inside the packed row
    alone = collator([packed_examples()[2]])
    with torch.no_grad():
        _, single, _ = model.model.choose_granularity(
            alone["input_ids"],
            alone["pixel_values"],
            alone["image_grid_thw"],
            instruction_mask=alone["labels"] == -100,
        )
    torch.testing.assert_close(single, a[1:3], atol=1e-5, rtol=0)


def test_router_ignores_the_answer_tokens(tiny):
    model, processor = tiny
    collator = PackingCollator(processor)
    one, other = packed_examples(), packed_examples()
    other[3]["messages"][1]["content"][0]["text"] = "a square, quite certainly"
    logits = []
    for examples in (one, other):
        batch = collator(examples)
        with torch.no_grad():
            logits.append(
                model.model.choose_granularity(
                    batch["input_ids"],
                    batch["pixel_values"],
                    batch["image_grid_thw"],
                    instruction_mask=batch["labels"] == -100,
                    cu_seq_lens_q=batch["cu_seq_lens_q"],
                )[1]
            )
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def single_row(processor, sample: dict) -> dict:
    """One sample as a plain row with labels and attention mask (`PackingCollator`'s batch, its packing keys
    dropped), the input `forward(granularity="auto")` takes."""
    batch = PackingCollator(processor)([sample])
    keep = ("input_ids", "labels", "pixel_values", "image_grid_thw", "image_num_grids")
    return {k: batch[k] for k in keep} | {"attention_mask": torch.ones_like(batch["input_ids"])}


def test_router_reads_the_same_instruction_as_when_it_took_labels(tiny):
    # golden: the router logits of this labelled packed batch when `router_logits` / `forward` took `labels`
    # (before `instruction_mask`), so routers trained by RGLF decide as they did
    model, processor = tiny
    batch = PackingCollator(processor)(packed_examples())
    with torch.no_grad():
        levels, logits, _ = model.model.choose_granularity(
            batch["input_ids"],
            batch["pixel_values"],
            batch["image_grid_thw"],
            instruction_mask=batch["labels"] == -100,
            cu_seq_lens_q=batch["cu_seq_lens_q"],
        )
    golden = [
        [-0.064454, -0.852164, 0.916618],
        [0.267323, -0.935346, 0.668023],
        [-1.010620, 0.407210, 0.603410],
        [-0.823432, 0.555556, 0.267877],
    ]
    torch.testing.assert_close(logits, torch.tensor(golden), atol=1e-5, rtol=0)
    assert levels.tolist() == [2, 2, 2, 1]
    # forward(granularity="auto", labels=...) hands the router `labels == -100`: the same choice as asked directly
    sample = single_row(processor, packed_examples()[2])
    with torch.no_grad():
        auto = model(**sample, granularity="auto")
        chosen, _, _ = model.model.choose_granularity(
            sample["input_ids"],
            sample["pixel_values"],
            sample["image_grid_thw"],
            sample["attention_mask"],
            instruction_mask=sample["labels"] == -100,
        )
        unmasked, _, _ = model.model.choose_granularity(
            sample["input_ids"], sample["pixel_values"], sample["image_grid_thw"], sample["attention_mask"]
        )
    assert auto.image_granularity.tolist() == chosen.tolist() == [2, 2]  # as inside the packed row
    assert unmasked.tolist() == [2, 1]  # reading the answer too would change the choice


def test_repeat_per_grid_maps_images_to_their_grids():
    assert repeat_per_grid([1, 2], [3, 1], 4) == [1, 1, 1, 2]
    assert repeat_per_grid([0, 2, 1], None, 3) == [0, 2, 1]  # no counts: one grid per image
    assert sum_per_image(torch.tensor([1, 2, 3, 4]), torch.tensor([3, 1])).tolist() == [6, 4]
    with pytest.raises(ValueError, match=r"1 value\(s\) \[1\] for 2 image\(s\) \(image_num_grids \[3, 1\]\)"):
        repeat_per_grid([1], [3, 1], 4)
    with pytest.raises(ValueError, match=r"image_num_grids \[3, 2\] must be >= 1 each and add up to the 4 image"):
        repeat_per_grid([1, 2], [3, 2], 4)


def test_tokens_per_image_sums_each_images_grids_at_its_level():
    grids = torch.tensor(GRIDS)  # merged 3x5 (15 tokens), 1x3 (3), 2x2 (4)
    assert tokens_per_image(grids, None, None, 2).tolist() == [15, 3, 4]
    # level 1 pools the width: 3x3, 1x2, 2x1; level 2 also the height: 2x3, 1x2, 1x1
    assert tokens_per_image(grids, torch.tensor([1, 2, 0]), None, 2).tolist() == [9, 2, 4]
    # two images: the first owns the first two grids, each grid at its image's level
    assert tokens_per_image(grids, torch.tensor([2, 1]), torch.tensor([2, 1]), 2).tolist() == [6 + 2, 2]


def crop_mode(processor):
    """A copy of `processor` in crop mode with 56 px tiles: an image becomes a global view plus 2-4 tile grids."""
    crop = copy.deepcopy(processor)
    crop.image_processor.mode, crop.image_processor.crop_base_size = "crop", 56
    return crop


def test_crop_mode_levels_are_per_image(tiny):
    model, processor = tiny
    crop = crop_mode(processor)
    images = [noise(60, 90, 0), noise(57, 57, 1)]
    text = ["<|image_pad|> one", "two <|image_pad|>"]
    out = crop(images=images, text=text, granularity=[1, 0])
    num_grids = out["image_num_grids"].tolist()
    assert len(num_grids) == 2 and min(num_grids) > 1 and sum(num_grids) == out["image_grid_thw"].shape[0]
    assert out["image_granularity"].tolist() == [1, 0]  # one level per image, not per tile
    merged = [(t, h // 2, w // 2) for t, h, w in out["image_grid_thw"].tolist()]
    per_grid = [1] * num_grids[0] + [0] * num_grids[1]
    tokens = [int(np.prod(level_grid(*g, lv))) for g, lv in zip(merged, per_grid)]
    placeholders = (out["input_ids"] == crop.image_token_id).sum(-1).tolist()
    assert placeholders == [sum(tokens[: num_grids[0]]), sum(tokens[num_grids[0] :])]
    with torch.no_grad():
        given = model(**out)
        computed = model(**{k: v for k, v in out.items() if k != "position_ids"})
    assert given.image_granularity.tolist() == [1, 0] and given.visual_tokens.tolist() == placeholders
    torch.testing.assert_close(given.logits, computed.logits, atol=1e-6, rtol=0)
    with pytest.raises(
        ValueError, match=rf"granularity gives 3 level\(s\) but there are 2 image\(s\) in {sum(num_grids)} grid"
    ):
        model(**out, granularity=[1, 0, 0])


def test_crop_mode_generate_takes_one_level_per_image(tiny):
    model, processor = tiny
    crop = crop_mode(processor)
    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    prompt = crop.apply_chat_template(message, add_generation_prompt=True)
    batch = crop(images=[noise(60, 90, 0)], text=[prompt], granularity=1)
    n_grids = batch["image_grid_thw"].shape[0]
    assert batch["image_num_grids"].tolist() == [n_grids] and n_grids > 1
    per_image = model.generate(**batch, granularity=[1], max_new_tokens=4, do_sample=False)
    # the same tiles with their levels spelled out, one per grid (no image_num_grids: every grid its own image)
    tiles = {k: v for k, v in batch.items() if k not in ("image_num_grids", "image_granularity")}
    per_grid = model.generate(**tiles, granularity=[1] * n_grids, max_new_tokens=4, do_sample=False)
    assert torch.equal(per_image, per_grid)
    full = crop(images=[noise(60, 90, 0)], text=[prompt])
    auto = model.generate(**full, granularity="auto", max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert auto.image_granularity.shape == (1,)  # the router decides once for the image and its tiles


def test_router_averages_the_grids_of_an_image(tiny):
    model, processor = tiny
    batch = crop_mode(processor)(images=[noise(60, 90, 0), noise(57, 57, 1)], text=["<|image_pad|> a <|image_pad|>"])
    with torch.no_grad():
        features = torch.cat(
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        )
        args = (batch["input_ids"], features, batch["image_grid_thw"], batch["attention_mask"])
        per_grid = model.model.router_logits(*args)
        per_image = model.model.router_logits(*args, image_num_grids=batch["image_num_grids"])
    first = batch["image_num_grids"][0]
    assert per_grid.shape[0] == batch["image_grid_thw"].shape[0] and per_image.shape[0] == 2
    torch.testing.assert_close(per_image, torch.stack([per_grid[:first].mean(0), per_grid[first:].mean(0)]))


def test_packing_in_crop_mode_keeps_per_image_fields_aligned(tiny):
    model, processor = tiny
    collator = PackingCollator(crop_mode(processor), granularity_training="random", num_levels=LEVELS, seed=1)
    batch = collator(packed_examples())
    num_grids = batch["image_num_grids"].tolist()
    assert len(num_grids) == len(batch["image_granularity"]) == 4  # images: 1 + 0 + 2 + 1
    assert sum(num_grids) == batch["image_grid_thw"].shape[0] > 4
    level0 = PackingCollator(crop_mode(processor), granularity=0)(packed_examples())  # RGLF's base batch
    assert image_segments(level0, model.config).tolist() == [0, 2, 2, 3]  # the sample of each image
    with torch.no_grad():
        out = model(**batch)
    assert out.image_granularity.tolist() == batch["image_granularity"].tolist() and torch.isfinite(out.loss)
    assert out.visual_tokens.sum() == (batch["input_ids"] == processor.image_token_id).sum()


@pytest.mark.parametrize("mode", ["random", "all"])
def test_packing_at_granularity_levels(tiny, mode):
    model, processor = tiny
    collator = PackingCollator(processor, granularity_training=mode, num_levels=LEVELS, seed=0)
    batch = collator(packed_examples())
    levels = batch["image_granularity"].tolist()
    if mode == "all":
        # 3 samples with images appear once per level, the text-only sample once
        assert len(batch["cu_seq_lens_q"]) - 1 == 3 * LEVELS + 1
        assert levels == [0, 1, 2, 0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert len(levels) == batch["image_grid_thw"].shape[0]
    n_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    merged = [(t, h // 2, w // 2) for t, h, w in batch["image_grid_thw"].tolist()]
    assert n_tokens == sum(int(np.prod(level_grid(*g, lv))) for g, lv in zip(merged, levels))
    with torch.no_grad():
        out = model(**batch)
    assert out.image_granularity.tolist() == levels and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="needs num_levels"):
        PackingCollator(processor, granularity_training="all")


def test_bench_granularity_smoke_reports_every_setting(capsys, tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_granularity.py"
    main = runpy.run_path(str(script))["main"]
    argv = ["--smoke", "--limit", "8", "--batch-size", "4", "--items-out", str(tmp_path / "items.jsonl")]
    assert main([*argv, "--fallback-threshold", "0.9"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if line.count("|") == 2}
    assert {"full", "level 0", "level 1", "level 2", "router", "cascade", "router+fb"} <= rows.keys()
    for name in ("cascade", "router+fb"):  # the frontier, worked out from the answers, agrees with generate's run
        measured = rows[name].split("|")[1].split()[2]
        frontier = out.split(f"{name} at other thresholds")[1]
        assert re.search(rf"threshold 0\.90: +{measured} tokens per item", frontier), (measured, frontier)
    full, *levels = (float(rows[k].split("|")[1].split()[2]) for k in ("full", "level 0", "level 1", "level 2"))
    assert full == levels[0] > levels[1] > levels[2]  # the "all" column of visual tokens per item
    per_content = [line for line in out.splitlines() if line.count("|") == 3 and "content" not in line]
    routed = sum(int(n) for line in per_content for n in re.findall(r"\d+: (\d+)", line.split("|")[3]))
    assert routed == sum(int(line.split("|")[1]) for line in per_content) == 8
    assert re.search(r"router uses -?\d+\.\d% fewer visual tokens", out) and "prefill time router / full" in out
    by_content = out.split("visual tokens per item, by content:\n")[1].split("\n\n")[0].splitlines()
    assert by_content[0].split() == ["content", "kind", "items", "full", "oracle", "router", "cascade", "router+fb"]
    assert sum(int(line.split()[2]) for line in by_content[1:]) == 8
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    names = {"full", "0", "1", "2", "router", "cascade", "router+fb"}
    assert len(items) == 8 and all(set(item["settings"]) == names for item in items)
    assert all(0 <= item["settings"]["cascade"]["confidence"] <= 1 for item in items)
    assert [item["settings"]["2"]["tokens"] <= item["settings"]["full"]["tokens"] for item in items] == [True] * 8


def test_bench_granularity_fallback_frontier_by_hand():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_granularity.py"
    fallback_frontier = runpy.run_path(str(script))["fallback_frontier"]
    full = {"score": 1.0, "tokens": 30}
    items = [
        {"settings": {"full": full, "2": {"score": 1.0, "tokens": 9, "level": 2, "confidence": 0.95}}},
        {"settings": {"full": full, "2": {"score": 0.0, "tokens": 9, "level": 2, "confidence": 0.4}}},
        {"settings": {"full": full, "2": {"score": 0.0, "tokens": 30, "level": 0, "confidence": 0.1}}},  # at full
    ]
    rows = fallback_frontier(items, "2", [0.0, 0.5, 1.0])
    assert rows[0] == (0.0, 48 / 3, 100 / 3)  # no fallback
    assert rows[1] == (0.5, (9 + 39 + 30) / 3, 200 / 3)  # item 1 answered again: both passes paid
    assert rows[2] == (1.0, (39 + 39 + 30) / 3, 200 / 3)  # item 2 is on the full grid already


def test_bench_granularity_oracle_takes_the_coarsest_level_as_good_as_the_full_grid():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_granularity.py"
    namespace = runpy.run_path(str(script))
    oracle_choice, tokens_by_content = namespace["oracle_choice"], namespace["tokens_by_content"]

    def item(content, kind, scores, cascade_tokens):  # scores at full, 0, 1, 2 (the full grid has 30 tokens)
        settings = {
            name: {"score": s, "tokens": n} for name, s, n in zip(("full", "0", "1", "2"), scores, (30, 30, 16, 9))
        }
        extra = {"router": {"score": 1.0, "tokens": 16}, "cascade": {"score": 1.0, "tokens": cascade_tokens}}
        return {"content": content, "kind": kind, "settings": settings | extra}

    items = [
        item("code", "rc", (1.0, 1.0, 1.0, 1.0), 9),  # read at every level
        item("code", "rc", (1.0, 1.0, 0.0, 0.0), 39),  # only at level 0 (the cascade paid both passes)
        item("shape", "sc", (0.0, 0.0, 1.0, 0.0), 9),  # by none but level 1: the coarsest as good as full is 2
    ]
    assert [oracle_choice(i["settings"], levels=3)["tokens"] for i in items] == [9, 30, 9]
    assert oracle_choice(items[1]["settings"], levels=2) == items[1]["settings"]["0"]
    assert tokens_by_content(items, levels=3) == {
        ("code", "rc"): {"full": 30, "oracle": 19.5, "router": 16, "cascade": 24, "items": 2},
        ("shape", "sc"): {"full": 30, "oracle": 9, "router": 16, "cascade": 9, "items": 1},
    }
