"""Which from-scratch recipe lets a tiny nativevl model learn to read? One ablation row per invocation.

Trains a fresh `build_tiny` model through the `nativevl train` path (`tiny_scratch` recipe: TRL SFTTrainer,
PackingCollator, LLM at lr 1e-3 constant after warmup) for a fixed number of STEPS, with one vision-side variant,
then scores greedy answers on the held-out set per content type (digit / number / code ... and colour / shape).
Also prints the input-dependent share of the vision tokens (`nativevl.training.vision_init`) before training,
after centring and at the end: the collapse the issue describes shows as a share near 0.

Variants (`--variant`):
    train-1e-3       ViT and merger trained at lr 1e-3 (what the demo passed before: the collapse)
    train-1e-3+c     the same after centring the vision tokens
    frozen           ViT and merger frozen at their random initialisation
    frozen+c         frozen, vision tokens centred (`--center_vision_tokens 256`)
    train-1e-4+c     ViT and merger trained at lr 1e-4 (warmup as the LLM), tokens centred
    train-1e-4+c+wd  the same with weight decay 0.1

Tasks (`--task`): corner-digit (one 9 px digit at the top-left, unresampled `snap` images: RESULTS.md's case),
random-digit (the digit anywhere), reading (the demo's items).

    python benchmarks/ablate_reading.py --out /tmp/abl --variant frozen+c --seed 0 --steps 1000
    python benchmarks/ablate_reading.py --out /tmp/abl --variant train-1e-3 --seed 1 --steps 1000

Rows are appended to `<out>/results.jsonl` (data under `<out>/data/<task>`, shared by the variants and seeds).
"""

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from nativevl.conversion.export import save_folder
from nativevl.demo import READING, SCRATCH_RECIPE, train_for, write_training_set
from nativevl.evaluation.run import evaluate, load_records
from nativevl.evaluation.synth_rc import generate_benchmark
from nativevl.processing import NativeVLProcessor
from nativevl.testing import build_tiny
from nativevl.training.vision_init import input_dependent_share, vision_tokens


def _vision(train: bool, lr: str | None = None) -> list[str]:
    flags = [f"--train_{part}" for part in ("vision_tower", "merger", "projector")]
    argv = [a for flag in flags for a in (flag, str(train).lower())]
    return argv + (["--vision_tower_lr", lr, "--merger_lr", lr] if lr else [])


VARIANTS = {
    "train-1e-3": _vision(True, "1e-3"),
    "train-1e-3+c": _vision(True, "1e-3"),
    "frozen": _vision(False),
    "frozen+c": _vision(False),
    "train-1e-4+c": _vision(True, "1e-4"),
    "train-1e-4+c+wd": _vision(True, "1e-4"),
}
TASKS = {
    "corner-digit": dict(rc_contents=["digit"], rc_placement="corner", text_size=13, snap=28),
    "random-digit": dict(rc_contents=["digit"], rc_placement="random", text_size=13, snap=28),
    "reading": READING,
    "reading-14px": READING | {"text_size": 20},  # capitals 14 px tall instead of 9
}


def variant_argv(variant: str) -> list[str]:
    argv = list(VARIANTS[variant])
    argv += ["--center_vision_tokens", "256" if variant.split("+")[1:2] == ["c"] else "0"]
    if variant.endswith("+wd"):
        argv += ["--weight_decay", "0.1"]
    return argv


def scores_by_content(run_dir: Path, records: list[dict]) -> dict[str, float]:
    content = {r["id"]: r["content"] for r in records}
    hits = defaultdict(list)
    for line in (run_dir / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        hits[content[row["id"]]].append(row["score"])
    return {name: round(100 * sum(v) / len(v), 1) for name, v in sorted(hits.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--task", choices=TASKS, default="corner-digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-per-cell", type=int, default=120, help="training items per cell and kind")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "data" / args.task
    items = TASKS[args.task]
    if not (data / "train" / "train.jsonl").is_file():
        write_training_set(data / "train", args.train_per_cell, 0, **items)
        generate_benchmark(data / "test", per_cell=4, seed=1, **{k: v for k, v in items.items()})
    train_jsonl, test_jsonl = data / "train" / "train.jsonl", data / "test" / "data.jsonl"
    records = load_records(test_jsonl)
    probe_images = [str(test_jsonl.parent / r["image"]) for r in records[::4]]

    run = out / f"{args.task}-{args.variant}-s{args.seed}"
    model, processor = build_tiny(seed=args.seed, max_pixels=448 * 448)
    share_init = input_dependent_share(vision_tokens(model, processor, probe_images))
    save_folder(model, processor, run / "init", overwrite=True)
    train_argv = [str(SCRATCH_RECIPE), "--model_name_or_path", str(run / "init"), "--dataset_path", str(train_jsonl)]
    train_argv += ["--output_dir", str(run / "train"), "--max_steps", str(args.steps), "--seed", str(args.seed)]
    train_argv += ["--overwrite", "true", *variant_argv(args.variant)]
    start = time.monotonic()
    trainer, final, stats = train_for(train_argv, seconds=float("inf"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    processor = NativeVLProcessor.from_pretrained(final)  # with the recipe's pixel bounds, as trained
    share_end = input_dependent_share(vision_tokens(model, processor, probe_images))
    scores = evaluate(
        model, processor, records, run / "eval", batch_size=16, max_new_tokens=16, progress=False,
        image_root=test_jsonl.parent, model_path=str(final), overwrite=True,
    )  # fmt: skip
    row = {"task": args.task, "variant": args.variant, "seed": args.seed, "steps": stats["steps"]}
    row |= {"train_seconds": stats["seconds"], "threads": args.threads, "last_loss": stats["mean_last_10_losses"]}
    row |= {"share_init": round(share_init, 4), "share_end": round(share_end, 4)}
    row |= {"accuracy": round(scores["accuracy"], 1), "by_content": scores_by_content(run / "eval", records)}
    row |= {"minutes": round((time.monotonic() - start) / 60, 2)}
    print(json.dumps(row), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
