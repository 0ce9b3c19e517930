"""`nativevl convert to-qwen2-vl`: a nativevl folder written as a stock transformers Qwen2-VL folder, loaded without
remote code and compared with the nativevl model (logits, greedy tokens, processor), the refusals, and the round trip
convert qwen2-vl -> train -> to-qwen2-vl."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TinyVLTester, mm_token_type_ids
from safetensors import safe_open
from test_conversion_convert import read_checkpoint, write_qwen2_vl
from transformers import AutoImageProcessor, AutoModelForImageTextToText, Qwen2VLForConditionalGeneration

from nativevl import NativeVLForConditionalGeneration
from nativevl.conversion.cli import main
from nativevl.conversion.export import save_folder
from nativevl.conversion.qwen2_vl import config_from_qwen2_vl
from nativevl.conversion.to_qwen2_vl import qwen2_vl_config
from nativevl.processing import NativeVLProcessor
from nativevl.testing import build_tiny


# text, images of three sizes and a video, in one sample, beside a text-only sample and a one-image sample
SAMPLES = [
    [4, ("image", (1, 6, 10)), 3, ("image", (1, 14, 4)), 2, ("video", (2, 4, 6)), 4],
    [7],
    [2, ("image", (1, 2, 2)), 6],
]


def to_qwen2_vl(source: Path, output: Path, *extra: str) -> int:
    return main(["to-qwen2-vl", "--input", str(source), "--output", str(output), "--max-shard-size", "40KB", *extra])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A Qwen2-VL source (Hub layout), its nativevl conversion, and that written back as stock Qwen2-VL."""
    root = tmp_path_factory.mktemp("to_qwen2_vl")
    write_qwen2_vl(root / "source", "hub")
    assert main(["qwen2-vl", "--input", str(root / "source"), "--output", str(root / "nativevl"), "--no-verify"]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert to_qwen2_vl(root / "nativevl", root / "stock") == 0
    (root / "stdout.txt").write_text(printed.getvalue())
    return root


def test_stock_class_without_remote_code_matches_nativevl(folders):
    """`AutoModelForImageTextToText` without trust_remote_code gives transformers' class; its logits on images of
    several sizes and a video are within 1e-5 of the nativevl model's, and greedy generation gives the same tokens."""
    tester = TinyVLTester()
    stock = AutoModelForImageTextToText.from_pretrained(folders / "stock").eval()
    assert type(stock) is Qwen2VLForConditionalGeneration
    ours = NativeVLForConditionalGeneration.from_pretrained(folders / "nativevl").eval()
    for padding_side in ("left", "right"):
        batch = tester.batch(SAMPLES, padding_side=padding_side)
        types = mm_token_type_ids(batch["input_ids"], tester)
        with torch.no_grad():
            expected, got = ours(**batch).logits, stock(**batch, mm_token_type_ids=types).logits
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)
    batch = tester.batch(SAMPLES, padding_side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    theirs = stock.generate(**batch, mm_token_type_ids=mm_token_type_ids(batch["input_ids"], tester), **kwargs)
    assert torch.equal(theirs, ours.generate(**batch, **kwargs))


def test_stock_folder_contents(folders):
    """Qwen2-VL's model_type and config, no remote code anywhere, the source's tokenizer, template and generation
    config, transformers' processor configs with the source's limits; the weights are the original Qwen2-VL
    checkpoint's tensors under its names, laid out as `save_pretrained` lays them out."""
    stock, source = folders / "stock", folders / "source"
    assert not list(stock.glob("*.py"))
    for path in stock.glob("*.json"):
        assert "auto_map" not in path.read_text(), path.name
    config = json.loads((stock / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (stock / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((stock / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    image = json.loads((stock / "preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "Qwen2VLImageProcessor"
    assert image["size"] == {"shortest_edge": 6272, "longest_edge": 50176}  # the Qwen2-VL source's limits
    assert (image["min_pixels"], image["max_pixels"]) == (6272, 50176)  # as released Qwen2-VL folders have them
    loaded = AutoImageProcessor.from_pretrained(stock)
    assert (loaded.size["shortest_edge"], loaded.size["longest_edge"], loaded.merge_size) == (6272, 50176, 2)
    video = json.loads((stock / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and video["do_sample_frames"] is False

    original = read_checkpoint(source)
    written = read_checkpoint(stock)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    source_config = json.loads((source / "config.json").read_text())  # saved from the model it was built as
    assert config == {**source_config, "architectures": ["Qwen2VLForConditionalGeneration"], "dtype": "float32"}
    resaved = folders / "resaved"
    Qwen2VLForConditionalGeneration.from_pretrained(stock).save_pretrained(resaved, max_shard_size="40KB")
    ours = json.loads((stock / "model.safetensors.index.json").read_text())
    theirs = json.loads((resaved / "model.safetensors.index.json").read_text())
    assert ours["weight_map"] == theirs["weight_map"] and len(set(ours["weight_map"].values())) > 3
    for shard in set(ours["weight_map"].values()):
        with safe_open(str(stock / shard), "pt") as a, safe_open(str(resaved / shard), "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())


def test_config_round_trips():
    """qwen2-vl -> nativevl -> qwen2-vl configs give the same architecture and token ids."""
    original = TinyVLTester().qwen2_vl_config()
    back = qwen2_vl_config(config_from_qwen2_vl(original))
    for part in ("text_config", "vision_config"):
        assert getattr(back, part).to_dict() == getattr(original, part).to_dict(), part
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(back, key) == getattr(original, key)


def test_command_reports_its_checks(folders):
    out = (folders / "stdout.txt").read_text()
    assert "verify: 3 greedy tokens equal" in out
    assert "verify: logits vs nativevl (3 images, 1 video), Qwen2VLForConditionalGeneration: max abs diff" in out
    assert "input_ids, image and video grids of" in out and "image pixel values vs Qwen2VLImageProcessorPil" in out
    card = (folders / "stock" / "README.md").read_text()
    assert 'AutoModelForImageTextToText.from_pretrained(path, dtype="auto")' in card
    assert "trust_remote_code=True" not in card and "logits vs nativevl (3 images, 1 video)" in card


def test_failed_verification_leaves_nothing(folders, tmp_path, capsys):
    assert to_qwen2_vl(folders / "nativevl", tmp_path / "out", "--atol", "1e-12") == 2
    assert "verification failed, max abs diff above atol 1e-12" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kind, message",
    [
        ("merger_mlp", "projector_type='merger_mlp': Qwen2-VL's merger feeds the LLM directly"),
        ("1d", "position_scheme='1d': Qwen2-VL always gives vision tokens M-RoPE"),
        ("granularity", "granularity=2: Qwen2-VL has no AVG-LLaVA router"),
        ("crop", "image processor mode='crop'"),
        ("lora", "holds a LoRA adapter (adapter_config.json)"),
        ("no-tokenizer", "has no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model)"),
    ],
)
def test_unexpressible_models_are_refused(tmp_path, capsys, kind, message):
    builds = {"merger_mlp": dict(projector_type="merger_mlp"), "1d": dict(position_scheme="1d")}
    model, processor = build_tiny(**builds.get(kind, {}), granularity=2 if kind == "granularity" else None)
    if kind == "crop":
        processor.image_processor.mode = "crop"
    save_folder(model, processor, tmp_path / "model")
    if kind == "lora":
        (tmp_path / "model" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    if kind == "no-tokenizer":
        (tmp_path / "model" / "tokenizer.json").unlink()
    assert to_qwen2_vl(tmp_path / "model", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err, err
    if kind == "lora":
        assert "OUTPUT_DIR/final" in err and "merge_and_unload" in err
    elif kind != "no-tokenizer":
        assert "cannot be written as a stock Qwen2-VL folder" in err
    assert not (tmp_path / "out").exists()


def test_round_trip_through_training_equals_the_trained_model(tmp_path):
    """convert qwen2-vl, train 4 steps (tiny recipe), to-qwen2-vl: transformers' Qwen2-VL loaded from the result has
    the trained weights and computes the trained nativevl model's logits."""
    from test_training_finetune import QWEN2_VL_TEMPLATE, STEPS, set_template, trl_record, write_images, write_jsonl

    from nativevl.training.train import main as train_main

    write_qwen2_vl(tmp_path / "source", "hub")
    set_template(tmp_path / "source", QWEN2_VL_TEMPLATE)
    convert = ["qwen2-vl", "--input", str(tmp_path / "source"), "--output", str(tmp_path / "nativevl"), "--no-verify"]
    assert main(convert) == 0
    items = write_images(tmp_path / "data", 8)
    train = write_jsonl(tmp_path / "data" / "train.jsonl", [trl_record(p, a) for p, a in items])
    recipe = Path(__file__).parents[1] / "training" / "recipes" / "tiny_stage2.yaml"
    argv = [str(recipe), "--model_name_or_path", str(tmp_path / "nativevl"), "--dataset_path", train]
    assert train_main([*argv, "--output_dir", str(tmp_path / "run"), "--seed", "0", *STEPS]) == 0
    trained_folder = tmp_path / "run" / "final"
    assert to_qwen2_vl(trained_folder, tmp_path / "stock") == 0

    trained = NativeVLForConditionalGeneration.from_pretrained(trained_folder).eval()
    stock = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "stock").eval()
    before = NativeVLForConditionalGeneration.from_pretrained(tmp_path / "nativevl").state_dict()
    weights, stock_weights = trained.state_dict(), stock.state_dict()
    assert weights.keys() == stock_weights.keys()
    assert all(torch.equal(weights[k], stock_weights[k]) for k in weights)
    assert any(not torch.equal(weights[k], before[k]) for k in weights)  # training moved the weights
    tester = TinyVLTester()
    batch = tester.batch(SAMPLES, padding_side="right")
    with torch.no_grad():
        expected = trained(**batch).logits
        got = stock(**batch, mm_token_type_ids=mm_token_type_ids(batch["input_ids"], tester)).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)
    processor = NativeVLProcessor.from_pretrained(trained_folder)
    assert (tmp_path / "stock" / "chat_template.jinja").read_text() == processor.chat_template


def test_full_transformers_processor_if_torchvision(folders):
    """transformers' Qwen2VLProcessor (AutoProcessor) needs torchvision, which these machines lack: where it is
    installed, it gives nativevl's input_ids and grids on images and a video."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    from nativevl.conversion.verify import parity_images

    theirs = AutoProcessor.from_pretrained(folders / "stock")
    ours = NativeVLProcessor.from_pretrained(folders / "nativevl")
    images, frames = parity_images()
    text = "<|vision_start|><|image_pad|><|vision_end|> w5 <|vision_start|><|video_pad|><|vision_end|>"
    got = theirs(text=[text], images=images[:1], videos=[frames], return_tensors="pt")
    expected = ours(text=[text], images=images[:1], videos=[frames], return_tensors="pt")
    for key in ("input_ids", "image_grid_thw", "video_grid_thw"):
        assert torch.equal(got[key], expected[key]), key


def test_tied_embeddings_are_written_as_save_pretrained_writes_them(tmp_path):
    """A tied nativevl model: no lm_head.weight in the stock folder, and transformers re-ties it."""
    model, processor = build_tiny(tie_word_embeddings=True)
    save_folder(model, processor, tmp_path / "tied")
    assert to_qwen2_vl(tmp_path / "tied", tmp_path / "out", "--no-verify") == 0
    assert "lm_head.weight" not in read_checkpoint(tmp_path / "out")
    stock = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert stock.lm_head.weight.data_ptr() == stock.get_input_embeddings().weight.data_ptr()
    shutil.rmtree(tmp_path / "out")


def test_processor_check_fails_on_other_settings(folders, tmp_path):
    """The processor check can fail: a stock folder whose image or video pixel limits differ from the nativevl
    processor's is refused naming the key that differs."""
    from nativevl.conversion.checkpoint import ConversionError
    from nativevl.conversion.verify import processor_parity

    ours = NativeVLProcessor.from_pretrained(folders / "nativevl")
    assert processor_parity(folders / "stock", ours) == {"image pixel values vs Qwen2VLImageProcessorPil": 0.0}
    edits = [  # fewer pixels per image than the nativevl processor allows; more per video frame
        ("preprocessor_config.json", "longest_edge", 28 * 28 * 9, "image_grid_thw"),
        ("video_preprocessor_config.json", "shortest_edge", 28 * 28 * 200, "video_grid_thw"),
    ]
    for name, edge, pixels, key in edits:
        edited = tmp_path / name.split(".")[0]
        shutil.copytree(folders / "stock", edited)
        settings = json.loads((edited / name).read_text())
        settings["size"][edge] = pixels
        settings.pop("min_pixels", None), settings.pop("max_pixels", None)  # these would win over `size`
        (edited / name).write_text(json.dumps(settings))
        with pytest.raises(ConversionError, match=f"(input_ids|{key}).* differ from nativevl's processor"):
            processor_parity(edited, ours)


def test_processor_check_compares_auto_processor_where_it_loads(folders, monkeypatch, capsys):
    """Where `AutoProcessor` loads (torchvision installed) the check compares its outputs. It cannot load here, so
    nativevl's processor stands in for it: the same one passes, one with other pixel limits fails."""
    import copy

    from transformers import AutoProcessor

    from nativevl.conversion.checkpoint import ConversionError
    from nativevl.conversion.verify import processor_parity

    ours = NativeVLProcessor.from_pretrained(folders / "nativevl")
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: ours)
    processor_parity(folders / "stock", ours)
    out = capsys.readouterr().out
    assert "pixel_values_videos vs NativeVLProcessor: max abs diff 0.000e+00 (not checked)" in out
    assert "input_ids, image and video grids of NativeVLProcessor equal" in out
    other = copy.deepcopy(ours)
    other.image_processor.max_pixels = 28 * 28 * 9
    monkeypatch.setattr(AutoProcessor, "from_pretrained", lambda *args, **kwargs: other)
    with pytest.raises(ConversionError, match="input_ids of NativeVLProcessor differ from nativevl's processor"):
        processor_parity(folders / "stock", ours)
