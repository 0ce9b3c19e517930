"""Training throughput: nativevl's padding-free `PackingCollator` vs TRL's padded `DataCollatorForVisionLanguageModeling`.

Same model, same examples, same batches (in the same order), same optimizer: each side runs forward + backward +
AdamW step on every batch. Examples mix image sizes sampled from the 7 area x 5 aspect bins of RC-Bench
(`nativevl.evaluation.synth_rc.sample_cell_size`) at `--scale`, with answers of varied length. Reported:
training tokens per second (tokens that are not padding, image tokens included), the padding fraction of the row
slots, the packed/padded speed ratio, and on CUDA the model FLOPs utilisation (6 x parameters x tokens + attention,
against `--peak-tflops`). The bound: were time proportional to row slots, removing the padding could speed training
up by at most 1 / (1 - padding) (padding of the padded side); the script prints it and the share of it reached.

    python benchmarks/bench_packing.py                               # CPU, fp32, nativevl_varlen: about a minute
    python benchmarks/bench_packing.py --steps 3 --batch-size 4 --preset tiny     # smoke run, seconds
    python benchmarks/bench_packing.py --device cuda --dtype bfloat16 --preset small --scale 0.5 \\
        --attn flash_attention_2 --batch-size 16 --steps 30          # GPU (flash-attn varlen when installed)
"""

import argparse
import random
import statistics
import time

import torch

from nativevl.evaluation.metrics import AREA_BINS, ASPECT_BINS
from nativevl.evaluation.synth_rc import make_item, sample_cell_size
from nativevl.modeling import NativeVLForConditionalGeneration
from nativevl.processing import NativeVLImageProcessor, NativeVLProcessor
from nativevl.testing import build_tiny_tokenizer, tiny_config
from nativevl.training import PackingCollator


# name: (text hidden, layers, heads, kv heads, vision embed, vision depth)
PRESETS = {"tiny": (64, 2, 4, 2, 64, 2), "small": (256, 4, 8, 4, 128, 4), "base": (1024, 12, 16, 4, 512, 12)}


def build(preset: str, max_pixels: int, attn: str):
    hidden, layers, heads, kv, embed, depth = PRESETS[preset]
    tokenizer = build_tiny_tokenizer()
    head_dim = hidden // heads
    sections = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen2-VL's 16/24/24 of 64 pairs, scaled
    config = tiny_config(
        tokenizer,
        vision=dict(embed_dim=embed, depth=depth, num_heads=max(2, embed // 32)),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": 1000000.0},
    )
    config._attn_implementation = attn
    model = NativeVLForConditionalGeneration(config)
    processor = NativeVLProcessor(NativeVLImageProcessor(max_pixels=max_pixels, num_threads=1), tokenizer)
    return model, processor


def make_examples(n: int, scale: float, seed: int) -> list[dict]:
    """Images sampled uniformly over the 35 (area, aspect) cells; questions and answers of varied length."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        nominal_w, nominal_h = sample_cell_size(rng.choice(AREA_BINS), rng.choice(ASPECT_BINS), rng)
        width, height = max(28, round(nominal_w * scale)), max(28, round(nominal_h * scale))
        image, record = make_item(rng.choice(("rc", "sc")), width, height, rng, text_size=12)
        answer = (
            record["answers"][0]
            + " "
            + " ".join(rng.choice(("yes", "no", "maybe")) for _ in range(rng.randint(0, 30)))
        )
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        examples.append({"id": i, "messages": messages, "images": [image]})
    return examples


def model_flops(model, tokens: int, seqlens: list[int]) -> float:
    """Training FLOPs: 6 x non-embedding parameters x tokens + 12 x layers x width x sum(seqlen^2) (attention)."""
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    text = model.config.text_config
    attention = 12 * text.num_hidden_layers * text.hidden_size * sum(s * s for s in seqlens) / 2
    return 6 * params * tokens + attention


def run(model, collator, batches, device, dtype, name: str) -> dict:
    """Trains on every batch twice (the first pass untimed); returns time, real tokens, row slots, FLOPs."""
    model = model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    collated = [collator(batch) for batch in batches]  # collation is timed by bench_processor; not here
    times, real, slots, flops = [], 0, 0, 0.0
    # two passes over the same batches: the first warms up kernels and allocator for every shape, the second is timed
    for step, batch in enumerate(collated + collated):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step < len(collated):
            continue  # warm-up pass
        times.append(time.perf_counter() - start)
        real_tokens = batch["input_ids"] != collator_pad_id(collator)  # (rows, seq): not padding
        real += int(real_tokens.sum())
        slots += batch["input_ids"].numel()
        if "attention_mask" in batch:
            seqlens = batch["attention_mask"].sum(-1).tolist()
        else:
            bounds = batch["cu_seq_lens_q"].tolist()
            flat = real_tokens.flatten()
            seqlens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True) if flat[a]]
        flops += model_flops(model, int(real_tokens.sum()), seqlens)
    return {
        "name": name,
        "seconds": sum(times),
        "median": statistics.median(times),
        "tokens": real,
        "slots": slots,
        "flops": flops,
    }


def collator_pad_id(collator) -> int:
    processor = collator.processor
    return processor.tokenizer.pad_token_id


def main(argv: list[str] | None = None) -> dict:
    """Prints the table, the speed ratio and the padding-free bound; returns those figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--attn", default="nativevl_varlen", help="attention of both sides; packed rows need a varlen path to pay off"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scale", type=float, default=0.25, help="linear scale of the nominal cell sizes")
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model, processor = build(args.preset, args.max_pixels, args.attn)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    examples = make_examples(args.batch_size * args.steps, args.scale, args.seed)
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    padded = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)
    results = []
    for name, collator in (("TRL padded", padded), ("nativevl packed", PackingCollator(processor))):
        model.load_state_dict(state)
        results.append(run(model, collator, batches, device, dtype, name))
    params = sum(p.numel() for p in model.parameters())
    print(f"model '{args.preset}' ({params / 1e6:.1f}M parameters) on {args.device} {args.dtype}, attn={args.attn}")
    print(
        f"{args.steps} timed steps of {args.batch_size} examples (images from all 35 area x aspect cells at scale {args.scale})"
    )
    print(
        f"{'collator':18}{'tokens/s':>12}{'padding':>10}{'s/step':>10}"
        + ("{:>8}".format("MFU") if device.type == "cuda" else "")
    )
    for r in results:
        line = f"{r['name']:18}{r['tokens'] / r['seconds']:>12.0f}{1 - r['tokens'] / r['slots']:>10.1%}{r['median']:>10.3f}"
        if device.type == "cuda":
            line += f"{r['flops'] / r['seconds'] / (args.peak_tflops * 1e12):>8.1%}"
        print(line)
    padded_r, packed_r = results
    ratio = (packed_r["tokens"] / packed_r["seconds"]) / (padded_r["tokens"] / padded_r["seconds"])
    print(f"speed ratio (packed / padded tokens per second): {ratio:.2f}x")
    # Both sides train the same tokens; if time followed row slots, packing could gain at most the padded side's
    # slots over the packed side's: 1 / (1 - padding) when the packed rows have none.
    padding = 1 - padded_r["tokens"] / padded_r["slots"]
    bound = padded_r["slots"] / packed_r["slots"]
    print(
        f"padding-free bound 1 / (1 - {padding:.1%}) = {bound:.2f}x; reached {ratio:.2f}x = {ratio / bound:.0%} of it"
    )
    return {
        "tokens_per_s": {r["name"]: r["tokens"] / r["seconds"] for r in results},
        "padding": {r["name"]: 1 - r["tokens"] / r["slots"] for r in results},
        "ratio": ratio,
        "bound": bound,
        "share_of_bound": ratio / bound,
    }


if __name__ == "__main__":
    main()
