"""Vision tower forward: nativevl vs transformers' Qwen2-VL vision tower, same weights, same mixed batch.

The batch is the seven images of the processor benchmark (336x336 up to 4000x3000 and 3000x200) resized by the
Qwen2-VL rule at the default limits (56*56 .. 28*28*1280 pixels), packed into one sequence. Each side runs in its
own child process so that peak memory is measured separately (peak RSS growth on CPU, peak allocated on CUDA).
Prints time per forward and peak memory for both, and the ratios (transformers / nativevl: > 1 means ours is
faster or smaller).

    python benchmarks/bench_vision.py                       # CPU, fp32, a narrow 4-block ViT at real resolution
    python benchmarks/bench_vision.py --preset tiny --repeats 1   # seconds, for a smoke run
    python benchmarks/bench_vision.py --device cuda --dtype bfloat16 --preset qwen2-vl-2b --attn sdpa
    python benchmarks/bench_vision.py --device cuda --dtype bfloat16 --preset qwen2-vl-2b --attn flash_attention_2
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch


SIZES = [(336, 336), (768, 1024), (512, 2048), (2048, 512), (1080, 1920), (200, 3000), (3000, 4000)]  # (h, w)
PRESETS = {
    # name: (depth, embed_dim, num_heads, merger output width)
    "tiny": (1, 64, 2, 64),
    "small": (4, 256, 4, 256),
    "qwen2-vl-2b": (32, 1280, 16, 1536),
}


def grids(max_pixels: int) -> list[list[int]]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    out = []
    for h, w in SIZES:
        rh, rw = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=max_pixels)
        out.append([1, rh // 14, rw // 14])
    return out


def vision_config(preset: str) -> dict:
    depth, embed_dim, heads, hidden = PRESETS[preset]
    return dict(depth=depth, embed_dim=embed_dim, num_heads=heads, hidden_size=hidden, mlp_ratio=4)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    """Builds one side from the shared weights file, times its forward, prints one JSON line."""
    from safetensors.torch import load_file
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from nativevl.modeling import NativeVLVisionConfig, NativeVLVisionModel

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config_kwargs = dict(vision_config(args.preset), attn_implementation=args.attn)
    if args.side == "nativevl":
        model = NativeVLVisionModel(NativeVLVisionConfig(**config_kwargs))
    else:
        model = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**config_kwargs))
    model.load_state_dict(load_file(args.weights), strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    grid_thw = torch.tensor(json.loads(args.grids), device=device)
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(0))
    pixel_values = pixel_values.to(device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            out = model(pixel_values, grid_thw=grid_thw).pooler_output
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    # peak memory of the forwards over what the process held before the first one (weights and inputs loaded):
    # on CPU the peak RSS growth, on CUDA the peak allocated growth
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss_bytes()
    run()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    torch.save(out.float().cpu(), args.output)
    print(json.dumps({"seconds": statistics.median(times), "peak_bytes": max(peak, 0)}))


def main(argv: list[str] | None = None) -> dict | None:
    """Prints the table; returns the figures (seconds and peak bytes per side, ratios, max abs diff)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa", help="sdpa | eager | flash_attention_2")
    parser.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--side", choices=["nativevl", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--grids", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        worker(args)
        return None

    from safetensors.torch import save_file
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    grid_list = grids(args.max_pixels)
    patches = sum(t * h * w for t, h, w in grid_list)
    torch.manual_seed(0)
    reference = Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(**vision_config(args.preset)))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "vision.safetensors")
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, weights)
        del reference
        for side in ("transformers", "nativevl"):
            output = os.path.join(tmp, f"{side}.pt")
            cmd = [sys.executable, __file__, "--side", side, "--weights", weights, "--output", output]
            cmd += ["--grids", json.dumps(grid_list), "--preset", args.preset, "--device", args.device]
            cmd += ["--dtype", args.dtype, "--attn", args.attn, "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[side] = json.loads(line)
            results[side]["out"] = torch.load(output)
    diff = (results["nativevl"]["out"] - results["transformers"]["out"]).abs().max().item()
    theirs, ours = results["transformers"], results["nativevl"]
    print(f"vision tower '{args.preset}' on {args.device} {args.dtype} attn={args.attn}, threads={args.threads}")
    print(f"batch: {len(grid_list)} images, {patches} patches, {patches // 4} LLM tokens; grids {grid_list}")
    print(f"{'':14}{'seconds':>10}{'peak MiB':>12}")
    for name, r in (("transformers", theirs), ("nativevl", ours)):
        print(f"{name:14}{r['seconds']:>10.3f}{r['peak_bytes'] / 2**20:>12.1f}")
    print(f"speed ratio (transformers / nativevl): {theirs['seconds'] / ours['seconds']:.2f}x")
    print(f"peak memory ratio (transformers / nativevl): {theirs['peak_bytes'] / max(ours['peak_bytes'], 1):.2f}x")
    print(f"max abs difference of merged features: {diff:.2e}")
    return {
        "seconds": {side: r["seconds"] for side, r in results.items()},
        "peak_bytes": {side: r["peak_bytes"] for side, r in results.items()},
        "speed_ratio": theirs["seconds"] / ours["seconds"],
        "memory_ratio": theirs["peak_bytes"] / max(ours["peak_bytes"], 1),
        "max_abs_diff": diff,
        "patches": patches,
    }


if __name__ == "__main__":
    main()
