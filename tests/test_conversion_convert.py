"""`nativevl convert` on tiny checkpoints written to disk in every source format, compared with the sources.

Sources are built here, sharded with an index like the Hub's: Qwen2-VL in both key layouts, NativeRes-LLaVA
(`LlavaQwenForCausalLM`) in both projector variants, and a Qwen2 LLM for compose, each with a tokenizer built in
code. NativeRes-LLaVA has no importable implementation, so `reference_forward` below re-implements its forward from
the released structure (ViT + merger -> mm_projector -> Qwen2 with 1-D positions, features spliced at LLaVA's -200
image marker).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyVLTester, mm_token_type_ids
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from nativevl import NativeVLForConditionalGeneration
from nativevl.conversion.checkpoint import QWEN2_VISION_TOKEN_IDS, vision_token_ids
from nativevl.conversion.cli import main
from nativevl.conversion.compose import QWEN2_VL_SPECIAL_TOKENS


LLAVA_IMAGE_TOKEN_INDEX = -200  # LLaVA's in-text marker of an image, replaced by all its features
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# Qwen2-VL's special tokens at the tiny tester's ids (image 120, video 121, vision start 122, end 123).
TINY_SPECIALS = {
    0: "<|endoftext|>",
    1: "<|im_start|>",
    2: "<|im_end|>",
    110: "<|object_ref_start|>",
    111: "<|object_ref_end|>",
    112: "<|box_start|>",
    113: "<|box_end|>",
    114: "<|quad_start|>",
    115: "<|quad_end|>",
    116: "<|vision_pad|>",
    120: "<|image_pad|>",
    121: "<|video_pad|>",
    122: "<|vision_start|>",
    123: "<|vision_end|>",
}
MIXED = [[5, ("image", (1, 6, 10)), 3, ("image", (1, 14, 4)), 4], [7], [2, ("image", (1, 2, 2)), 6]]


# ------------------------------------------------------------------------------------------------ tiny sources


def write_tokenizer(folder: Path, size: int, specials: dict[int, str]) -> None:
    """A WordLevel tokenizer: `specials` at their ids, words "w<i>" elsewhere; ChatML template."""
    vocab = {specials.get(i, f"w{i}"): i for i in range(size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(specials.values()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)


def save_sharded(folder: Path, state: dict[str, torch.Tensor], n_shards: int = 3, pickle: bool = False) -> None:
    """Writes `state` as n shards + index, named as transformers names them."""
    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        stem, ext = ("pytorch_model", "bin") if pickle else ("model", "safetensors")
        name = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        shard = {k: state[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        if pickle:
            torch.save(shard, folder / name)
        else:
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    index["weight_map"] = weight_map
    (folder / ("pytorch_model.bin.index.json" if pickle else "model.safetensors.index.json")).write_text(
        json.dumps(index, indent=2)
    )


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Moves every parameter (norm weights included) off its init, so a swapped key changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def write_qwen2_vl(folder: Path, layout: str = "hub", pickle: bool = False, seed: int = 0):
    """A tiny Qwen2-VL folder: the Hub layout (`visual.*`, `model.layers.*`) or v5's (`model.visual.*`,
    `model.language_model.*`), 3 shards + index, tokenizer, processor/generation configs, licence in README.md."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(TinyVLTester().qwen2_vl_config()).eval()
    perturb_(model, seed)
    state = model.state_dict()  # v5 layout
    if layout == "hub":
        state = {
            re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", k)): v
            for k, v in state.items()
        }
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    save_sharded(folder, state, pickle=pickle)
    write_tokenizer(folder, 124, TINY_SPECIALS)
    preprocessor = {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 6272, "max_pixels": 50176}
    preprocessor.update(patch_size=14, temporal_patch_size=2, merge_size=2)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    GenerationConfig(bos_token_id=1, eos_token_id=2, temperature=0.01, do_sample=True).save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny Qwen2-VL\n")
    return model


def nativeres_config(vocab_rows: int, projector_type: str) -> dict:
    """config.json of a tiny LlavaQwenForCausalLM: Qwen2 fields plus LLaVA's mm_* fields."""
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_rows,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "mm_projector_type": projector_type,
        "mm_hidden_size": 48,
        "mm_vision_tower": "/local/qwen2vl-665m-patch14-native",
        "mm_vision_select_layer": -1,
        "mm_min_image_token": 4,
        "mm_max_image_token": 64,
        "image_aspect_ratio": "native",
    }


def write_nativeres(folder: Path, vision_folder: Path, variant: str, seed: int = 0) -> dict:
    """A tiny NativeRes-LLaVA folder (136 embedding rows, 124-token tokenizer) and the Qwen2-VL folder of its ViT
    (config only). `variant`: "merger_mlp" (tower with merger + mm_projector.{0,2}) or "merger" (tower without
    merger, mm_projector.{ln_q,mlp.0,mlp.2} mapping to the LLM width). Returns what `reference_forward` needs."""
    tester = TinyVLTester()
    torch.manual_seed(seed)
    vision_config = tester.vision_config(hidden_size=48)  # the ViT's own merger width (1536 in the release)
    vit = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**vision_config))
    config = nativeres_config(136, "mlp2x_gelu" if variant == "merger_mlp" else "qwen2vl_merger")
    llm = Qwen2ForCausalLM(
        Qwen2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    )
    perturb_(vit, seed)
    perturb_(llm, seed + 1)
    state = {}
    tower = "model.vision_tower.vision_tower."
    if variant == "merger_mlp":
        state.update({tower + k: v for k, v in vit.state_dict().items()})
        linear_1, linear_2 = torch.nn.Linear(48, 32), torch.nn.Linear(32, 32)
        state.update({f"model.mm_projector.0.{k}": v for k, v in linear_1.state_dict().items()})
        state.update({f"model.mm_projector.2.{k}": v for k, v in linear_2.state_dict().items()})
    else:
        state.update({tower + k: v for k, v in vit.state_dict().items() if not k.startswith("merger.")})
        merged = 32 * 4
        generator = torch.Generator().manual_seed(seed + 2)
        for name, shape in [
            ("ln_q.weight", (32,)),
            ("ln_q.bias", (32,)),
            ("mlp.0.weight", (merged, merged)),
            ("mlp.0.bias", (merged,)),
            ("mlp.2.weight", (32, merged)),
            ("mlp.2.bias", (32,)),
        ]:
            state[f"model.mm_projector.{name}"] = 0.1 * torch.randn(shape, generator=generator) + (
                1.0 if name == "ln_q.weight" else 0.0
            )
    state.update(llm.state_dict())  # model.embed_tokens / layers / norm, lm_head
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # saved by old releases; dropped
    folder.mkdir(parents=True)
    save_sharded(folder, state)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, 124, TINY_SPECIALS)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny NativeRes-LLaVA\n")
    vision_folder.mkdir(parents=True)
    Qwen2VLConfig(text_config=tester.text_config(), vision_config=vision_config).save_pretrained(vision_folder)
    return {"source_state_dict": state, "source_config": config, "vision_config": vision_config}


def write_qwen2_llm(folder: Path, hidden: int = 48, tied: bool = False, seed: int = 0) -> Qwen2ForCausalLM:
    """A tiny Qwen2ForCausalLM folder with 104 embedding rows and a 100-token tokenizer without vision tokens."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=104,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    perturb_(model, seed)
    folder.mkdir(parents=True)
    model.save_pretrained(folder, max_shard_size="40KB")
    write_tokenizer(folder, 100, {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"})
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny Qwen2\n")
    return model


# ------------------------------------------------------------------------------------- NativeRes-LLaVA reference


def reference_forward(
    source_state_dict: dict,
    source_config: dict,
    vision_config: dict,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
) -> torch.Tensor:
    """NativeRes-LLaVA's forward, written from its released structure (`llava_arch.py`, `qwen_encoder.py`).

    input_ids: (1, L0) with one LLAVA_IMAGE_TOKEN_INDEX (-200) per image, as LLaVA tokenises `<image>`.
    pixel_values: (sum t*h*w, 1176); grid_thw: (num_images, 3). Returns logits (1, L, vocab) where each marker is
    replaced by its image's t*h*w/4 features and positions are 0..L-1.
    """
    tower_prefix, projector_prefix = "model.vision_tower.vision_tower.", "model.mm_projector."
    tower = {k[len(tower_prefix) :]: v for k, v in source_state_dict.items() if k.startswith(tower_prefix)}
    projector = {k[len(projector_prefix) :]: v for k, v in source_state_dict.items() if k.startswith(projector_prefix)}
    vit_config = Qwen2VLVisionConfig(**vision_config)
    if "ln_q.weight" in projector:  # Qwen2-VL's merger is the projector, mapping to the LLM width
        vit_config.hidden_size = source_config["hidden_size"]
        tower.update({f"merger.{k}": v for k, v in projector.items()})
    vit = Qwen2VisionTransformerPretrainedModel._from_config(vit_config).eval()
    vit.load_state_dict(tower, strict=True)
    features = vit(pixel_values, grid_thw=grid_thw).pooler_output  # (sum t*h*w/4, merger width)
    if "0.weight" in projector:  # mlp2x_gelu: Linear - GELU - Linear
        features = F.linear(features, projector["0.weight"], projector["0.bias"])
        features = F.linear(F.gelu(features), projector["2.weight"], projector["2.bias"])  # (n, LLM width)

    llm_config = Qwen2Config(**{k: v for k, v in source_config.items() if k not in ("architectures", "model_type")})
    llm = Qwen2ForCausalLM(llm_config).eval()
    llm_state = {
        k: v
        for k, v in source_state_dict.items()
        if (k.startswith(("model.embed_tokens", "model.layers", "model.norm")) or k == "lm_head.weight")
        and not k.endswith("inv_freq")
    }
    llm.load_state_dict(llm_state, strict=True)

    sizes = (grid_thw.prod(-1) // 4).tolist()
    per_image = torch.split(features, sizes)
    pieces, image, text = [], 0, []
    for token in input_ids[0].tolist():
        if token == LLAVA_IMAGE_TOKEN_INDEX:
            if text:
                pieces.append(llm.get_input_embeddings()(torch.tensor(text)))
                text = []
            pieces.append(per_image[image])
            image += 1
        else:
            text.append(token)
    if text:
        pieces.append(llm.get_input_embeddings()(torch.tensor(text)))
    embeds = torch.cat(pieces)[None]  # (1, L, D)
    positions = torch.arange(embeds.shape[1])[None]  # plain 1-D positions
    return llm(inputs_embeds=embeds, position_ids=positions).logits


def llava_and_nativevl_inputs(image_token_id: int, seed: int = 0):
    """The same sample twice: LLaVA-style ids with -200 markers, and nativevl ids with expanded placeholders."""
    tester = TinyVLTester()
    grids = [(1, 6, 10), (1, 4, 4)]
    generator = torch.Generator().manual_seed(seed)
    text = [torch.randint(3, 100, (n,), generator=generator).tolist() for n in (5, 3, 4)]
    llava = text[0] + [LLAVA_IMAGE_TOKEN_INDEX] + text[1] + [LLAVA_IMAGE_TOKEN_INDEX] + text[2]
    ours = text[0] + [image_token_id] * 15 + text[1] + [image_token_id] * 4 + text[2]
    pixel_values = tester.pixel_values(grids, seed)
    return torch.tensor([llava]), torch.tensor([ours]), pixel_values, torch.tensor(grids)


# ------------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def qwen2_vl_converted(tmp_path_factory):
    """Both Qwen2-VL layouts converted through the CLI (verification on, 40 KB shards)."""
    root = tmp_path_factory.mktemp("qwen2_vl")
    out = {}
    for layout in ("hub", "v5"):
        model = write_qwen2_vl(root / f"src-{layout}", layout)
        assert main(["qwen2-vl", "--input", str(root / f"src-{layout}"), "--output", str(root / f"out-{layout}"),
                     "--max-shard-size", "40KB"]) == 0  # fmt: skip
        out[layout] = (model, root / f"src-{layout}", root / f"out-{layout}")
    return out


@pytest.mark.parametrize("layout", ["hub", "v5"])
def test_qwen2_vl_logits_match_transformers(qwen2_vl_converted, layout):
    source, _, folder = qwen2_vl_converted[layout]
    tester = TinyVLTester()
    converted = NativeVLForConditionalGeneration.from_pretrained(folder).eval()
    for padding_side in ("left", "right"):
        batch = tester.batch(MIXED, padding_side=padding_side)
        with torch.no_grad():
            expected = source(**batch, mm_token_type_ids=mm_token_type_ids(batch["input_ids"], tester)).logits
            got = converted(**batch).logits
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=0)


def test_qwen2_vl_output_is_what_save_pretrained_writes(qwen2_vl_converted, tmp_path):
    """Same config.json, remote-code files, shard split and index as `from_qwen2_vl(model).save_pretrained`."""
    from nativevl.conversion import from_qwen2_vl

    source, _, folder = qwen2_vl_converted["hub"]
    from_qwen2_vl(source).save_pretrained(tmp_path, max_shard_size="40KB")
    assert json.loads((folder / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())
    code = sorted(p.name for p in tmp_path.glob("*.py"))
    assert set(code) <= {p.name for p in folder.glob("*.py")} and "vision_nativevl.py" in code
    for name in code:
        assert (folder / name).read_bytes() == (tmp_path / name).read_bytes()
    ours = json.loads((folder / "model.safetensors.index.json").read_text())
    theirs = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert ours == theirs and len(set(ours["weight_map"].values())) > 3
    for shard in set(ours["weight_map"].values()):
        with safe_open(str(folder / shard), "pt") as a, safe_open(str(tmp_path / shard), "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_qwen2_vl_carries_tokenizer_processor_and_generation_files(qwen2_vl_converted):
    _, source, folder = qwen2_vl_converted["hub"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (folder / name).read_bytes() == (source / name).read_bytes(), name
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "NativeVLImageProcessor"
    assert (processor["min_pixels"], processor["max_pixels"]) == (6272, 50176)  # the source's, not the defaults
    assert (processor["patch_size"], processor["temporal_patch_size"], processor["merge_size"]) == (14, 2, 2)
    assert processor["auto_map"]["AutoImageProcessor"] == "image_processing_nativevl.NativeVLImageProcessor"
    assert (folder / "image_processing_nativevl.py").exists()
    from nativevl.processing import NativeVLImageProcessor

    loaded = NativeVLImageProcessor.from_pretrained(folder)
    assert (loaded.min_pixels, loaded.max_pixels, loaded.merge_size) == (6272, 50176, 2)
    config = json.loads((folder / "config.json").read_text())
    assert (config["projector_type"], config["position_scheme"]) == ("merger", "mrope")


def test_processor_limits_from_size_dict(tmp_path):
    from nativevl.conversion.writer import processor_settings

    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 100, "longest_edge": 900}})
    )
    assert processor_settings(tmp_path)["min_pixels"] == 100 and processor_settings(tmp_path)["max_pixels"] == 900


@pytest.fixture(scope="module")
def nativeres_converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("nativeres")
    out = {}
    for variant in ("merger_mlp", "merger"):
        source = write_nativeres(root / f"src-{variant}", root / f"vit-{variant}", variant)
        args = ["nativeres-llava", "--input", str(root / f"src-{variant}"), "--vision", str(root / f"vit-{variant}")]
        assert main([*args, "--output", str(root / f"out-{variant}"), "--max-shard-size", "30KB"]) == 0
        out[variant] = (source, root / f"out-{variant}")
    return out


@pytest.mark.parametrize("variant", ["merger_mlp", "merger"])
def test_nativeres_llava_matches_reference_forward(nativeres_converted, variant):
    source, folder = nativeres_converted[variant]
    converted = NativeVLForConditionalGeneration.from_pretrained(folder).eval()
    config = converted.config
    assert (config.projector_type, config.position_scheme) == (variant, "1d")
    llava_ids, ids, pixel_values, grids = llava_and_nativevl_inputs(config.image_token_id)
    with torch.no_grad():
        expected = reference_forward(**source, input_ids=llava_ids, pixel_values=pixel_values, grid_thw=grids)
        got = converted(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids).logits
    assert got.shape == expected.shape == (1, ids.shape[1], 136)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_nativeres_llava_keeps_rows_tokens_and_pixel_budget(nativeres_converted):
    source, folder = nativeres_converted["merger_mlp"]
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 136  # every embedding row, although the tokenizer has 124
    assert {k: config[k] for k in QWEN2_VISION_TOKEN_IDS} == TinyVLTester().token_ids()  # from the tokenizer
    weights = read_checkpoint(folder)
    assert torch.equal(
        weights["model.language_model.embed_tokens.weight"], source["source_state_dict"]["model.embed_tokens.weight"]
    )
    assert torch.equal(
        weights["model.multi_modal_projector.linear_1.weight"],
        source["source_state_dict"]["model.mm_projector.0.weight"],
    )
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert (processor["min_pixels"], processor["max_pixels"]) == (4 * 28 * 28, 64 * 28 * 28)  # mm_*_image_token
    merger = json.loads((nativeres_converted["merger"][1] / "config.json").read_text())
    assert merger["vision_config"]["hidden_size"] == 32 and "multi_modal_projector.linear_1.weight" not in str(
        list(read_checkpoint(nativeres_converted["merger"][1]))
    )


def test_vision_token_ids_default_to_qwen2_without_tokenizer(tmp_path):
    assert vision_token_ids(tmp_path) == {
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
    }


@pytest.fixture(scope="module")
def compose_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    write_qwen2_vl(root / "qwen2-vl", "hub")
    llm = write_qwen2_llm(root / "qwen2-48", hidden=48)
    write_qwen2_llm(root / "qwen2-32-tied", hidden=32, tied=True, seed=1)
    return root, llm


def test_compose_shapes_new_rows_projector_and_forward(compose_sources):
    root, llm = compose_sources
    args = ["compose", "--vision", str(root / "qwen2-vl"), "--llm", str(root / "qwen2-48"), "--seed", "3"]
    assert main([*args, "--output", str(root / "out")]) == 0
    model = NativeVLForConditionalGeneration.from_pretrained(root / "out").eval()
    config = model.config
    assert (config.projector_type, config.position_scheme, config.text_config.hidden_size) == ("merger_mlp", "1d", 48)
    # 11 Qwen2-VL tokens appended to the 100-token tokenizer: ids 100..110, so the 104 rows grow to 111.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "out")
    new_ids = tokenizer.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL_TOKENS))
    assert new_ids == list(range(100, 111)) and len(tokenizer) == 111
    assert (config.image_token_id, config.vision_start_token_id) == (109, 106)
    # the LLM's text-only ChatML cannot place an image; the composed folder renders it as Qwen2-VL does
    from nativevl.processing import NativeVLProcessor

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w7"}]}]
    prompt = NativeVLProcessor.from_pretrained(root / "out").apply_chat_template(messages, tokenize=False)
    assert prompt == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>w7<|im_end|>\n"
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert embed.shape == (111, 48) and head.shape == (111, 48)
    old_embed, old_head = llm.get_input_embeddings().weight, llm.lm_head.weight
    torch.testing.assert_close(embed[:100], old_embed[:100], atol=0, rtol=0)
    torch.testing.assert_close(embed[100:], old_embed.mean(0).expand(11, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(head[100:], old_head.mean(0).expand(11, -1), atol=1e-6, rtol=0)
    # Fresh projector: nativevl's _init_weights (normal(0, 0.02), zero bias), reproducible from the seed.
    projector = model.model.multi_modal_projector
    assert projector.linear_1.weight.shape == (48, 32) and projector.linear_2.weight.shape == (48, 48)
    assert 0.015 < float(projector.linear_1.weight.detach().std()) < 0.025 and not projector.linear_1.bias.any()
    from nativevl.conversion.compose import fresh_projector

    assert torch.equal(
        fresh_projector(config, 3)["model.multi_modal_projector.linear_1.weight"], projector.linear_1.weight
    )
    assert not torch.equal(
        fresh_projector(config, 4)["model.multi_modal_projector.linear_1.weight"], projector.linear_1.weight
    )
    batch = TinyVLTester().batch([[3, ("image", (1, 4, 6)), 2]])
    for tiny_id, token_id in [(120, config.image_token_id), (122, config.vision_start_token_id), (123, 107)]:
        batch["input_ids"][batch["input_ids"] == tiny_id] = token_id
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 111) and torch.isfinite(logits).all()


def test_compose_merger_needs_equal_widths(compose_sources, capsys):
    root, _ = compose_sources
    args = ["compose", "--vision", str(root / "qwen2-vl"), "--projector", "merger"]
    assert main([*args, "--llm", str(root / "qwen2-48"), "--output", str(root / "bad")]) == 2
    assert re.search(r"output width.*is 32 and the LLM's hidden_size is 48", capsys.readouterr().err)
    assert not (root / "bad").exists()
    # A tied 32-wide LLM fits the merger as is: no projector, no lm_head tensor written.
    assert main([*args, "--llm", str(root / "qwen2-32-tied"), "--output", str(root / "merger")]) == 0
    keys = set(read_checkpoint(root / "merger"))
    assert "lm_head.weight" not in keys and not any("multi_modal_projector" in k for k in keys)
    model = NativeVLForConditionalGeneration.from_pretrained(root / "merger")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def edit_checkpoint(folder: Path, add: dict | None = None, remove: str | None = None) -> None:
    """Rewrites a sharded safetensors checkpoint with a tensor added or removed (index updated)."""
    state = read_checkpoint(folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    state.update(add or {})
    if remove is not None:
        del state[remove]
    save_sharded(folder, state)


@pytest.fixture(scope="module")
def every_source(tmp_path_factory):
    """One folder set per source kind, for the key-coverage tests (fresh copies are edited per test)."""
    root = tmp_path_factory.mktemp("sources")
    write_qwen2_vl(root / "qwen2-vl", "v5")
    write_nativeres(root / "nativeres", root / "nativeres-vit", "merger_mlp")
    write_nativeres(root / "nativeres-merger", root / "nativeres-merger-vit", "merger")
    write_qwen2_llm(root / "qwen2", hidden=48)
    assert (
        main(["qwen2-vl", "--input", str(root / "qwen2-vl"), "--output", str(root / "nativevl"), "--no-verify"]) == 0
    )
    return root


# source kind -> (folder to edit, CLI arguments, a source key to delete, the target key that goes missing)
COVERAGE_CASES = {
    "qwen2-vl": ("qwen2-vl", ["qwen2-vl", "--input", "{qwen2-vl}"], "model.visual.blocks.1.mlp.fc2.bias",
                 "model.visual.blocks.1.mlp.fc2.bias"),
    "nativeres-llava": ("nativeres", ["nativeres-llava", "--input", "{nativeres}", "--vision", "{nativeres-vit}"],
                        "model.mm_projector.2.bias", "model.multi_modal_projector.linear_2.bias"),
    "nativeres-llava-merger": ("nativeres-merger", ["nativeres-llava", "--input", "{nativeres-merger}", "--vision",
                               "{nativeres-merger-vit}"], "model.mm_projector.ln_q.weight",
                               "model.visual.merger.ln_q.weight"),
    "compose-llm": ("qwen2", ["compose", "--vision", "{qwen2-vl}", "--llm", "{qwen2}"],
                    "model.layers.1.post_attention_layernorm.weight",
                    "model.language_model.layers.1.post_attention_layernorm.weight"),
    "compose-vision": ("qwen2-vl", ["compose", "--vision", "{qwen2-vl}", "--llm", "{qwen2}"],
                       "model.visual.merger.ln_q.bias", "model.visual.merger.ln_q.bias"),
}  # fmt: skip


def coverage_run(every_source, tmp_path, case, add=None, remove=None):
    """Runs the CLI on a copy of one source folder edited by `add` / `remove`, the other folders as they are."""
    edited, args, _, _ = COVERAGE_CASES[case]
    shutil.copytree(every_source / edited, tmp_path / edited)
    edit_checkpoint(tmp_path / edited, add=add, remove=remove)
    folder = {name: tmp_path / edited if name == edited else every_source / name for name in (a[1:-1] for a in args)}
    args = [str(folder[a[1:-1]]) if a.startswith("{") else a for a in args]
    return main([*args, "--output", str(tmp_path / "out"), "--no-verify"])


@pytest.mark.parametrize("case", list(COVERAGE_CASES))
def test_missing_source_key_is_named(every_source, tmp_path, capsys, case):
    _, _, removed, target = COVERAGE_CASES[case]
    assert coverage_run(every_source, tmp_path, case, remove=removed) == 2
    err = capsys.readouterr().err
    assert "missing" in err and target in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(COVERAGE_CASES))
def test_unknown_source_key_is_named(every_source, tmp_path, capsys, case):
    assert coverage_run(every_source, tmp_path, case, add={"mystery.proj.weight": torch.zeros(2)}) == 2
    err = capsys.readouterr().err
    assert "match no rule" in err and "mystery.proj.weight" in err
    assert not (tmp_path / "out").exists()


def test_key_that_maps_outside_the_model_is_named_with_its_source(every_source, tmp_path, capsys):
    extra = {"visual.blocks.0.attn.extra.weight": torch.zeros(2)}
    assert coverage_run(every_source, tmp_path, "qwen2-vl", add=extra) == 2
    assert "unexpected ['model.visual.blocks.0.attn.extra.weight (from input:visual.blocks.0.attn.extra.weight)']" in (
        capsys.readouterr().err
    )


def test_wrong_shape_is_named(every_source, tmp_path, capsys):
    wrong = {"model.visual.merger.ln_q.bias": torch.zeros(7)}
    assert coverage_run(every_source, tmp_path, "qwen2-vl", add=wrong) == 2
    assert "model.visual.merger.ln_q.bias: nativevl [32] vs input:model.visual.merger.ln_q.bias [7]" in (
        capsys.readouterr().err
    )


SUBPROCESS = r"""
import importlib.abc, sys

class BlockNativevl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nativevl" or name.startswith("nativevl."):
            raise ImportError(f"import of {name} blocked: remote code must not need the nativevl package")
        return None

sys.meta_path.insert(0, BlockNativevl())
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

torch.set_num_threads(2)
for folder, inputs, output in zip(*[iter(sys.argv[1:])] * 3):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        torch.save(model(**torch.load(inputs)).logits, output)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    assert type(processor.image_processor).__name__ == "NativeVLImageProcessor"
assert not any(name == "nativevl" or name.startswith("nativevl.") for name in sys.modules)
"""


def test_converted_folders_load_as_remote_code_without_nativevl(qwen2_vl_converted, nativeres_converted, tmp_path):
    import os
    import subprocess
    import sys

    tester = TinyVLTester()
    runs, expected = [], []
    folders = [qwen2_vl_converted["hub"][2], nativeres_converted["merger_mlp"][1]]
    for i, folder in enumerate(folders):
        batch = tester.batch(MIXED, padding_side="left")
        torch.save(batch, tmp_path / f"in{i}.pt")
        runs += [str(folder), str(tmp_path / f"in{i}.pt"), str(tmp_path / f"out{i}.pt")]
        with torch.no_grad():
            expected.append(NativeVLForConditionalGeneration.from_pretrained(folder).eval()(**batch).logits)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, *runs], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for i, logits in enumerate(expected):
        torch.testing.assert_close(torch.load(tmp_path / f"out{i}.pt"), logits, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ memory


STREAMING_CASES = {
    "qwen2-vl": (["qwen2-vl", "--input", "{qwen2-vl}"], "qwen2-vl"),
    "nativeres-llava": (["nativeres-llava", "--input", "{nativeres}", "--vision", "{nativeres-vit}"], "nativeres"),
    "compose": (["compose", "--vision", "{qwen2-vl}", "--llm", "{qwen2}"], "qwen2"),
    "to-qwen2-vl": (["to-qwen2-vl", "--input", "{nativevl}"], "nativevl"),
}


@pytest.mark.parametrize("case", list(STREAMING_CASES))
def test_conversion_streams_one_tensor_at_a_time(every_source, tmp_path, monkeypatch, case):
    """Converting and verifying (float32 sources, so no cast copies a tensor) keeps at most twice the largest
    tensor's bytes of weights alive (a written tensor beside its source while they are compared, or one module's
    weights while it runs): every tensor read from disk is counted until it is freed, and no other reader may run (a
    `from_pretrained` or `safe_open` load would hold a whole model). The resharded source has shards smaller than
    two of its largest tensors, so holding one shard plus one model is far above this bound."""
    import gc
    import weakref

    import safetensors
    import safetensors.torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import PreTrainedModel

    from nativevl.conversion import checkpoint

    args, resharded = STREAMING_CASES[case]
    state = read_checkpoint(every_source / resharded)
    shutil.copytree(every_source / resharded, tmp_path / resharded, ignore=shutil.ignore_patterns("*.safetensors"))
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=total_bytes // 8
    )
    for name, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / resharded / name), metadata={"format": "pt"})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (tmp_path / resharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(split.filename_to_tensors) >= 3
    del state

    alive, peak, largest, read_tensor = [0], [0], [0], checkpoint.read_tensor

    def counted(path, data_start, entry):
        tensor = read_tensor(path, data_start, entry)
        size = tensor.numel() * tensor.element_size()
        alive[0] += size
        peak[0], largest[0] = max(peak[0], alive[0]), max(largest[0], size)
        weakref.finalize(tensor.untyped_storage(), lambda: alive.__setitem__(0, alive[0] - size))
        return tensor

    def refuse(*args, **kwargs):
        raise AssertionError("a whole-model loader (from_pretrained, safe_open) ran during the conversion")

    monkeypatch.setattr(checkpoint, "read_tensor", counted)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "safe_open", refuse)
    folders = {name: every_source / name for name in ("qwen2-vl", "nativeres", "nativeres-vit", "qwen2", "nativevl")}
    folders[resharded] = tmp_path / resharded
    argv = [str(folders[a[1:-1]]) if a.startswith("{") else a for a in args]
    assert main([*argv, "--output", str(tmp_path / "out"), "--max-shard-size", "40KB"]) == 0
    gc.collect()
    assert 0 < peak[0] <= 2 * largest[0], f"peak {peak[0]} bytes of weights alive; the largest tensor is {largest[0]}"
    assert alive[0] == 0, f"{alive[0]} bytes of read weights still alive after the conversion"


def test_bench_convert_sources_convert_and_verify(tmp_path):
    """benchmarks/bench_convert.py's real-shape sources, at tiny sizes: its Qwen2-VL layout (transformers', with its
    tokenizer) and its NativeRes-LLaVA layout (the release's keys, mlp2x_gelu) convert strictly and pass
    verification, and the Qwen2-VL output converts back with to-qwen2-vl."""
    import runpy

    bench = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bench_convert.py"))
    for name in ("tiny", "tiny-nativeres"):
        kind, text, vision, ids = bench["SHAPES"][name]
        source = tmp_path / name
        if kind == "qwen2-vl":
            config, shapes = bench["qwen2_vl_source"](text, vision, ids)
            args = ["qwen2-vl", "--input", str(source)]
        else:
            config, shapes = bench["nativeres_source"](text, vision)
            (tmp_path / "vit").mkdir()
            vit_config = bench["qwen2_vl_config"](bench["TEXT_2B"], vision, ids)
            (tmp_path / "vit" / "config.json").write_text(vit_config.to_json_string())
            args = ["nativeres-llava", "--input", str(source), "--vision", str(tmp_path / "vit")]
        size = bench["write_source"](source, config, shapes, torch.bfloat16, 200_000)
        files = list(source.glob("*.safetensors"))
        headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)  # length prefix + JSON
        assert len(files) > 1 and size == sum(f.stat().st_size for f in files) - headers
        if kind == "qwen2-vl":
            bench["write_tokenizer"](source, text["vocab_size"], ids)
        assert main([*args, "--output", str(tmp_path / f"{name}-out")]) == 0
        model = NativeVLForConditionalGeneration.from_pretrained(tmp_path / f"{name}-out")
        assert sum(p.numel() for p in model.parameters()) == sum(_numel(shape) for shape in shapes.values())
        if kind == "qwen2-vl":  # and the script's second run, back to a stock Qwen2-VL folder
            back = [
                "to-qwen2-vl",
                "--input",
                str(tmp_path / f"{name}-out"),
                "--output",
                str(tmp_path / f"{name}-back"),
            ]
            assert main(back) == 0


def _numel(shape) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
