"""Padding-free multimodal packing: packed rows give each sample exactly its own logits and loss."""

import numpy as np
import pytest
import torch
from PIL import Image

from nativevl.testing import build_tiny
from nativevl.training.packing import IGNORE_INDEX, PackingCollator, best_fit_rows


def noise(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def example(images: list, question: str, answer: str) -> dict:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": images,
    }


def examples(seed: int = 0) -> list[dict]:
    """0, 1 and several images of different sizes."""
    return [
        example([noise(60, 90, seed)], "What is it?", "a red square"),
        example([], "Say hello.", "hello"),
        example([noise(30, 120, seed + 1), noise(100, 40, seed + 2)], "Two?", "yes, both"),
        example([noise(57, 57, seed + 3)], "Odd size?", "59"),
    ]


@pytest.fixture(scope="module", params=["mrope", "1d"])
def tiny(request):
    model, processor = build_tiny(position_scheme=request.param, max_pixels=112 * 112)
    return model.eval(), processor


def per_sample(model, collator, batch_examples):
    """Logits and (summed loss, label count) of each sample run alone."""
    results = []
    for ex in batch_examples:
        single = collator([ex])
        with torch.no_grad():
            out = model(**single)
        n_labels = int((single["labels"][:, 1:] != IGNORE_INDEX).sum())
        results.append((out.logits[0], out.loss * n_labels, n_labels))
    return results


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention", "nativevl_varlen"])
def test_packed_equals_each_sample_alone(tiny, attn):
    model, processor = tiny
    model.set_attn_implementation(attn)
    assert model.model.language_model.config._attn_implementation == attn
    assert model.model.visual.config._attn_implementation == attn
    collator = PackingCollator(processor)
    batch = collator(examples())
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch)
    alone = per_sample(model, collator, examples())
    start = 0
    for logits, _, _ in alone:
        n = logits.shape[0]
        torch.testing.assert_close(packed.logits[0, start : start + n], logits, atol=1e-5, rtol=0)
        start += n
    weighted = sum(loss for _, loss, _ in alone) / sum(n for _, _, n in alone)
    torch.testing.assert_close(packed.loss, weighted, atol=1e-5, rtol=0)
    model.set_attn_implementation("sdpa")


def test_changing_one_image_moves_no_other_sample(tiny):
    model, processor = tiny
    collator = PackingCollator(processor)
    original, perturbed = examples(), examples()
    perturbed[2]["images"][1] = noise(100, 40, 99)  # same size, other pixels: same layout, other features
    a, b = collator(original), collator(perturbed)
    assert torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad():
        la, lb = model(**a).logits[0], model(**b).logits[0]
    bounds = a["cu_seq_lens_q"].tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        moved = (la[start:end] - lb[start:end]).abs().max().item()
        if s == 2:
            assert moved > 1e-4  # the perturbed sample does change
        else:
            assert moved == 0.0, f"sample {s} moved by {moved}"


def test_labels_mask_prompt_images_and_segment_starts(tiny):
    _, processor = tiny
    batch = PackingCollator(processor)(examples())
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert (labels[ids == processor.image_token_id] == IGNORE_INDEX).all()
    for start in batch["cu_seq_lens_q"][:-1].tolist():
        assert labels[start] == IGNORE_INDEX
    trained = processor.tokenizer.decode(ids[labels != IGNORE_INDEX])
    assert trained == "a red square<|im_end|>hello<|im_end|>yes, both<|im_end|>59<|im_end|>"
    everything = PackingCollator(processor, assistant_only_loss=False)(examples())
    n_all = int((everything["labels"] != IGNORE_INDEX).sum())
    n_text = int((ids != processor.image_token_id).sum()) - 4  # all but image tokens and the 4 segment starts
    assert n_all == n_text


def test_rows_respect_max_tokens_and_pad_as_own_segment(tiny):
    model, processor = tiny
    collator = PackingCollator(processor)
    lengths = [collator.encode(ex)["input_ids"].shape[0] for ex in examples()]
    max_tokens = max(lengths) + 5
    rows = PackingCollator(processor, max_tokens=max_tokens)
    batch = rows(examples())
    assert batch["input_ids"].shape[0] > 1 and batch["input_ids"].shape[1] <= max_tokens
    assert batch["position_ids"].shape == (4, *batch["input_ids"].shape)
    assert batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    assert 0 < rows.fill_rate <= 1
    with torch.no_grad():
        packed = model(**batch)
    alone = per_sample(model, collator, examples())
    weighted = sum(loss for _, loss, _ in alone) / sum(n for _, _, n in alone)
    torch.testing.assert_close(packed.loss, weighted, atol=1e-5, rtol=0)
    longest = int(np.argmax(lengths))
    with pytest.raises(ValueError, match=rf"sample {longest} has {lengths[longest]} tokens \(images included\), over"):
        PackingCollator(processor, max_tokens=10)(examples())


def test_best_fit_rows():
    assert best_fit_rows([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]  # 6+2, 5+3, 4
    assert sorted(i for row in best_fit_rows(list(range(1, 20)), 20) for i in row) == list(range(19))
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        best_fit_rows([3, 9], 8)


def test_packed_rows_without_safe_position_ids_never_leak(tiny):
    model, processor = tiny
    batch = PackingCollator(processor)(examples())
    with torch.no_grad():
        reference = model(**batch).logits
        cached = model(**{**batch, "use_cache": True}).logits  # the cache is refused for packed rows
    assert torch.equal(cached, reference)
    plain = batch["position_ids"][0]
    if model.config.position_scheme == "1d":
        with torch.no_grad():
            assert torch.equal(model(**{**batch, "position_ids": plain}).logits, reference)
    else:
        with pytest.raises(ValueError, match=r"need \(4, batch, seq\) position ids"):
            model(**{**batch, "position_ids": plain})
    with pytest.raises(ValueError, match="carry no plain row"):
        model(**{**batch, "position_ids": batch["position_ids"][1:]})


def test_bad_sample_is_named(tiny):
    _, processor = tiny
    bad = example([b"not an image"], "What?", "x")
    with pytest.raises(ValueError, match="sample 1 image 0: cannot decode"):
        PackingCollator(processor)([examples()[0], bad])
    mismatch = example([], "What?", "x")
    mismatch["messages"][0]["content"].insert(0, {"type": "image"})
    with pytest.raises(ValueError, match=r"sample 0: .*1 <\|image_pad\|> placeholder\(s\).* but 0 image"):
        PackingCollator(processor)([mismatch])
