"""`torch.compile` vs eager: nativevl's forward (inference under `no_grad`, training with backward) and `generate`
with a static cache under a compiled forward; transformers' Qwen2-VL on the same weights compiled alike as the
baseline (`--no-transformers` skips it).

Each row prints the compile time (first call), the time per call after it (median of `--repeats`), the ratio
eager / compiled (> 1: compiled is faster) and the largest difference from eager (logits; generated tokens must be
identical). The vision tower breaks the graph (per-image splits and host-side position ids); the decoder compiles
whole.

    python benchmarks/bench_compile.py --preset tiny --repeats 2 --new-tokens 4    # a smoke run, a few minutes on CPU
    python benchmarks/bench_compile.py --preset small                             # CPU, fp32
    python benchmarks/bench_compile.py --preset qwen2-vl-2b-shape --device cuda --dtype bfloat16
"""

import argparse
import statistics
import time

import torch


PRESETS = {
    # name: (text hidden, layers, heads, kv heads, intermediate, vision depth, vision width, vision heads)
    "tiny": (32, 2, 4, 2, 64, 2, 32, 4),
    "small": (256, 4, 8, 2, 1024, 4, 256, 4),
    "qwen2-vl-2b-shape": (1536, 28, 12, 2, 8960, 32, 1280, 16),
}
GRIDS = [(1, 16, 22), (1, 8, 40), (1, 30, 12)]  # three images of different sizes and aspect ratios, in patches


def build(preset: str, device: str, dtype: torch.dtype):
    """transformers' Qwen2-VL with random weights and nativevl's model converted from it (the same weights)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from nativevl.conversion import from_qwen2_vl

    hidden, layers, heads, kv, inter, v_depth, v_width, v_heads = PRESETS[preset]
    head_dim = hidden // heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    section[0] += head_dim // 2 - sum(section)
    text = dict(
        vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, eos_token_id=2,
        bos_token_id=1, pad_token_id=0,
        rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0},
    )  # fmt: skip
    vision = dict(depth=v_depth, embed_dim=v_width, hidden_size=hidden, num_heads=v_heads, mlp_ratio=4)
    ids = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
    torch.manual_seed(0)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    reference = Qwen2VLForConditionalGeneration(config).to(device, dtype).eval()
    return reference, from_qwen2_vl(reference).to(device, dtype).eval()


def inputs(device: str, dtype: torch.dtype, batch: int = 2) -> dict:
    """`batch` rows, each with the three images between a few text tokens, and the labels of a training step."""
    generator = torch.Generator().manual_seed(0)
    row = []
    for t, h, w in GRIDS:
        row += torch.randint(3, 400, (5,), generator=generator).tolist() + [502] + [500] * (t * h * w // 4) + [503]
    row += torch.randint(3, 400, (7,), generator=generator).tolist()
    input_ids = torch.tensor([row] * batch, device=device)
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS) * batch, 1176, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels.to(device, dtype),
        "image_grid_thw": torch.tensor(GRIDS * batch, device=device),
    }


def timed(fn, repeats: int, device: str) -> tuple[float, float, object]:
    """(seconds of the first call, median seconds of `repeats` further calls, the last result)."""

    def once():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    first, result = once()
    times = []
    for _ in range(repeats):
        seconds, result = once()
        times.append(seconds)
    return first, statistics.median(times), result


def measure(model, batch: dict, args, extra: dict) -> dict[str, tuple]:
    """{task: (eager (first, median, result), compiled (first, median, result))} for one model."""
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= 500, -100)

    def infer(forward):
        with torch.no_grad():
            return forward(**batch, **extra).logits.float()

    def train(forward):
        model.zero_grad(set_to_none=True)
        out = forward(**batch, **extra, labels=labels)
        out.loss.backward()
        return out.logits.detach().float()

    def generate():
        return model.generate(**batch, **extra, max_new_tokens=args.new_tokens, do_sample=False,
                              cache_implementation="static")  # fmt: skip

    results = {}
    eager_forward = model.forward
    for task, run in (("inference", infer), ("training", train)):
        model.train(task == "training")
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=args.backend)
        results[task] = (timed(lambda r=run: r(model), args.repeats, args.device),
                         timed(lambda r=run, c=compiled: r(c), args.repeats, args.device))  # fmt: skip
    model.eval()
    eager = timed(generate, args.repeats, args.device)
    torch._dynamo.reset()
    model.forward = torch.compile(eager_forward, backend=args.backend)
    try:
        results["generate (static cache)"] = (eager, timed(generate, args.repeats, args.device))
    finally:
        model.forward = eager_forward
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor is torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--no-transformers", action="store_true", help="skip the Qwen2-VL baseline")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    reference, ours = build(args.preset, args.device, dtype)
    batch = inputs(args.device, dtype)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, preset {args.preset}, backend {args.backend}")
    models = [("nativevl", ours, {})]
    if not args.no_transformers:
        types = (batch["input_ids"] == 500).long()
        models.append(("transformers Qwen2-VL", reference, {"mm_token_type_ids": types}))
    header = f"{'model':<22} {'task':<24} {'compile s':>9} {'eager ms':>9} {'compiled ms':>11} {'eager/compiled':>14}"
    print(header + "  max |compiled - eager|")
    for name, model, extra in models:
        for task, (eager, compiled) in measure(model, batch, args, extra).items():
            if task.startswith("generate"):
                same = torch.equal(eager[2], compiled[2])
                diff = "tokens identical" if same else "TOKENS DIFFER"
            else:
                diff = f"{(compiled[2] - eager[2]).abs().max().item():.2e}"
            compile_s = compiled[0] - compiled[1]
            ratio = eager[1] / compiled[1]
            print(f"{name:<22} {task:<24} {compile_s:9.1f} {eager[1] * 1e3:9.1f} {compiled[1] * 1e3:11.1f} "
                  f"{ratio:14.2f}  {diff}")  # fmt: skip


if __name__ == "__main__":
    main()
