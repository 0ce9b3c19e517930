"""Confidence fallback (nativevl's addition to AVG): `generate(granularity="cascade" | "auto",
fallback_threshold=T)` answers at the first pass's levels and again on the full grid where an answer token's
probability is below T; each sample ends with exactly the answer of its own pass, whatever its neighbours do."""

import dataclasses

import pytest
import torch
from conftest import chat
from test_modeling_granularity import GRIDS, LEVELS, crop_mode, fixed_router, granularity_model, noise, pooled_batch

from nativevl import NativeVLForConditionalGeneration
from nativevl.modeling.generation_nativevl import NativeVLGenerateBeamOutput, NativeVLGenerateOutput
from nativevl.modeling.granularity_nativevl import answer_confidence, image_rows
from nativevl.modeling.positions_nativevl import pooled_grid_thw


NEW = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def model():
    return granularity_model()


def answers_at(tester, ours, levels):
    """Each row's generated tokens with its images forced to `levels` (one per image of GRIDS)."""
    batch, _ = pooled_batch(tester, levels)
    out = ours.generate(**batch, granularity=torch.tensor(levels), **NEW)
    return out[:, batch["input_ids"].shape[1] :]


def tokens_at(levels):
    """Placeholders per image of GRIDS at `levels`."""
    pooled = pooled_grid_thw(torch.tensor(GRIDS), torch.tensor(levels), 2)
    return (pooled.prod(-1) // 4).tolist()


def fallback(ours, batch, granularity, threshold):
    out = ours.generate(
        **batch, granularity=granularity, fallback_threshold=threshold, return_dict_in_generate=True, **NEW
    )
    return out, out.sequences[:, batch["input_ids"].shape[1] :]


def test_answer_confidence_by_hand():
    probs = torch.tensor(
        [
            [[0.05, 0.9, 0.03, 0.02], [0.5, 0.1, 0.2, 0.2], [0.1, 0.2, 0.3, 0.4]],  # step 0
            [[0.2, 0.1, 0.6, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.8, 0.05, 0.05]],  # step 1
            [[0.1, 0.1, 0.7, 0.1], [0.1, 0.8, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25]],  # step 2
        ]
    ).transpose(0, 1)  # (batch 3, steps 3, V 4)
    logits = tuple(probs[:, step].log() + 3.0 for step in range(3))  # any shift: softmax gives probs back
    tokens = torch.tensor([[1, 2, 3], [0, 1, 1], [3, 2, 0]])  # row 0 ends at step 1 (token 2 = end)
    confidence = answer_confidence(logits, tokens, end_token_ids=[2])
    # row 0: 0.9, 0.6 then past its end; row 1: 0.5, 0.7, 0.8; row 2: 0.4, then the end token 0.05 counts
    torch.testing.assert_close(confidence, torch.tensor([0.6, 0.5, 0.05]))
    assert answer_confidence((), torch.zeros(2, 0, dtype=torch.long), [2]).tolist() == [1.0, 1.0]


def test_image_rows_at_any_expansion(model):
    tester, _ = model
    for levels in ([0, 0, 0], [2, 0, 1]):
        batch, _ = pooled_batch(tester, levels)
        rows = image_rows(batch["input_ids"], batch["image_grid_thw"], torch.tensor(levels), None, 120, 2)
        assert rows.tolist() == [0, 0, 1]  # row 0 holds images 0 and 1, row 1 image 2


def test_cascade_answers_coarse_or_full(model):
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0])
    coarse, whole = answers_at(tester, ours, [2, 2, 2]), answers_at(tester, ours, [0, 0, 0])
    assert not torch.equal(coarse, whole)  # the levels answer differently, so the test tells the passes apart
    out, new = fallback(ours, full, "cascade", 0.0)  # no answer is below probability 0
    assert torch.equal(new, coarse) and out.fallback.tolist() == [False, False]
    assert out.image_granularity.tolist() == [2, 2, 2] and out.visual_tokens.tolist() == tokens_at([2, 2, 2])
    assert torch.equal(out.sequences[:, : full["input_ids"].shape[1]], full["input_ids"])  # the original prompt
    out, new = fallback(ours, full, "cascade", 1.0)  # every answer is below 1: all on the full grid
    assert torch.equal(new, whole) and out.fallback.tolist() == [True, True]
    assert out.image_granularity.tolist() == [0, 0, 0]
    both = [a + b for a, b in zip(tokens_at([2, 2, 2]), tokens_at([0, 0, 0]), strict=True)]
    assert out.visual_tokens.tolist() == both  # the tokens of both passes
    default = ours.generate(**full, granularity="cascade", return_dict_in_generate=True, **NEW)
    expected = [c < 0.9 for c in default.confidence.tolist()]  # config.cascade_threshold's default
    assert default.fallback.tolist() == expected
    try:  # the threshold a calibration wrote into the config (evaluation/calibrate.py)
        ours.config.cascade_threshold = default.confidence.mean().item()
        calibrated = ours.generate(**full, granularity="cascade", return_dict_in_generate=True, **NEW)
        assert calibrated.fallback.tolist() == [c < ours.config.cascade_threshold for c in default.confidence]
        assert calibrated.fallback.tolist() in ([True, False], [False, True])
    finally:
        ours.config.cascade_threshold = 0.9


def test_fallback_answers_only_the_unsure_sample_again(model):
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0])
    coarse, whole = answers_at(tester, ours, [2, 2, 2]), answers_at(tester, ours, [0, 0, 0])
    first, _ = fallback(ours, full, "cascade", 0.0)
    low, high = first.confidence.argmin().item(), first.confidence.argmax().item()
    assert low != high
    out, new = fallback(ours, full, "cascade", first.confidence.mean().item())
    assert out.fallback.tolist() == [b == low for b in range(2)]
    assert torch.equal(new[low, : whole.shape[1]], whole[low]) and torch.equal(
        new[high, : coarse.shape[1]], coarse[high]
    )
    # padding after a shorter answer is the pad token
    pad = ours.generation_config.pad_token_id
    assert bool((new[low, whole.shape[1] :] == pad).all()) and bool((new[high, coarse.shape[1] :] == pad).all())
    images = [0, 1] if low == 0 else [2]
    levels = [0 if i in images else 2 for i in range(3)]
    assert out.image_granularity.tolist() == levels
    assert out.visual_tokens.tolist() == [
        c + (f if i in images else 0) for i, (c, f) in enumerate(zip(tokens_at([2, 2, 2]), tokens_at([0, 0, 0])))
    ]


def test_router_with_fallback(model):
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0])
    try:
        fixed_router(ours, [2, 0, 1])
        routed = ours.generate(**full, granularity="auto", return_dict_in_generate=True, **NEW)
        kept, new = fallback(ours, full, "auto", 0.0)
        assert torch.equal(new, routed.sequences[:, full["input_ids"].shape[1] :])
        assert kept.visual_tokens.tolist() == tokens_at([2, 0, 1])
        out, new = fallback(ours, full, "auto", 1.0)
        assert torch.equal(new, answers_at(tester, ours, [0, 0, 0])) and out.image_granularity.tolist() == [0, 0, 0]
        fixed_router(ours, [0, 0, 0])  # on the full grid already: nothing to fall back to
        out, new = fallback(ours, full, "auto", 1.0)
        assert out.fallback.tolist() == [False, False] and out.visual_tokens.tolist() == tokens_at([0, 0, 0])
    finally:
        del ours.model.router_logits


def test_fallback_refuses_what_it_cannot_honour(model):
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0])
    for extra, message in [
        ({"num_beams": 2}, "cannot be combined with {'num_beams': 2}"),
        ({"output_scores": True}, "cannot be combined with {'output_scores': True}"),
        ({"streamer": object()}, "cannot stream"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours.generate(**full, granularity="cascade", **NEW, **extra)
    with pytest.raises(ValueError, match=r"fallback_threshold is a probability in \[0, 1\], got 1.5"):
        ours.generate(**full, granularity="cascade", fallback_threshold=1.5, **NEW)
    with pytest.raises(ValueError, match="fallback_threshold needs granularity='auto' or 'cascade', got 1"):
        ours.generate(**full, granularity=1, fallback_threshold=0.5, **NEW)
    small, _ = pooled_batch(tester, [1, 1, 1])
    with pytest.raises(ValueError, match="expanded for the full grids"):
        ours.generate(**small, image_granularity=torch.tensor([1, 1, 1]), granularity="cascade", **NEW)
    plain = NativeVLForConditionalGeneration(tester.nativevl_config()).eval()
    with pytest.raises(ValueError, match="granularity='cascade' needs a model with granularity levels"):
        plain.generate(**full, granularity="cascade", **NEW)


def test_crop_mode_cascade_takes_one_level_per_image(granular_tiny):
    model, processor = granular_tiny
    crop = crop_mode(processor)
    images = [[noise(60, 90, 0)], [noise(57, 57, 1)]]
    full = crop(images=images, text=chat(crop, 2), padding_side="left")
    assert full["image_grid_thw"].shape[0] > 2  # tiles
    small = crop(images=images, text=chat(crop, 2), padding_side="left", granularity=LEVELS - 1)
    coarse = model.generate(**small, granularity=LEVELS - 1, **NEW)[:, small["input_ids"].shape[1] :]
    whole = model.generate(**full, **NEW)[:, full["input_ids"].shape[1] :]
    assert not torch.equal(coarse, whole)  # the loud projector makes the level matter
    out, new = fallback(model, full, "cascade", 0.0)
    assert torch.equal(new, coarse) and out.image_granularity.tolist() == [2, 2]
    out, new = fallback(model, full, "cascade", 1.0)
    assert torch.equal(new, whole) and out.image_granularity.tolist() == [0, 0]
    per_image = (full["input_ids"] == crop.image_token_id).sum(-1) + (small["input_ids"] == crop.image_token_id).sum(
        -1
    )
    assert out.visual_tokens.tolist() == per_image.tolist()  # every tile's tokens, both passes


def test_text_only_rows_are_never_answered_again(granular_tiny):
    model, processor = granular_tiny
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hello there?"}]}]
    prompts = [processor.apply_chat_template([text_only], add_generation_prompt=True, tokenize=False)[0]]
    prompts += chat(processor, 1)
    batch = processor(images=[[], [noise(60, 90, 0)]], text=prompts, padding_side="left")
    out, new = fallback(model, batch, "cascade", 1.0)
    assert out.fallback.tolist() == [False, True] and out.image_granularity.tolist() == [0]
    full = model.generate(**batch, **NEW)
    assert torch.equal(new, full[:, batch["input_ids"].shape[1] :])


def test_pipeline_with_cascade_in_batches(granular_tiny):
    from transformers import pipeline

    model, processor = granular_tiny
    processor.tokenizer.padding_side = "left"
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": noise(80, 120, s)}, {"type": "text", "text": "Hi?"}]}]
        for s in range(3)
    ]

    def kwargs():  # fresh each call: some releases' pipelines write max_new_tokens into the given generate_kwargs
        return {"max_new_tokens": 4, "generate_kwargs": {"do_sample": False, "granularity": "cascade"}}

    one_by_one = [pipe(text=m, **kwargs())[0]["generated_text"][-1]["content"] for m in messages]
    batched = [r[0]["generated_text"][-1]["content"] for r in pipe(text=messages, batch_size=2, **kwargs())]
    assert batched == one_by_one
    inputs = processor(images=[noise(80, 120, 0)], text=chat(processor, 1))
    out = model.generate(**inputs, granularity="cascade", max_new_tokens=4, do_sample=False)
    assert one_by_one[0] == processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def test_generate_outputs_declare_their_fields(model):
    """`generate(granularity="auto")` returns transformers' output classes with nativevl's fields declared (beam
    search keeps its beam fields), never keys set on an undeclared object."""
    tester, ours = model
    full, _ = pooled_batch(tester, [0, 0, 0])
    routed = ours.generate(**full, granularity="auto", return_dict_in_generate=True, **NEW)
    beams = ours.generate(
        **full, granularity="auto", return_dict_in_generate=True, output_scores=True, num_beams=2, **NEW
    )
    checked, _ = fallback(ours, full, "auto", 1.0)
    for out, declared in ((routed, NativeVLGenerateOutput), (checked, NativeVLGenerateOutput)):
        assert type(out) is declared and out.image_granularity.shape == (len(GRIDS),)
    assert type(beams) is NativeVLGenerateBeamOutput and beams.sequences_scores.shape == (2,)
    assert torch.equal(beams.image_granularity, routed.image_granularity)  # the router runs once, before the beams
    for out in (routed, beams, checked):
        assert set(out.keys()) <= {field.name for field in dataclasses.fields(out)}
    assert checked.fallback.dtype == torch.bool and checked.confidence.shape == (2,)
