"""The core model: parity with transformers' Qwen2-VL, agreement between paths, training and save/load."""

import pytest
import torch
from conftest import mm_token_type_ids

from nativevl import NativeVLForConditionalGeneration
from nativevl.modeling import NativeVLModel


# Several images of different sizes in one sample, a text-only sample, a sample with one image.
MIXED = [
    [5, ("image", (1, 6, 10)), 3, ("image", (1, 14, 4)), 4],
    [7],
    [2, ("image", (1, 2, 2)), 6],
]


def reference_inputs(batch, tester):
    return {**batch, "mm_token_type_ids": mm_token_type_ids(batch["input_ids"], tester)}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers_qwen2_vl(pair, padding_side):
    tester, reference, ours = pair
    batch = tester.batch(MIXED, padding_side=padding_side)
    with torch.no_grad():
        expected = reference(**reference_inputs(batch, tester)).logits
        got = ours(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)


def test_generate_matches_transformers_qwen2_vl(pair):
    tester, reference, ours = pair
    batch = tester.batch(MIXED, padding_side="left")
    expected = reference.generate(**reference_inputs(batch, tester), max_new_tokens=10, do_sample=False)
    got = ours.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("grid", [(2, 4, 6), (3, 6, 4)])
def test_video_matches_transformers_qwen2_vl(pair, grid):
    tester, reference, ours = pair
    batch = tester.batch([[5, ("video", grid), 3], [2, ("image", (1, 4, 4)), 4]], padding_side="left")
    with torch.no_grad():
        expected = reference(**reference_inputs(batch, tester)).logits
        got = ours(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)
    generated = ours.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, reference.generate(**reference_inputs(batch, tester), max_new_tokens=6))


def test_text_after_long_video_resumes_after_largest_id(tester):
    # 4 temporal patches on a 2x3 merged grid: temporal ids reach start+3, so the next text token is start+4
    # (Qwen2-VL's released rule). transformers 5.23 resumes at start+max(h, w)/2 = start+3 here, reusing an id.
    config = tester.nativevl_config()
    batch = tester.batch([[2, ("video", (4, 4, 6)), 1]])
    positions, deltas = NativeVLModel(config).get_rope_index(
        batch["input_ids"], video_grid_thw=batch["video_grid_thw"]
    )
    video = positions[:, 0, 3:27]  # after 2 text tokens and vision_start
    assert video[0].unique().tolist() == [3, 4, 5, 6]
    assert video[1].unique().tolist() == [3, 4]
    assert video[2].unique().tolist() == [3, 4, 5]
    assert positions[:, 0, 27].tolist() == [7, 7, 7]  # vision_end
    assert deltas.item() == int(positions.max()) + 1 - batch["input_ids"].shape[1]


def test_rope_index_golden(tester):
    config = tester.nativevl_config()
    batch = tester.batch([[2, ("image", (1, 4, 6)), 2]])
    positions, deltas = NativeVLModel(config).get_rope_index(
        batch["input_ids"], image_grid_thw=batch["image_grid_thw"]
    )
    # text 0,1; vision_start 2; 2x3 merged grid at offset 3; vision_end at 3 + 3 = 6; text 7, 8
    assert positions[0, 0].tolist() == [0, 1, 2] + [3] * 6 + [6, 7, 8]
    assert positions[1, 0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    assert positions[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert deltas.tolist() == [[9 - 12]]


def test_cached_decoding_uses_rope_deltas(pair):
    """A hand-written decoding loop (forward with past_key_values, no position ids) equals full recomputation."""
    tester, _, ours = pair
    batch = tester.batch(MIXED, padding_side="left")
    out = ours(**batch, use_cache=True)
    cache, ids, mask = out.past_key_values, batch["input_ids"], batch["attention_mask"]
    for _ in range(3):
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, next_token], 1), torch.cat([mask, torch.ones_like(next_token)], 1)
        out = ours(input_ids=next_token, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    with torch.no_grad():
        full = ours(**{**batch, "input_ids": ids, "attention_mask": mask}).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=0)


def test_generate_with_and_without_cache_agree(pair):
    tester, _, ours = pair
    batch = tester.batch(MIXED, padding_side="left")
    with_cache = ours.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
    without = ours.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_placeholder_count_mismatch_names_both_numbers(pair):
    tester, _, ours = pair
    batch = tester.batch([[3, ("image", (1, 4, 4)), 2]])
    batch["input_ids"][0, 5] = 50  # one image token fewer than the grid's 4
    with pytest.raises(ValueError, match="found 3 image tokens in the input but the images give 4 features"):
        ours(**batch)
    with pytest.raises(ValueError) as raised:  # transformers' wording first: tests and user code match on it
        ours(**batch)
    assert str(raised.value).startswith("Image features and image tokens do not match, tokens: 3, features: 4")
    video = tester.batch([[3, ("video", (2, 4, 4)), 2]])
    video["input_ids"][0, 5] = 50
    with pytest.raises(ValueError, match="^Video features and video tokens do not match, tokens: 7, features: 8"):
        ours(**video)
    with pytest.raises(ValueError, match=r"grid \[1, 4, 4\] needs 4 consecutive image tokens but 1 start"):
        ours.get_rope_index(batch["input_ids"], image_grid_thw=batch["image_grid_thw"])


def test_extra_grid_without_placeholder_is_an_error(tester):
    config = tester.nativevl_config()
    batch = tester.batch([[3, ("image", (1, 4, 4)), 2]])
    grids = torch.tensor([[1, 4, 4], [1, 2, 2]])
    with pytest.raises(ValueError, match="1 image grid"):
        NativeVLModel(config).get_rope_index(batch["input_ids"], image_grid_thw=grids)


def vision_inputs(tester):
    grids = [(1, 6, 10), (1, 14, 4), (2, 4, 4), (1, 2, 2), (1, 2, 2)]
    return tester.pixel_values(grids), torch.tensor(grids)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_vision_equals_each_image_alone(tester, attn):
    torch.manual_seed(0)
    model = NativeVLForConditionalGeneration(tester.nativevl_config()).eval()
    model.set_attn_implementation(attn)
    visual = model.model.visual
    assert visual.config._attn_implementation == attn
    pixel_values, grids = vision_inputs(tester)
    with torch.no_grad():
        packed = visual(pixel_values, grids).pooler_output
        alone, start = [], 0
        for grid in grids:
            n = int(grid.prod())
            alone.append(visual(pixel_values[start : start + n], grid[None]).pooler_output)
            start += n
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-6, rtol=0)


def test_vision_sdpa_equals_eager_and_transformers(pair):
    tester, reference, ours = pair
    pixel_values, grids = vision_inputs(tester)
    with torch.no_grad():
        expected = reference.model.visual(pixel_values, grid_thw=grids).pooler_output
        ours.set_attn_implementation("sdpa")
        sdpa = ours.model.visual(pixel_values, grids).pooler_output
        ours.set_attn_implementation("eager")
        assert ours.model.visual.config._attn_implementation == "eager"
        eager = ours.model.visual(pixel_values, grids).pooler_output
        ours.set_attn_implementation("sdpa")
    torch.testing.assert_close(sdpa, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_model_sdpa_equals_eager(tester):
    torch.manual_seed(0)
    model = NativeVLForConditionalGeneration(tester.nativevl_config()).eval()
    batch = tester.batch(MIXED, padding_side="left")
    with torch.no_grad():
        sdpa = model(**batch).logits
        model.set_attn_implementation("eager")
        assert model.model.language_model.config._attn_implementation == "eager"
        eager = model(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(sdpa[keep], eager[keep], atol=1e-5, rtol=0)


def labels_for(batch):
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return labels


def test_every_parameter_gets_a_gradient(tester):
    torch.manual_seed(0)
    for config in (
        tester.nativevl_config(),
        tester.nativevl_config(projector_type="merger_mlp", position_scheme="1d"),
    ):
        model = NativeVLForConditionalGeneration(config).train()
        batch = tester.batch(MIXED + [[1, ("video", (2, 4, 4)), 2]])
        model(**batch, labels=labels_for(batch)).loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"parameters without gradient: {missing}"


def test_gradient_checkpointing_gives_same_loss_and_gradients(tester):
    torch.manual_seed(0)
    model = NativeVLForConditionalGeneration(tester.nativevl_config()).train()
    batch = tester.batch(MIXED)
    labels = labels_for(batch)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.visual.blocks[0].gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "overrides", [{}, {"projector_type": "merger_mlp", "position_scheme": "1d", "tie_word_embeddings": True}]
)
def test_save_and_load_round_trip_bit_identical(tester, tmp_path, overrides):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    if "projector_type" in overrides:
        overrides["vision_config"] = tester.vision_config(hidden_size=48)
    model = NativeVLForConditionalGeneration(tester.nativevl_config(**overrides)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = NativeVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(saved[k], model.state_dict()[k]) for k in saved)
    batch = tester.batch(MIXED, padding_side="left")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_1d_scheme_with_mlp_projector_forward_and_generate(tester):
    torch.manual_seed(0)
    config = tester.nativevl_config(
        projector_type="merger_mlp", position_scheme="1d", vision_config=tester.vision_config(hidden_size=48)
    )
    model = NativeVLForConditionalGeneration(config).eval()
    assert model.model.multi_modal_projector.linear_1.in_features == 48
    batch = tester.batch(MIXED, padding_side="left")
    plain = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**batch).logits
        explicit = model(**batch, position_ids=plain).logits
    torch.testing.assert_close(logits, explicit, atol=0, rtol=0)
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert generated.shape == (3, batch["input_ids"].shape[1] + 6)
    no_cache = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(generated, no_cache)


def test_vision_segments_batch_equal_runs_without_raising_peak_scores():
    from nativevl.modeling.vision_nativevl import vision_segments

    cu_seqlens, runs, longest = vision_segments(torch.tensor([[8, 16, 16], [1, 4, 4], [1, 4, 4], [1, 6, 4]]))
    assert cu_seqlens.tolist() == [0, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2064, 2080, 2104]
    assert runs == [(0, 256, 8), (2048, 16, 2), (2080, 24, 1)] and longest == 256  # video frames share a call
    # two large equal images are not batched: their joint scores would double the peak of the largest one
    _, runs, _ = vision_segments(torch.tensor([[1, 34, 142], [1, 142, 34]]))
    assert runs == [(0, 4828, 1), (4828, 4828, 1)]
