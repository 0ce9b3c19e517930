"""Which per-image signal tells the reading items that pooling breaks (AVG, experiments/granularity/README.md): for
the RC items a granularity model reads on the full grid, separates those its coarsest level misreads from those it
still reads, by the area under the ROC curve (0.5: no better than chance) of

- what pooling removes from the image's own tokens: the distance of each level-0 token from the pooled token that
  replaces it, over the image's mean token spread (mean and max over the image, at each level above 0);
- the model's confidence in its coarse answer: the lowest probability of an answer token (`answer_confidence`,
  what `generate(fallback_threshold=...)` thresholds), at the coarsest level;
- the image's width and height.

    python experiments/granularity/probe_fallback_signal.py --model runs/avg/stage1/final \
        --data runs/avg/data/test/data.jsonl
"""

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the maintained bench_granularity.py
from bench_granularity import answer  # noqa: E402

from nativevl.evaluation.data import load_image, load_records  # noqa: E402
from nativevl.evaluation.metrics import score_sample  # noqa: E402
from nativevl.modeling import NativeVLForConditionalGeneration, pool_grid  # noqa: E402
from nativevl.processing import NativeVLProcessor  # noqa: E402


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counting one half."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return sum(pairs) / len(pairs) if pairs else float("nan")


@torch.inference_mode()
def pooling_residuals(model, processor, image) -> dict[str, float]:
    """Per level above 0: mean and max over the image of |token - its pooled token| / mean |token - mean token|."""
    batch = processor.image_processor([image], return_tensors="pt")
    features = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
    t, h, w = (int(x) for x in batch["image_grid_thw"][0])
    merge = model.config.vision_config.spatial_merge_size
    grid = (t, h // merge, w // merge)
    x = features.view(*grid, -1)  # (t, h, w, D)
    spread = (x - features.mean(0)).norm(dim=-1).mean().clamp(min=1e-12)
    out = {}
    for level in range(1, model.config.granularity):
        pooled, (pt, ph, pw) = pool_grid(features, grid, level)
        rows, cols = 2 ** (level // 2), 2 ** ((level + 1) // 2)  # 1x2 (width) first, then 2x1 (height)
        back = (
            pooled.view(pt, ph, pw, -1).repeat_interleave(rows, 1).repeat_interleave(cols, 2)[:, : grid[1], : grid[2]]
        )
        residual = (x - back).norm(dim=-1) / spread  # (t, h, w)
        out[f"residual level {level}, mean"], out[f"residual level {level}, max"] = residual.mean(), residual.max()
    return {k: float(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="nativevl folder whose config sets granularity")
    parser.add_argument("--data", required=True, help="synth_rc data.jsonl")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    model = NativeVLForConditionalGeneration.from_pretrained(args.model).eval()
    processor = NativeVLProcessor.from_pretrained(args.model)
    if not model.config.granularity:
        parser.error(f"{args.model} has no granularity levels")
    coarsest, root = model.config.granularity - 1, Path(args.data).parent
    records = [r for r in load_records(args.data) if r["kind"] == "rc"]
    rows = []  # per item read on the full grid: (broken at the coarsest level, {signal: value})
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        images = [load_image(r, root) for r in chunk]
        questions = [r["question"] for r in chunk]
        full = answer(model, processor, images, questions, "full", args.max_new_tokens)[0]
        # threshold 0: no fallback, so these are the coarsest level's answers and their confidence
        coarse, _, _, confidence = answer(model, processor, images, questions, "cascade", args.max_new_tokens, 0.0)
        for record, image, a_full, a_coarse, c in zip(chunk, images, full, coarse, confidence, strict=True):
            if score_sample(a_full, record["answers"], record.get("metric")) < 1:
                continue
            broken = score_sample(a_coarse, record["answers"], record.get("metric")) < 1
            signals = pooling_residuals(model, processor, image)
            signals |= {"coarse answer confidence (low = broken)": -c, "width": image.width, "height": image.height}
            rows.append((broken, signals))
    if not rows:
        print(f"none of the {len(records)} RC items is read on the full grid: nothing to separate")
        return 0
    broken = sum(b for b, _ in rows)
    print(f"{len(rows)} RC items read on the full grid; the coarsest level (level {coarsest}) misreads {broken}")
    print(f"{'signal':>42} | AUC")
    for name in rows[0][1]:
        positive = [s[name] for b, s in rows if b]
        negative = [s[name] for b, s in rows if not b]
        print(f"{name:>42} | {auc(positive, negative):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
