"""Processor and pipeline conformance: batched `pipeline("image-text-to-text")`, videos in chat messages,
`add_vision_id`, `image_processor.size`, unknown keyword arguments."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from nativevl.cli import main as cli_main


def noise(h, w, seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "tiny"
    assert cli_main(["export", "--tiny", str(out)]) == 0
    return str(out)


def chat(n_images: int, seed: int, question: str = "What is it?") -> list[dict]:
    sizes = [(60 + 40 * seed, 90), (120, 50 + 30 * seed)]
    content = [{"type": "image", "image": noise(*sizes[i], seed + i)} for i in range(n_images)]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


@pytest.mark.parametrize("batch_size", [2, 3])
def test_pipeline_batches_equal_one_by_one(folder, batch_size):
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    chats = [chat(0, 0), chat(1, 1), chat(2, 2), chat(1, 3, "Colour?"), chat(2, 4)]
    alone = [pipe(text=c, max_new_tokens=5, do_sample=False)[0]["generated_text"][-1]["content"] for c in chats]
    batched = pipe(text=chats, max_new_tokens=5, do_sample=False, batch_size=batch_size)
    assert [b[0]["generated_text"][-1]["content"] for b in batched] == alone


@pytest.mark.parametrize("generate_kwargs", [{"num_beams": 2}, {"num_beams": 3, "num_return_sequences": 2}])
def test_pipeline_beam_search_batches_equal_one_by_one(folder, generate_kwargs):
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    chats = [chat(2, 0), chat(0, 1), chat(1, 2)]

    def settings():  # fresh per call: transformers 5.23's pipeline writes max_new_tokens into the dict it is given
        return dict(generate_kwargs={**generate_kwargs, "max_new_tokens": 4, "do_sample": False})

    alone = [[a["generated_text"][-1]["content"] for a in pipe(text=c, **settings())] for c in chats]
    batched = pipe(text=chats, batch_size=2, **settings())
    assert [[a["generated_text"][-1]["content"] for a in b] for b in batched] == alone
    assert [len(a) for a in alone] == [generate_kwargs.get("num_return_sequences", 1)] * len(chats)


def test_video_in_chat_messages_through_template_and_pipeline(folder):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    frames = [noise(64, 96, s) for s in range(4)]
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    merge = processor.image_processor.merge_size
    expected = int(inputs["video_grid_thw"].prod(-1).sum()) // merge**2
    assert int((inputs["input_ids"] == processor.video_token_id).sum()) == expected > 0
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    answer = pipe(text=messages, max_new_tokens=3, do_sample=False)
    assert answer[0]["generated_text"][-1]["role"] == "assistant"


def test_add_vision_id_numbers_images_and_videos(folder):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    content = [{"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    messages = [{"role": "user", "content": content}]
    plain = processor.apply_chat_template(messages, tokenize=False)
    numbered = processor.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert "Picture" not in plain
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    assert f"Picture 1: {pad}Video 1: {video}Picture 2: {pad}" in numbered


def test_image_processor_size_and_unknown_kwargs_warn(folder, caplog):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    ip = processor.image_processor
    assert ip.size == {"shortest_edge": ip.min_pixels, "longest_edge": ip.max_pixels}
    text = processor.apply_chat_template(chat(1, 0), tokenize=False)
    with caplog.at_level(logging.WARNING):
        typo = processor(images=[noise(300, 300, 0)], text=text, max_pixel=56 * 56)
    assert "max_pixel" in caplog.text
    right = processor(images=[noise(300, 300, 0)], text=text, max_pixels=56 * 56)
    assert typo["image_grid_thw"].tolist() != right["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_text_only_processor_output_keeps_every_key(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    out = processor(text=processor.apply_chat_template(chat(0, 0), tokenize=False))
    assert out["pixel_values"].shape[0] == 0 and out["image_grid_thw"].shape == (0, 3)
    with torch.no_grad():
        with_keys = model(**out).logits
        without = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
    assert torch.equal(with_keys, without)
