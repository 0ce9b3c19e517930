"""Every generation mode transformers offers, with images and videos, against transformers' Qwen2-VL on the same
weights; per-image inputs (the processor's `image_num_grids`, granularity levels, crop mode's several grids per
image) expanded by sample for beam search and `num_return_sequences`; `torch.compile` of the forward."""

import pytest
import torch
from conftest import mm_token_type_ids
from PIL import Image

from nativevl.conversion import from_qwen2_vl
from nativevl.modeling.generation_nativevl import expansion_index, rows_of_items
from nativevl.testing import build_tiny


# images of several sizes in one sample, a text-only sample, one small image; videos beside an image
SAMPLES = {
    "images": [[5, ("image", (1, 6, 10)), 3, ("image", (1, 14, 4)), 4], [7], [2, ("image", (1, 2, 2)), 6]],
    "video": [
        [5, ("video", (2, 4, 6)), 3],
        [2, ("image", (1, 4, 4)), 4, ("video", (2, 2, 4)), 1],
    ],  # t <= merged h, w: see README,
}
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=5, temperature=0.8),
    "beams": dict(num_beams=2, do_sample=False),
    "beams_returned": dict(num_beams=3, num_return_sequences=2, length_penalty=0.5, early_stopping=True),
    "beams_4": dict(num_beams=4, num_return_sequences=4, early_stopping="never", do_sample=False),
    "sampling_returned": dict(do_sample=True, num_return_sequences=2),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
    "scores": dict(do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True),
    "beam_scores": dict(num_beams=2, return_dict_in_generate=True, output_scores=True, do_sample=False),
}


def processor_keys(batch: dict, model) -> dict:
    """The batch as nativevl's processor returns it: per-image `image_num_grids` and batch-first M-RoPE ids
    (batch, seq, 3) beside the pixels, so generation has every per-image key to expand."""
    out = dict(batch)
    if "image_grid_thw" in batch:
        out["image_num_grids"] = torch.ones(batch["image_grid_thw"].shape[0], dtype=torch.long)
    ids, _ = model.get_rope_index(
        batch["input_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        attention_mask=batch["attention_mask"],
    )
    out["position_ids"] = ids.permute(1, 2, 0)  # (3, batch, seq) -> (batch, seq, 3)
    return out


def generate(model, inputs: dict, **kwargs):
    torch.manual_seed(7)  # the same draws for both models in the sampling modes
    return model.generate(**inputs, max_new_tokens=6, **kwargs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("content", list(SAMPLES))
def test_generation_mode_equals_transformers_qwen2_vl(pair, content, mode):
    tester, reference, ours = pair
    batch = tester.batch(SAMPLES[content], padding_side="left")
    expected = generate(
        reference, {**batch, "mm_token_type_ids": mm_token_type_ids(batch["input_ids"], tester)}, **MODES[mode]
    )
    got = generate(ours, processor_keys(batch, ours), **MODES[mode])
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
        return
    assert torch.equal(got.sequences, expected.sequences)
    for field in ("scores", "logits"):
        if getattr(expected, field, None) is not None:
            assert len(getattr(got, field)) == len(getattr(expected, field))
            for a, b in zip(getattr(got, field), getattr(expected, field), strict=True):
                finite = torch.isfinite(b)
                assert torch.equal(torch.isfinite(a), finite)
                torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assisted"])
def test_candidate_decoding_equals_transformers_qwen2_vl(pair, mode):
    """Prompt lookup and assisted decoding: transformers runs them for one sample at a time."""
    tester, reference, ours = pair
    batch = tester.batch(SAMPLES["images"][:1])
    outputs = []
    for model, inputs in (
        (reference, {**batch, "mm_token_type_ids": mm_token_type_ids(batch["input_ids"], tester)}),
        (ours, processor_keys(batch, ours)),
    ):
        extra = dict(prompt_lookup_num_tokens=3) if mode == "prompt_lookup" else dict(assistant_model=model)
        outputs.append(generate(model, inputs, do_sample=False, **extra))
    assert torch.equal(outputs[1], outputs[0])
    assert torch.equal(outputs[1], generate(ours, processor_keys(batch, ours), do_sample=False))


def test_rows_of_items_and_expansion_index():
    assert rows_of_items([3, 2, 4], [5, 0, 4], "image") == [0, 0, 2]
    assert expansion_index([0, 0, 2], 3, 2).tolist() == [0, 1, 0, 1, 2, 2]
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 8, features: 9"):
        rows_of_items([3, 2, 4], [5, 3], "image")
    with pytest.raises(ValueError, match="image 1 .* straddles rows 0 and 1"):
        rows_of_items([3, 4], [4, 3], "image")


def noise(h: int, w: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def granular():
    model, processor = build_tiny(seed=3, granularity=3)
    return model, processor


def prompts(processor, images_per_sample: list[int]) -> list[str]:
    content = lambda n: [{"type": "image"}] * n + [{"type": "text", "text": "What is here?"}]  # noqa: E731
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": content(n)}], add_generation_prompt=True, tokenize=False
        )
        for n in images_per_sample
    ]


def crop_kwargs() -> dict:
    return dict(image_mode="crop", crop_base_size=56, crop_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(granularity=1),
        dict(granularity="per-image"),
        dict(granularity="auto"),
        dict(processor=crop_kwargs()),
        dict(processor=crop_kwargs(), granularity=2),
    ],
    ids=["full", "level", "per_image_levels", "auto", "crop", "crop_level"],
)
def test_per_image_inputs_expand_by_sample(granular, setting):
    """Beam search over a batch equals beam search over each sample alone, and `num_return_sequences=2` sampling
    from the top token only returns each sample's greedy answer twice: both fail when an image's features or per-image keys land in another
    row's copy."""
    model, processor = granular
    images = [[noise(60, 90, 0), noise(100, 40, 1)], [], [noise(50, 70, 2)]]
    texts = prompts(processor, [len(i) for i in images])
    granularity = setting.get("granularity")
    if granularity == "per-image":
        granularity = torch.tensor([2, 0, 1])
    proc_kwargs = dict(setting.get("processor", {}))

    def levels_of(rows):
        if not isinstance(granularity, torch.Tensor):
            return granularity
        starts = [sum(len(i) for i in images[:r]) for r in rows]
        return torch.tensor(
            [int(granularity[s + k]) for s, r in zip(starts, rows, strict=True) for k in range(len(images[r]))]
        )

    def inputs(rows):
        levels = levels_of(rows)
        expand = (
            {}
            if levels is None or levels == "auto"
            else {"granularity": levels.tolist() if isinstance(levels, torch.Tensor) else levels}
        )
        return processor(
            images=[images[r] for r in rows],
            text=[texts[r] for r in rows],
            padding=True,
            return_tensors="pt",
            **proc_kwargs,
            **expand,
        )

    beams = dict(num_beams=2, do_sample=False, max_new_tokens=5)
    batched = model.generate(**inputs([0, 1, 2]), granularity=levels_of([0, 1, 2]), **beams)
    for row in range(3):
        alone = model.generate(**inputs([row]), granularity=levels_of([row]), **beams)
        answer_len = alone.shape[1] - inputs([row])["input_ids"].shape[1]
        assert batched[row, -answer_len:].tolist() == alone[0, -answer_len:].tolist()
    greedy = model.generate(**inputs([0, 1, 2]), granularity=levels_of([0, 1, 2]), do_sample=False, max_new_tokens=5)
    twice = model.generate(
        **inputs([0, 1, 2]),
        granularity=levels_of([0, 1, 2]),
        do_sample=True,
        top_k=1,
        max_new_tokens=5,
        num_return_sequences=2,
    )
    assert torch.equal(twice, greedy.repeat_interleave(2, dim=0))


def test_fallback_refuses_beams_naming_them(granular):
    model, processor = granular
    inputs = processor(images=[[noise(60, 90, 0)]], text=prompts(processor, [1]), return_tensors="pt")
    with pytest.raises(ValueError, match="fallback_threshold cannot be combined with {'num_beams': 2}"):
        model.generate(**inputs, granularity="cascade", num_beams=2, max_new_tokens=3)


def test_stop_strings_with_images(granular):
    model, processor = granular
    inputs = processor(images=[[noise(60, 90, 0)]], text=prompts(processor, [1]), return_tensors="pt")
    free = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    answer = processor.tokenizer.decode(free[0, inputs["input_ids"].shape[1] :])
    stop = answer[2:4]
    stopped = model.generate(
        **inputs, do_sample=False, max_new_tokens=8, stop_strings=[stop], tokenizer=processor.tokenizer
    )
    text = processor.tokenizer.decode(stopped[0, inputs["input_ids"].shape[1] :])
    assert text.endswith(stop) and len(text) < len(answer)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_compiled_forward_equals_eager(pair, grad):
    """The whole forward under inductor (torch.compile's default backend; the vision tower breaks the graph,
    the decoder compiles whole), in eval under `no_grad` and in train mode with gradients, within 1e-5 of eager
    in fp32, gradients included."""
    tester, _, ours = pair
    batch = tester.batch([[3, ("image", (1, 4, 6)), 2, ("image", (1, 2, 2)), 2], [6]], padding_side="left")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = from_qwen2_vl(pair[1]).train(grad)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    results = []
    for forward in (model, compiled):
        model.zero_grad()
        with torch.set_grad_enabled(grad):
            out = forward(**batch, labels=labels)
            if grad:
                out.loss.backward()
        results.append((out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (eager, eager_grads), (graph, graph_grads) = results
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(graph[keep], eager[keep], atol=1e-5, rtol=0)
    assert len(graph_grads) == len(eager_grads) == (sum(1 for _ in model.parameters()) if grad else 0)
    for a, b in zip(graph_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_generate_with_static_cache_under_compiled_forward(pair):
    """`generate(cache_implementation="static")` with `model.forward` compiled gives the eager tokens (dynamo
    with the aot_eager backend: the same tracing and graph breaks as inductor, without its minutes of C++ builds
    per decode shape on a CPU; `benchmarks/bench_compile.py` times inductor)."""
    tester, _, ours = pair
    batch = processor_keys(tester.batch(SAMPLES["images"], padding_side="left"), ours)
    expected = generate(ours, batch, do_sample=False, cache_implementation="static")
    model = from_qwen2_vl(pair[1]).eval()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="aot_eager")
    assert torch.equal(generate(model, batch, do_sample=False, cache_implementation="static"), expected)


def test_bench_compile_smoke(monkeypatch, capsys):
    """benchmarks/bench_compile.py at tiny scale (dynamo's eager backend, one repeat, nativevl's rows: tracing the
    transformers baseline too doubles the time): every row, equal tokens."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compile.py"
    argv = ["bench_compile.py", "--preset", "tiny", "--repeats", "1", "--new-tokens", "2", "--backend", "eager"]
    argv.append("--no-transformers")
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    for task in ("inference", "training", "generate (static cache)"):
        assert any(line.startswith("nativevl") and task in line for line in out.splitlines()), (task, out)
    assert out.count("tokens identical") == 1 and "DIFFER" not in out
