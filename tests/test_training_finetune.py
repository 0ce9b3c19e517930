"""Fine-tuning as users do it: every folder nativevl produces (export, convert qwen2-vl / nativeres-llava / compose,
train output) through `nativevl train` and TRL's plain `SFTTrainer` recipe, and every data format people have.

The converted sources keep real-world chat templates without `{% generation %}` markers (Qwen2-VL-Instruct's for
qwen2-vl and compose, the release prompt format for nativeres-llava). Their tokenizers are word-level over "w<i>"
words, so the data's question and answers are such words.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import COLOURS, recipe_trainer
from PIL import Image
from test_conversion_convert import write_nativeres, write_qwen2_llm, write_qwen2_vl

from nativevl.conversion.cli import main as convert_main
from nativevl.conversion.export import save_folder
from nativevl.modeling.configuration_nativevl import IGNORE_INDEX
from nativevl.processing import NativeVLProcessor
from nativevl.testing import build_tiny, build_tiny_tokenizer
from nativevl.training.data import load_training_data
from nativevl.training.packing import PackingCollator, PaddedCollator, assistant_spans
from nativevl.training.train import main as train_main


# Qwen2-VL-7B-Instruct's chat template as released (no generation markers).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
ANSWERS = {name: f"w{10 + i}" for i, name in enumerate(sorted(COLOURS))}
QUESTION = "w5 w6"
STEPS = ["--max_steps", "4", "--save_strategy", "no", "--per_device_train_batch_size", "4"]


def write_images(folder: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n one-colour PNGs under folder/images; returns (relative path, answer word) per image."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng, items = random.Random(seed), []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        Image.new("RGB", (rng.randint(28, 80), rng.randint(28, 80)), COLOURS[name]).save(
            folder / "images" / f"{i}.png"
        )
        items.append((f"images/{i}.png", ANSWERS[name]))
    return items


def trl_record(path: str, answer: str) -> dict:
    user = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "images": [path],
    }


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def set_template(folder: Path, template: str) -> None:
    """Gives a source folder's tokenizer `template` (as chat_template.jinja, what save_pretrained writes)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(template)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder per source kind nativevl produces (a train output is made by the test that needs it)."""
    root = tmp_path_factory.mktemp("sources")
    save_folder(*build_tiny(max_pixels=112 * 112), root / "export")
    write_qwen2_vl(root / "src-qwen2-vl", "hub")
    set_template(root / "src-qwen2-vl", QWEN2_VL_TEMPLATE)
    write_nativeres(root / "src-nativeres", root / "src-nativeres-vit", "merger_mlp")
    # The LLM gets a byte-level BPE tokenizer, as Qwen2's (a qwen2 config.json makes AutoTokenizer rebuild any
    # tokenizer as Qwen2's BPE, which drops the test's word-level words), and ChatML that places images: compose
    # keeps the LLM's template, and a text-only Qwen2 template renders no image.
    write_qwen2_llm(root / "src-llm", hidden=48)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    tokenizer.save_pretrained(root / "src-llm")
    commands = {
        "qwen2-vl": ["qwen2-vl", "--input", str(root / "src-qwen2-vl")],
        "nativeres-llava": ["nativeres-llava", "--input", str(root / "src-nativeres"), "--vision",
                            str(root / "src-nativeres-vit")],
        "compose": ["compose", "--vision", str(root / "src-qwen2-vl"), "--llm", str(root / "src-llm")],
    }  # fmt: skip
    for kind, command in commands.items():
        assert convert_main([*command, "--output", str(root / kind), "--no-verify"]) == 0
    data = root / "data"
    items = write_images(data, 16)
    train = write_jsonl(data / "train.jsonl", [trl_record(p, a) for p, a in items])
    return root, data, train, items


def trained(trainer) -> tuple[list[float], bool]:
    """Runs `trainer`; returns its logged losses and whether every trainable parameter moved off its start."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = bool(before) and all(not torch.equal(before[n], after[n].detach()) for n in before)
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], moved


def assert_learns(trainer) -> None:
    losses, moved = trained(trainer)
    assert len(losses) == 4 and all(loss > 0 for loss in losses), losses
    assert losses[-1] < losses[0], losses
    assert moved


@pytest.mark.parametrize("kind", ["export", "qwen2-vl", "nativeres-llava", "compose", "train-output"])
def test_every_source_kind_fine_tunes(folders, kind):
    root, _, train, _ = folders
    model = root / kind
    if kind == "train-output":
        argv = [str(Path(__file__).parents[1] / "training/recipes/tiny_stage2.yaml"), "--model_name_or_path"]
        argv += [str(root / "export"), "--dataset_path", train, "--output_dir", str(root / "first"), *STEPS]
        assert train_main(argv) == 0
        model = root / "first" / "final"
    trainer, _ = recipe_trainer(root, str(model), train, "tiny_stage2.yaml", f"run-{kind}", *STEPS)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    words = trainer.processing_class.tokenizer.decode(batch["input_ids"][batch["labels"] != IGNORE_INDEX])
    assert [w.strip() for w in words.split("<|im_end|>")] == [folders[3][0][1], folders[3][1][1], ""], words
    assert_learns(trainer)


def test_assistant_spans_without_markers_match_the_marked_template():
    """The Qwen2-VL template (no markers) gives the same assistant tokens as nativevl's marked ChatML, plus the
    newline after `<|im_end|>` that the unmarked template renders inside the turn."""
    _, marked = build_tiny()
    unmarked = NativeVLProcessor(marked.image_processor, marked.tokenizer, chat_template=QWEN2_VL_TEMPLATE)
    image = Image.new("RGB", (40, 40), COLOURS["red"])
    example = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yes, red"}]},
        ],
        "images": [image],
    }
    prompt, spans = assistant_spans(example["messages"], QWEN2_VL_TEMPLATE)
    assert [prompt[a:b] for a, b in spans] == ["red<|im_end|>\n", "yes, red<|im_end|>\n"]
    texts = []
    for processor in (marked, unmarked):
        encoded = PackingCollator(processor).encode(example)
        texts.append(processor.tokenizer.decode(encoded["input_ids"][encoded["labels"] != IGNORE_INDEX]))
    assert texts == ["red<|im_end|>yes, red<|im_end|>", "red<|im_end|>\nyes, red<|im_end|>\n"]
    everything = PackingCollator(unmarked, assistant_only_loss=False).encode(example)
    assert int((everything["labels"] != IGNORE_INDEX).sum()) > 3 * int((encoded["labels"] != IGNORE_INDEX).sum())


def test_converted_folder_without_markers_trains_unpacked(folders):
    """`--multimodal_packing false` on a converted folder whose template has no {% generation %} markers: one sample
    per row, padded, with the packed path's labels (the answers only); with assistant_only_loss false, every text
    token."""
    root, _, train, items = folders
    model = str(root / "qwen2-vl")
    unpacked = ["--multimodal_packing", "false", *STEPS]
    trainer, _ = recipe_trainer(root, model, train, "tiny_stage2.yaml", "unpacked", *unpacked)
    assert isinstance(trainer.data_collator, PaddedCollator)
    examples = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(examples)
    assert "cu_seq_lens_q" not in batch and batch["input_ids"].shape[0] == 3
    tokenizer = trainer.processing_class.tokenizer
    for row, (_, answer) in enumerate(items[:3]):
        words = tokenizer.decode(batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX])
        assert words.split() == [answer, "<|im_end|>"], words
    packed = PackingCollator(trainer.processing_class)(examples)  # the same tokens are trained, packed or not
    assert torch.equal(
        batch["labels"][batch["labels"] != IGNORE_INDEX], packed["labels"][packed["labels"] != IGNORE_INDEX]
    )
    assert torch.equal(batch["pixel_values"], packed["pixel_values"])
    assert_learns(trainer)
    off = [*unpacked, "--assistant_only_loss", "false"]
    trainer, _ = recipe_trainer(root, model, train, "tiny_stage2.yaml", "unpacked-all", *off)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    vision = sum(int((batch["input_ids"] == t).sum()) for t in (120, 121))  # the tiny tokenizer's image, video ids
    assert vision > 0 and int((batch["labels"] != IGNORE_INDEX).sum()) == int(batch["attention_mask"].sum()) - vision


def test_batch_with_nothing_to_train_on_is_an_error(folders):
    root, _, train, _ = folders
    processor = NativeVLProcessor.from_pretrained(root / "qwen2-vl")
    dataset, _ = load_training_data(train)
    prompt_only = {"messages": dataset[0]["messages"][:1], "images": dataset[0]["images"]}
    with pytest.raises(ValueError, match="sample 0 has no assistant tokens to train on"):
        PaddedCollator(processor)([prompt_only])
    one_token = {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "w5"}]}], "images": []}
    plain = "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    bare = NativeVLProcessor(processor.image_processor, processor.tokenizer, chat_template=plain)
    with pytest.raises(ValueError, match="has no token to train on"):
        PackingCollator(bare, assistant_only_loss=False)([one_token])  # its only token starts the segment


def test_truncation_allowed_unless_it_cuts_image_tokens():
    _, processor = build_tiny(max_pixels=56 * 56)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + "x" * 50
    image = Image.new("RGB", (56, 56))
    full = processor(images=[image], text=[text])["input_ids"].shape[1]
    cut = processor(images=[image], text=[text], truncation=True, max_length=full - 20)
    assert cut["input_ids"].shape[1] == full - 20
    with pytest.raises(
        ValueError, match=r"sample 0: truncation to max_length=5 would cut through its image/video tok"
    ):
        processor(images=[image], text=[text], truncation=True, max_length=5)


def test_trl_documented_recipe_with_default_sftconfig(folders, tmp_path):
    """`SFTTrainer(model=..., args=SFTConfig(output_dir=...), train_dataset=ds, processing_class=processor)`: TRL's
    defaults (max_length 1024, its own collator), on the folders a user loads; only the steps and lr are set."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    root, _, train, _ = folders
    dataset, _ = load_training_data(train)
    for kind in ("export", "qwen2-vl", "nativeres-llava", "compose"):
        model = AutoModelForImageTextToText.from_pretrained(root / kind, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(root / kind, trust_remote_code=True)
        config = SFTConfig(output_dir=str(tmp_path / kind), max_steps=4, learning_rate=1e-3, logging_steps=1,
                           per_device_train_batch_size=4, report_to="none", save_strategy="no", use_cpu=True)  # fmt: skip
        assert config.max_length == 1024
        assert_learns(SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor))


@pytest.mark.parametrize("switch", ["padding_free", "packing"])
def test_trl_packing_switches_use_the_packing_collator(folders, tmp_path, switch):
    from trl import SFTConfig

    from nativevl.modeling import NativeVLForConditionalGeneration
    from nativevl.training.train import NativeVLTrainer

    root, _, train, _ = folders
    dataset, _ = load_training_data(train)
    model = NativeVLForConditionalGeneration.from_pretrained(root / "export")
    processor = NativeVLProcessor.from_pretrained(root / "export")
    kwargs = dict(output_dir=str(tmp_path), max_steps=4, learning_rate=1e-3, logging_steps=1, report_to="none",
                  per_device_train_batch_size=4, save_strategy="no", use_cpu=True, assistant_only_loss=True)  # fmt: skip
    trainer = NativeVLTrainer(
        model=model, args=SFTConfig(**kwargs, **{switch: True}), train_dataset=dataset, processing_class=processor
    )
    assert isinstance(trainer.data_collator, PackingCollator)
    assert trainer.data_collator.max_tokens == (1024 if switch == "packing" else None)
    assert_learns(trainer)
    with pytest.raises(ValueError, match="PackingCollator, but data_collator is a dict"):
        NativeVLTrainer(model=model, args=SFTConfig(**kwargs, **{switch: True}), train_dataset=dataset,
                        processing_class=processor, data_collator={})  # fmt: skip


def structured(record: dict) -> dict:
    """A TRL record with every content a list of parts (Arrow needs one type per column)."""
    messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
                for m in record["messages"]]  # fmt: skip
    return {**record, "messages": messages}


def with_pil(record: dict, data: Path) -> dict:
    return {**structured(record), "images": [Image.open(data / p).convert("RGB") for p in record["images"]]}


def write_format(name: str, data: Path, items: list[tuple[str, str]]) -> list[str]:
    """Writes `items` as data of format `name` under `data` (images already there); returns the data arguments."""
    import datasets

    trl = [trl_record(p, a) for p, a in items]
    if name == "trl-image-string-content":
        records = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": a}],
                    "image": p} for p, a in items]  # fmt: skip
        return ["--dataset_path", write_jsonl(data / "trl_string.jsonl", records)]
    if name in ("llava-json", "sharegpt-jsonl"):
        marker = "<image>\n" if name == "llava-json" else ""
        records = [{"id": i, "image": p if name == "llava-json" else [p], "conversations": [
                    {"from": "human", "value": marker + QUESTION}, {"from": "gpt", "value": a}]}
                   for i, (p, a) in enumerate(items)]  # fmt: skip
        if name == "sharegpt-jsonl":
            return ["--dataset_path", write_jsonl(data / "sharegpt.jsonl", records)]
        (data / "llava.json").write_text(json.dumps(records))
        return ["--dataset_path", str(data / "llava.json")]
    if name == "parquet":
        datasets.Dataset.from_list([structured(r) for r in trl]).to_parquet(data / "train.parquet")
        return ["--dataset_path", str(data / "train.parquet")]
    if name == "save-to-disk-dict":
        splits = {"train": [with_pil(r, data) for r in trl], "validation": [with_pil(r, data) for r in trl[:3]]}
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(data / "dd")
        return ["--dataset_path", str(data / "dd")]
    if name == "dataset-name":  # a Hub-style folder: parquet shards with the images inside
        (data / "hub" / "data").mkdir(parents=True)
        dataset = datasets.Dataset.from_list([with_pil(r, data) for r in trl])
        dataset.to_parquet(data / "hub" / "data" / "train-00000-of-00001.parquet")
        return ["--dataset_name", str(data / "hub")]
    if name == "synth-rc":
        from nativevl.evaluation.synth_rc import generate_benchmark

        return ["--dataset_path", str(generate_benchmark(data / "synth", per_cell=1, kinds=["sc"], scale=0.05))]
    raise AssertionError(name)


FORMATS = ["trl-image-string-content", "llava-json", "sharegpt-jsonl", "parquet", "save-to-disk-dict",
           "dataset-name", "synth-rc"]  # fmt: skip


@pytest.mark.parametrize("name", FORMATS)
def test_every_data_format_fine_tunes(folders, name):
    """Each format becomes TRL's conversation (the same as the TRL JSONL's for the colour items) and trains."""
    from nativevl.training.train import build_trainer, parse

    root, data, train, items = folders
    extra = write_format(name, data, items)
    recipe = Path(__file__).parents[1] / "training" / "recipes" / "tiny_stage2.yaml"
    argv = [str(recipe), "--model_name_or_path", str(root / "export"), *extra, "--output_dir", str(root / name)]
    trainer = build_trainer(*parse([*argv, "--seed", "0", "--dataloader_num_workers", "0", *STEPS]))
    if name != "synth-rc":
        reference, _ = load_training_data(train)
        assert trainer.train_dataset["messages"] == reference["messages"]
        assert all(len(images) == 1 for images in trainer.train_dataset["images"])
    else:
        first = trainer.train_dataset[0]["messages"]
        assert [p["type"] for p in first[0]["content"]] == ["image", "text"] and first[1]["role"] == "assistant"
    assert (trainer.eval_dataset is not None) == (name == "save-to-disk-dict")
    if trainer.eval_dataset is not None:
        assert len(trainer.eval_dataset) == 3
    assert_learns(trainer)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": "w5"}]}, "line 1: field messages has no assistant turn"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "w5"}]},
         "line 1: field messages holds 1 image part(s) but field images has 0"),
        ({"conversations": [{"from": "human", "value": "<image> w5"}, {"from": "bot", "value": "w6"}]},
         "line 1: field conversations[1] needs from (human|user|gpt|assistant|model|system)"),
        ({"image": "images/0.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                     {"from": "gpt", "value": "w6"}]},
         "line 1: field conversations holds 2 <image> marker(s) but image has 1"),
        ({"text": "w5"}, "line 1: no field messages (TRL), conversations (LLaVA / ShareGPT) or question + answers"),
        ({"question": "w5", "answers": [], "image": "images/0.png"}, "line 1: field answers must be a non-empty"),
    ],
)  # fmt: skip
def test_bad_records_are_named_before_training(folders, record, message):
    _, data, _, _ = folders
    path = Path(write_jsonl(data / "bad.jsonl", [record]))
    with pytest.raises(ValueError) as error:
        load_training_data(str(path))
    assert str(error.value).startswith(f"{path} {message}"), str(error.value)


# Fresh interpreter with nativevl blocked: the merged folder and the adapter (on its base folder) load through
# transformers + PEFT alone and give the same logits.
LOAD_WITHOUT_NATIVEVL = r"""
import json, sys
class Block:
    def find_spec(self, name, path, target=None):
        if name == "nativevl" or name.startswith("nativevl."):
            raise ImportError("nativevl is blocked in this process")
sys.meta_path.insert(0, Block())
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
final, base, adapter = sys.argv[1:4]
processor = AutoProcessor.from_pretrained(final, trust_remote_code=True)
message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
text = processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.new("RGB", (60, 40), (220, 30, 30))], text=[text])
merged = AutoModelForImageTextToText.from_pretrained(final, trust_remote_code=True).eval()
adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=True), adapter)
with torch.no_grad():
    a, b = merged(**inputs).logits, adapted.eval()(**inputs).logits
    with adapted.disable_adapter():
        c = adapted(**inputs).logits
print(json.dumps({"max_diff": float((a - b).abs().max()), "trained": float((a - c).abs().max()),
                  "nativevl": any(m.startswith("nativevl") for m in sys.modules),
                  "lora": sum("lora_" in n for n, _ in adapted.named_parameters())}))
"""


def test_lora_adapter_at_output_dir_and_merged_folder_load_without_nativevl(folders):
    import subprocess
    import sys

    root, _, train, _ = folders
    out = root / "lora"
    recipe = Path(__file__).parents[1] / "training" / "recipes" / "tiny_lora.yaml"
    argv = [str(recipe), "--model_name_or_path", str(root / "export"), "--dataset_path", train, "--output_dir"]
    assert train_main([*argv, str(out), "--max_steps", "2", "--save_strategy", "no", "--learning_rate", "1e-2"]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    command = [sys.executable, "-c", LOAD_WITHOUT_NATIVEVL, str(out / "final"), str(root / "export"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["lora"] > 0 and not loaded["nativevl"]
    assert loaded["max_diff"] < 1e-4 < loaded["trained"], loaded  # the same model, and not the base one


def test_wheel_installs_and_trains_with_a_bundled_recipe(folders, tmp_path):
    """`pip wheel` of the source built by the running interpreter (the one the README's install set up: its
    setuptools and the `dev` extra's `wheel`, whatever the base interpreter lacks), installed into a fresh venv that
    sees the running interpreter's packages (torch & co.) but not its nativevl, runs `nativevl train` with a recipe
    read from the installed package."""
    import os
    import site
    import subprocess
    import sys
    import sysconfig

    root, _, train, _ = folders
    source = tmp_path / "src"  # the build writes build/ and *.egg-info next to setup.cfg: not into the checkout
    skip = shutil.ignore_patterns("tests", "build", "dist", "*.egg-info", "__pycache__", ".*", "runs")
    shutil.copytree(Path(__file__).parents[1], source, ignore=skip)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*command: str, cwd: Path = tmp_path) -> str:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
        return result.stdout

    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        str(source),
        "-w",
        str(tmp_path),
    )
    (wheel,) = tmp_path.glob("nativevl-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = str(venv / "bin" / "python")
    venv_site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # the running interpreter's site-packages as plain path entries: their .pth files (an editable nativevl's
    # finder among them) are not processed, so the only nativevl the venv can import is the wheel's
    running = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (venv_site / "running_interpreter.pth").write_text("\n".join(running) + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel))
    where = "import nativevl, pathlib; print(pathlib.Path(nativevl.__file__).parent)"
    package = Path(run(python, "-c", where).strip())
    assert package.is_relative_to(tmp_path / "venv"), package
    recipe = package / "training" / "recipes" / "tiny_stage2.yaml"
    assert recipe.is_file() and (package / "training" / "accelerate" / "ddp.yaml").is_file()
    tower = package / "training" / "pretrained" / "stage0"  # the demo's starting point ships in the wheel
    assert all((tower / name).is_file() for name in ("vision.safetensors", "vision_config.json", "README.md"))
    out = tmp_path / "out"
    run(str(tmp_path / "venv" / "bin" / "nativevl"), "train", str(recipe), "--model_name_or_path", str(root / "export"),
        "--dataset_path", train, "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no")  # fmt: skip
    assert (out / "final" / "model.safetensors").is_file()


def test_apply_chat_template_assistant_mask_through_text_replacement_offsets():
    """transformers' public route: `apply_chat_template(..., return_assistant_tokens_mask=True)` asks the processor
    for `return_text_replacement_offsets` and shifts the marked spans past the expanded image placeholders."""
    _, processor = build_tiny()
    image_part = {"type": "image", "image": Image.new("RGB", (60, 60))}
    conversation = [
        {"role": "user", "content": [image_part, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    out = processor.apply_chat_template(
        [conversation], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"][0], torch.as_tensor(out["assistant_masks"][0]).bool()
    assert int((ids == processor.image_token_id).sum()) > 1  # expanded: the spans had to move
    assert processor.tokenizer.decode(ids[mask]) == "red<|im_end|>"
    plain = processor(images=[image_part["image"]], text=["<|vision_start|><|image_pad|><|vision_end|>"])
    assert "text_replacement_offsets" not in plain  # only on request


def test_assistant_only_loss_false_reaches_the_packing_collator(folders):
    root, _, train, _ = folders
    model = str(root / "qwen2-vl")
    only, _ = recipe_trainer(root, model, train, "tiny_stage2.yaml", "only", *STEPS)
    every, _ = recipe_trainer(
        root, model, train, "tiny_stage2.yaml", "every", "--assistant_only_loss", "false", *STEPS
    )
    assert only.data_collator.assistant_only_loss and not every.data_collator.assistant_only_loss
    example = [only.train_dataset[0]]
    n_only, n_every = ((c.data_collator(example)["labels"] != IGNORE_INDEX).sum() for c in (only, every))
    assert 0 < n_only < n_every


def test_bad_parquet_row_is_named(tmp_path):
    import datasets

    turns = [[{"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"}],
             [{"role": "user", "content": "w5"}, {"role": "user", "content": "w6"}]]  # fmt: skip
    datasets.Dataset.from_list([{"messages": m} for m in turns]).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet row 1: field messages has no assistant turn to train on"):
        load_training_data(str(tmp_path / "t.parquet"))
