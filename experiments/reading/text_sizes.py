"""RC accuracy of a demo model per font size, on the demo's own held-out generator (text at random pixel positions).

`nativevl demo` tests at one font size (20: capitals 14 px tall). This draws the same kind of held-out set (the
demo's `READING_ANYWHERE` items, RC only, `--per-cell` items per cell, seed `--seed`) once per `--sizes` font size,
and scores the model in native mode on each: does it read text drawn small or large at its own size (not resampled,
as `benchmarks/invariance.py`'s scales are)?

    python experiments/reading/text_sizes.py --model nativevl-demo/train/final --out /tmp/sizes --sizes 16 18 20 25

Writes `<out>/data-<size>` (the items), `<out>/run-<size>` (predictions, scores) and `<out>/sizes.json`.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import nativevl  # noqa: F401  (registers the Auto classes)
from nativevl.demo import READING_ANYWHERE, SCALE
from nativevl.evaluation.data import load_records
from nativevl.evaluation.run import evaluate
from nativevl.evaluation.synth_rc import generate_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a nativevl model folder (e.g. a demo's train/final)")
    parser.add_argument("--out", required=True, help="folder for the items, runs and sizes.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 18, 20, 25], help="font sizes (the demo: 20)")
    parser.add_argument("--per-cell", type=int, default=4, help="RC items per cell (35 cells)")
    parser.add_argument("--seed", type=int, default=1, help="item seed (a demo of seed s holds out seed s + 1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    result = {"model": args.model, "per_cell": args.per_cell, "seed": args.seed, "rc_accuracy": {}}
    for size in args.sizes:
        items = READING_ANYWHERE | {"text_size": size}
        data = generate_benchmark(out / f"data-{size}", args.per_cell, args.seed, ("rc",), scale=SCALE, **items)
        scores = evaluate(
            model, processor, load_records(data), out / f"run-{size}", batch_size=16, max_new_tokens=8,
            progress=False, overwrite=True, image_root=data.parent,
        )  # fmt: skip
        result["rc_accuracy"][str(size)] = round(scores["accuracy"], 1)
        print(f"  font size {size}: RC {scores['accuracy']:5.1f} ({scores['count']} items)", flush=True)
    (out / "sizes.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
