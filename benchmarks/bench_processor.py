"""Image processor speed: NativeVLImageProcessor vs transformers' Qwen2VLImageProcessorPil, same images, same output.

The mixed set is seven random-noise RGB PIL images (fixed seed): 336x336, 1024x768, 2048x512, 512x2048,
1920x1080, 3000x200 and 4000x3000 (width x height), processed in one call at the default limits
(56*56 .. 28*28*1280 pixels). Both processors are warmed up, then timed (median of --repeats calls, interleaved). The script
checks that the grids are identical and prints the max abs difference of pixel_values, the seconds per call, the
patches out and the speed ratio (transformers / nativevl: > 1 means ours is faster).

    python benchmarks/bench_processor.py                      # the figure quoted in the docs
    python benchmarks/bench_processor.py --num-threads 1      # no thread pool: what vectorisation alone gives
    python benchmarks/bench_processor.py --scale 0.1 --repeats 1   # a smoke run in about a second
"""

import argparse
import os
import statistics
import time

import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nativevl.processing import NativeVLImageProcessor


SIZES = [(336, 336), (768, 1024), (512, 2048), (2048, 512), (1080, 1920), (200, 3000), (3000, 4000)]  # (h, w)


def mixed_set(scale: float = 1.0, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for h, w in SIZES:
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return images


def median_seconds(fns: list, repeats: int) -> list[float]:
    """Median seconds per call of each fn, calls interleaved so that machine noise hits all of them alike."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def main(argv: list[str] | None = None) -> dict:
    """Prints the table; returns the figures (seconds per call, ratio, max abs diff, patches)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per processor (median is reported)")
    parser.add_argument("--num-threads", type=int, default=None, help="NativeVL worker threads (default: its own)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale every image side (smoke runs)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.scale <= 0:
        parser.error("--repeats must be >= 1 and --scale > 0")

    images = mixed_set(args.scale)
    reference = Qwen2VLImageProcessorPil()
    ours = NativeVLImageProcessor(num_threads=args.num_threads)

    ref_out = reference(images, return_tensors="np")  # warm-up, and the outputs compared below
    our_out = ours(images, return_tensors="np")
    if not np.array_equal(ref_out["image_grid_thw"], our_out["image_grid_thw"]):
        raise SystemExit(f"grids differ:\n{ref_out['image_grid_thw']}\nvs\n{our_out['image_grid_thw']}")
    max_diff = float(np.abs(ref_out["pixel_values"] - our_out["pixel_values"]).max())
    if max_diff > 1e-5:
        raise SystemExit(f"pixel_values differ by up to {max_diff}")

    ref_s, our_s = median_seconds(
        [lambda: reference(images, return_tensors="np"), lambda: ours(images, return_tensors="np")], args.repeats
    )
    patches = our_out["pixel_values"].shape[0]
    threads = args.num_threads or min(8, os.cpu_count() or 1)  # the processor's default when None

    print(f"{len(images)} images, {sum(im.width * im.height for im in images) / 1e6:.1f} MP in, {patches} patches out")
    print(f"{'processor':<40} {'s / call':>10} {'patches':>9}")
    print(f"{'transformers Qwen2VLImageProcessorPil':<40} {ref_s:>10.4f} {patches:>9}")
    print(f"{f'NativeVLImageProcessor ({threads} threads)':<40} {our_s:>10.4f} {patches:>9}")
    print(
        f"speed ratio (transformers / nativevl): {ref_s / our_s:.2f}x   grids identical, max abs diff {max_diff:.3g}"
    )
    return {"transformers_s": ref_s, "nativevl_s": our_s, "ratio": ref_s / our_s, "max_abs_diff": max_diff}


if __name__ == "__main__":
    main()
