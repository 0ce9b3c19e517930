"""`nativevl convert` as a command: complete-or-absent output, overwrite, pickle refusal, dtype, model card."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import metadata_load
from safetensors import safe_open
from test_conversion_convert import nativeres_config, read_checkpoint, write_nativeres, write_qwen2_vl

from nativevl import NativeVLForConditionalGeneration
from nativevl.conversion import writer
from nativevl.conversion.checkpoint import source_license
from nativevl.conversion.cli import main
from nativevl.conversion.model_card import FAMILY_FIELDS, render_model_card
from nativevl.conversion.writer import parse_size


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "Qwen2-VL-tiny"
    write_qwen2_vl(folder, "hub")
    return folder


def convert(source: Path, output: Path, *extra: str) -> int:
    return main(["qwen2-vl", "--input", str(source), "--output", str(output), "--max-shard-size", "40KB", *extra])


def leftovers(parent: Path) -> list[str]:
    """Staging or replaced folders left beside the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failure_while_writing_shards_leaves_nothing(source, tmp_path, monkeypatch):
    written, save_streamed = [], writer.save_streamed

    def save_then_fail(path, specs, load, metadata=None):
        if written:
            raise RuntimeError("disk full (simulated)")
        written.append(path)
        save_streamed(path, specs, load, metadata)

    monkeypatch.setattr(writer, "save_streamed", save_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(source, tmp_path / "out")
    assert len(written) == 1 and Path(written[0]).parent.name.startswith(".out.tmp-")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_corrupt_source_shard_leaves_nothing(source, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated download
    assert convert(broken, tmp_path / "out") == 2
    assert f"cannot read safetensors file {shard}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_verification_leaves_nothing(source, tmp_path, capsys):
    assert convert(source, tmp_path / "out", "--atol", "1e-12") == 2
    captured = capsys.readouterr()
    assert re.search(r"verify: logits vs transformers Qwen2VLForConditionalGeneration: max abs diff \S+", captured.out)
    assert "verification failed, max abs diff above atol 1e-12" in captured.err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite_then_is_replaced(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert convert(source, out) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert convert(source, out, "--overwrite", "--no-verify") == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(source, empty, "--no-verify") == 0  # an empty folder is not "existing output"


def test_output_may_not_replace_a_source(source, tmp_path, capsys):
    copy = tmp_path / "src"
    shutil.copytree(source, copy)
    for output in (copy, tmp_path):
        assert convert(copy, output, "--overwrite") == 2
        assert "is or contains the source folder" in capsys.readouterr().err
    assert (copy / "model.safetensors.index.json").exists()


def pickle_source(source: Path, folder: Path) -> None:
    """The same checkpoint as transformers' sharded pickle format (pytorch_model-0000x-of-0000y.bin + index)."""
    from test_conversion_convert import save_sharded

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_sharded(folder, read_checkpoint(source), pickle=True)


def test_pickle_refused_without_allow_pickle_then_loaded(source, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickle_source(source, pickled)
    assert convert(pickled, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin.index.json is a pickle checkpoint" in err and "--allow-pickle" in err
    assert not (tmp_path / "out").exists()
    assert convert(pickled, tmp_path / "out", "--allow-pickle", "--dtype", "bfloat16") == 0
    assert "verify: logits vs transformers" in capsys.readouterr().out
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    converted = NativeVLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    expected = read_checkpoint(source)["visual.blocks.0.attn.qkv.weight"].to(torch.bfloat16).float()
    assert torch.equal(converted.model.visual.blocks[0].attn.qkv.weight, expected)


def test_single_pickle_file_with_allow_pickle(tmp_path):
    folder = tmp_path / "single"
    write_qwen2_vl(folder, "v5")
    state = read_checkpoint(folder)
    for file in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        file.unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert convert(folder, tmp_path / "out", "--allow-pickle") == 0


def test_model_card_front_matter_and_snippet_match_the_folder(source, tmp_path):
    out = tmp_path / "nativevl-tiny"
    assert convert(source, out, "--base-model", "Qwen/Qwen2-VL-2B-Instruct") == 0
    card = (out / "README.md").read_text()
    front = metadata_load(out / "README.md")
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-text-to-text"
    assert front["base_model"] == ["Qwen/Qwen2-VL-2B-Instruct"] and front["license"] == "apache-2.0"
    assert {"nativevl", "qwen2-vl"} <= set(front["tags"])
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    model_map = json.loads((out / "config.json").read_text())["auto_map"]
    processor_map = json.loads((out / "preprocessor_config.json").read_text())["auto_map"]
    for auto_class, target in [("AutoModelForImageTextToText", model_map), ("AutoProcessor", processor_map)]:
        assert f"{auto_class}.from_pretrained(path, trust_remote_code=True" in snippet
        assert target[auto_class] in snippet  # e.g. modeling_nativevl.NativeVLForConditionalGeneration
        assert (out / f"{target[auto_class].split('.')[0]}.py").exists()
    assert "nativevl convert qwen2-vl --input" in card and re.search(r"max abs diff \*\*\d\.\d\de-\d\d\*\*", card)


def test_model_card_defaults_and_no_verify(source, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns("README.md"))
    assert convert(bare, tmp_path / "out", "--no-verify") == 0
    front = metadata_load(tmp_path / "out" / "README.md")
    assert front["base_model"] == ["bare"] and front["license"] == "other"
    assert "not verified" in (tmp_path / "out" / "README.md").read_text()


def test_processor_config_keeps_the_source_limits_and_clip_normalisation(source, tmp_path):
    """preprocessor_config.json: the source's pixel limits, OpenAI CLIP mean / std, both processor classes'
    remote code and auto_map entries."""
    from nativevl.processing import NativeVLImageProcessor
    from nativevl.processing.image_processing_nativevl import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert convert(source, tmp_path / "out", "--no-verify") == 0
    folder = tmp_path / "out"
    written = json.loads((folder / "preprocessor_config.json").read_text())
    assert written["auto_map"] == {
        "AutoImageProcessor": "image_processing_nativevl.NativeVLImageProcessor",
        "AutoProcessor": "processing_nativevl.NativeVLProcessor",
    }
    loaded = NativeVLImageProcessor.from_pretrained(folder)
    assert (loaded.min_pixels, loaded.max_pixels) == (6272, 50176)
    assert loaded.image_mean == OPENAI_CLIP_MEAN and loaded.image_std == OPENAI_CLIP_STD
    assert (folder / "processing_nativevl.py").exists() and (folder / "image_processing_nativevl.py").exists()


def test_license_from_readme_then_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert source_license(tmp_path) == "mit"
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: x\n---\n")
    assert source_license(tmp_path) == "apache-2.0"


@pytest.mark.parametrize("family", sorted(FAMILY_FIELDS))
def test_every_template_renders_and_names_missing_fields(family):
    fields = {name: f"<{name}>" for name in FAMILY_FIELDS[family]}
    fields.update(base_model=["a", "b"], tags=["nativevl"], license="other")
    card = render_model_card(family, **fields)
    assert "$" not in card.replace("$ ", "")  # every placeholder filled
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    fields.pop("command")
    with pytest.raises(ValueError, match=r"needs field\(s\) \['command'\]"):
        render_model_card(family, **fields)


def test_nativeres_output_has_the_release_prompt_format(tmp_path):
    from transformers import AutoTokenizer

    write_nativeres(tmp_path / "src", tmp_path / "vit", "merger_mlp")
    args = ["nativeres-llava", "--input", str(tmp_path / "src"), "--vision", str(tmp_path / "vit")]
    assert main([*args, "--output", str(tmp_path / "out"), "--no-verify"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w5"}]}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|image_pad|>\nw5<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    front = metadata_load(tmp_path / "out" / "README.md")
    assert front["base_model"] == ["src"] and front["license"] == "apache-2.0"


def test_nativeres_rejects_mismatched_merger_width(tmp_path, capsys):
    write_nativeres(tmp_path / "src", tmp_path / "vit", "merger_mlp")
    config = nativeres_config(136, "mlp2x_gelu") | {"mm_hidden_size": 64}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    args = ["nativeres-llava", "--input", str(tmp_path / "src"), "--vision", str(tmp_path / "vit")]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert "mm_hidden_size 64 of the checkpoint differs from the ViT merger width" in capsys.readouterr().err


def test_wrong_model_type_and_bad_arguments(source, tmp_path, capsys):
    llm_like = tmp_path / "llm"
    shutil.copytree(source, llm_like)
    config = json.loads((llm_like / "config.json").read_text()) | {"model_type": "qwen2"}
    (llm_like / "config.json").write_text(json.dumps(config))
    assert convert(llm_like, tmp_path / "out") == 2
    assert "model_type 'qwen2'; a Qwen2-VL folder has 'qwen2_vl'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["qwen2-vl", "--input", str(source), "--output", str(tmp_path / "o"), "--max-shard-size", "lots"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["qwen2-vl", "--input", str(source), "--output", str(tmp_path / "o"), "--dtype", "float64"])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KB") == 40_000 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("123") == 123 and parse_size(7) == 7
    with pytest.raises(ValueError, match="not a size"):
        parse_size("GB")
