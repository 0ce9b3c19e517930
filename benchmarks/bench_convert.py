"""Conversion at real model shapes: wall time and peak memory of `nativevl convert`, and of loading the result.

For each `--shape`, writes a source checkpoint of that architecture with random weights (normal(0, 0.02) matrices,
unit norm weights, zero biases, like `_init_weights`; bf16), then runs in child processes, one at a time:

1. `nativevl convert ...` (verification included): wall time, peak RSS and peak RSS / checkpoint bytes;
2. for Qwen2-VL shapes, `nativevl convert to-qwen2-vl` of that output back to a stock transformers Qwen2-VL folder
   (verification included): wall time, peak RSS and ratio;
3. `NativeVLForConditionalGeneration.from_pretrained(out, dtype="auto", low_cpu_mem_usage=True)`, the same with
   `device_map="auto"` (on a CPU-only machine it maps everything to the CPU), and that load followed by reading
   every weight once (transformers memory-maps safetensors files: a weight's pages become resident when it is first
   read, so the load alone shows only what loading touched): peak RSS and ratio.

Peak RSS is the child's own `ru_maxrss` (from `os.wait4`), which counts memory-mapped file pages it touched too.
The source is written one tensor at a time (the architecture is built on the meta device for names and shapes),
in transformers' sharded layout (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, config.json),
so writing it costs no more than one tensor either. A watchdog kills a child when MemAvailable drops below
`--min-available-gib`, and reports it. Sources and outputs are deleted after each shape unless `--keep`.

Shapes: `qwen2-vl-2b` (2.21B parameters, tied embeddings), `qwen2-vl-7b` (8.29B) and `nativeres-llava-8b`
(Qwen2-VL-2B's ViT with merger + mlp2x_gelu projector 1536 -> 3584 -> 3584 + Qwen2-7B, 8.1B, the release's keys).

    python benchmarks/bench_convert.py --shape tiny --shape tiny-nativeres --workdir /tmp/bench-convert  # smoke run
    nice -n 10 python benchmarks/bench_convert.py --shape qwen2-vl-2b --workdir bench-convert-work
    nice -n 10 python benchmarks/bench_convert.py --shape nativeres-llava-8b --workdir bench-convert-work
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from nativevl.conversion.layerwise import on_meta
from nativevl.conversion.safetensors_io import numel, save_streamed


VISION_2B = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, spatial_merge_size=2)
TEXT_2B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=True,
)
TEXT_7B = dict(
    TEXT_2B,
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
)
TINY_TEXT = dict(
    TEXT_2B,
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
)
TINY_VISION = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, spatial_merge_size=2)
SPECIAL_IDS = dict(
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
)
TINY_IDS = dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)


def qwen2_vl_config(text: dict, vision: dict, ids: dict) -> Qwen2VLConfig:
    text = dict(text)
    tied = text.pop("tie_word_embeddings")
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **ids)


def qwen2_vl_source(text: dict, vision: dict, ids: dict) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(config.json dict, {key: shape}) of transformers' Qwen2VLForConditionalGeneration (its v5 key layout)."""
    config = qwen2_vl_config(text, vision, ids)
    model = on_meta(lambda: Qwen2VLForConditionalGeneration(config))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return config.to_dict(), shapes


def nativeres_source(text: dict, vision: dict) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(config.json dict, {key: shape}) of a NativeRes-LLaVA `LlavaQwenForCausalLM`: the tower with its merger under
    `model.vision_tower.vision_tower.`, `model.mm_projector.{0,2}`, Qwen2's `model.*` and `lm_head`."""
    qwen2 = {k: v for k, v in text.items() if k != "rope_parameters"}
    qwen2["rope_theta"] = text["rope_parameters"]["rope_theta"]
    llm = on_meta(lambda: Qwen2ForCausalLM(Qwen2Config(**qwen2)))
    vit = on_meta(lambda: Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**vision)))
    shapes = {f"model.vision_tower.vision_tower.{k}": tuple(v.shape) for k, v in vit.state_dict().items()}
    width, merger_width = text["hidden_size"], vision["hidden_size"]
    shapes.update({"model.mm_projector.0.weight": (width, merger_width), "model.mm_projector.0.bias": (width,)})
    shapes.update({"model.mm_projector.2.weight": (width, width), "model.mm_projector.2.bias": (width,)})
    shapes.update({k: tuple(v.shape) for k, v in llm.state_dict().items() if not k.endswith("inv_freq")})
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        **qwen2,
        "torch_dtype": "bfloat16",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": merger_width,
        "mm_min_image_token": 4,
        "mm_max_image_token": 2048,
        "image_aspect_ratio": "native",
    }
    return config, shapes


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """What `_init_weights` would hold: ones for norm weights, zeros for biases, normal(0, 0.02) otherwise."""
    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in key or "ln_q" in key:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator)


def write_source(
    folder: Path, config: dict, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_shard_size: int
) -> int:
    """Writes config.json and random weights in transformers' sharded layout, one tensor in memory at a time;
    returns the weights' bytes."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    sizes = {key: numel(shape) * dtype.itemsize for key, shape in shapes.items()}
    split = split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda s: s,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
    )
    generator = torch.Generator().manual_seed(0)
    for filename, keys in split.filename_to_tensors.items():
        specs = {key: (shapes[key], dtype) for key in keys}
        save_streamed(
            folder / filename, specs, lambda k: random_tensor(k, shapes[k], dtype, generator), {"format": "pt"}
        )
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": split.tensor_to_filename}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(sizes.values())


def write_tokenizer(folder: Path, vocab_size: int, ids: dict) -> None:
    """A word-level tokenizer over the whole vocabulary ("w<i>" words) with Qwen2-VL's ChatML and vision tokens at
    the config's ids, so the nativevl output has a processor (`to-qwen2-vl` compares processors)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
    names.update(vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    specials = {ids[key]: token for key, token in names.items()}
    free = [i for i in range(vocab_size) if i not in specials]
    specials.update(zip(free[-3:], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], strict=True))
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(specials.values()))
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    ).save_pretrained(folder)


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def run_child(command: list[str], min_available: int) -> tuple[float, int, int]:
    """Runs `command`; returns (wall seconds, peak RSS bytes, exit status). Kills it (and reports -9) when
    MemAvailable drops below `min_available`."""
    start = time.perf_counter()
    child = subprocess.Popen(command, start_new_session=True)
    killed = False
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if not killed and mem_available() < min_available:
            print(f"watchdog: MemAvailable {mem_available() / 2**30:.1f} GiB, killing {command[:3]}", flush=True)
            os.killpg(child.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    child.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, -9 if killed else child.returncode


LOAD = """
import sys, torch
from nativevl.modeling import NativeVLForConditionalGeneration
kwargs = dict(dtype="auto", low_cpu_mem_usage=True)
if sys.argv[2] != "none":
    kwargs["device_map"] = "auto"
model = NativeVLForConditionalGeneration.from_pretrained(sys.argv[1], **kwargs)
print(f"loaded {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {model.dtype}, {model.device}")
if sys.argv[2] == "auto+read":  # safetensors weights are memory-mapped: pages count once they are read
    total = sum(float(p.detach().sum()) for p in model.parameters())  # no copy: reads each weight once
    print(f"read every weight (sum {total:.3e})")
"""

SHAPES = {
    # name: (kind, text, vision, special ids)
    "tiny": ("qwen2-vl", TINY_TEXT, TINY_VISION, TINY_IDS),
    # Qwen2's vocabulary: without tokenizer files the converter uses Qwen2's vision token ids (151652-151656)
    "tiny-nativeres": (
        "nativeres-llava",
        dict(TINY_TEXT, vocab_size=151936, tie_word_embeddings=False),
        TINY_VISION,
        SPECIAL_IDS,
    ),
    "qwen2-vl-2b": ("qwen2-vl", TEXT_2B, VISION_2B, SPECIAL_IDS),
    "qwen2-vl-7b": ("qwen2-vl", TEXT_7B, dict(VISION_2B, hidden_size=3584), SPECIAL_IDS),
    "nativeres-llava-8b": ("nativeres-llava", TEXT_7B, VISION_2B, SPECIAL_IDS),
}


def bench(name: str, workdir: Path, max_shard_size: int, min_available: int, keep: bool) -> list[str]:
    kind, text, vision, ids = SHAPES[name]
    source, output = workdir / f"{name}-source", workdir / f"{name}-nativevl"
    stock = workdir / f"{name}-stock-qwen2-vl"
    for folder in (source, output, stock, workdir / f"{name}-vision"):
        shutil.rmtree(folder, ignore_errors=True)
    if kind == "qwen2-vl":
        config, shapes = qwen2_vl_source(text, vision, ids)
        args = ["qwen2-vl", "--input", str(source)]
    else:
        config, shapes = nativeres_source(text, vision)
        vision_folder = workdir / f"{name}-vision"
        vision_folder.mkdir(parents=True)
        (vision_folder / "config.json").write_text(qwen2_vl_config(TEXT_2B, vision, SPECIAL_IDS).to_json_string())
        args = ["nativeres-llava", "--input", str(source), "--vision", str(vision_folder)]
    start = time.perf_counter()
    size = write_source(source, config, shapes, torch.bfloat16, max_shard_size)
    if kind == "qwen2-vl":
        write_tokenizer(source, text["vocab_size"], ids)
    shards = len(list(source.glob("*.safetensors")))
    parameters = sum(numel(s) for s in shapes.values())
    print(f"{name}: wrote {parameters / 1e9:.2f}B parameters, {size / 1e9:.2f} GB in {shards} shards in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    convert = [sys.executable, "-m", "nativevl.cli", "convert", *args, "--output", str(output)]
    rows = []
    runs = [("nativevl convert " + " ".join(args[:1]) + " (verify included)", convert)]
    if kind == "qwen2-vl":
        back = [sys.executable, "-m", "nativevl.cli", "convert", "to-qwen2-vl", "--input", str(output)]
        runs.append(("nativevl convert to-qwen2-vl of that output (verify included)", [*back, "--output", str(stock)]))
    load = 'from_pretrained(dtype="auto", low_cpu_mem_usage=True'
    for device_map, label in (
        ("none", f"{load})"),
        ("auto", f'{load}, device_map="auto")'),
        ("auto+read", f'{load}, device_map="auto"), then every weight read'),
    ):
        runs.append((label, [sys.executable, "-c", LOAD, str(output), device_map]))
    for label, command in runs:
        wall, peak, status = run_child(command, min_available)
        row = (f"| {name} | {label} | {size / 1e9:.2f} GB | {wall:.0f} s | {peak / 1e9:.2f} GB | "
               f"{peak / size:.2f} | {status} |")  # fmt: skip
        print(row, flush=True)
        rows.append(row)
        if status != 0:
            break
    if not keep:
        for folder in (source, output, stock, workdir / f"{name}-vision"):
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="repeatable; default qwen2-vl-2b")
    parser.add_argument("--workdir", type=Path, required=True, help="where sources and outputs are written")
    parser.add_argument("--max-shard-size", type=int, default=1_000_000_000, help="source shard bytes")
    parser.add_argument("--min-available-gib", type=float, default=3.0, help="watchdog threshold")
    parser.add_argument("--keep", action="store_true", help="keep the source and converted folders")
    args = parser.parse_args(argv)
    free = shutil.disk_usage(args.workdir.parent if not args.workdir.exists() else args.workdir).free
    print(f"free disk {free / 1e9:.0f} GB, MemAvailable {mem_available() / 2**30:.1f} GiB", flush=True)
    rows = []
    for name in args.shape or ["qwen2-vl-2b"]:
        rows += bench(name, args.workdir, args.max_shard_size, int(args.min_available_gib * 2**30), args.keep)
    print("| shape | run | checkpoint | wall | peak RSS | RSS / checkpoint | exit |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
