"""Which from-scratch recipe lets a tiny nativevl model learn to read? One ablation row per invocation.

Trains a fresh `build_tiny` model through the `nativevl train` path (`tiny_scratch` recipe: TRL SFTTrainer,
PackingCollator, LLM at lr 1e-3 constant after warmup) for a fixed number of STEPS, with one vision-side variant,
then scores greedy answers on the held-out set per content type (digit / number / code ... and colour / shape).
Also prints the input-dependent share of the vision tokens of the RC test images (`nativevl.training.vision_init`)
at the end: the collapse shows as a share near 0 (0.9% at the random initialisation, ~10% after centring).

Variants (`--variant`):
    train-1e-3       ViT and merger trained at lr 1e-3 (what the demo passed before: the collapse)
    train-1e-3+c     the same after centring the vision tokens
    frozen           ViT and merger frozen at their random initialisation
    frozen+c         frozen, vision tokens centred (`--center_vision_tokens 256`)
    train-1e-4+c     ViT and merger trained at lr 1e-4 (warmup as the LLM), tokens centred

Tasks (`--task`): corner-digit (one 9 px digit at the top-left, unresampled `snap` images: the README's case),
random-digit (the digit anywhere), reading-14px (the demo's items: short numbers, codes and words, capitals 14 px
tall, starting at a random merged-token cell) and reading (the same at 9 px).

    python experiments/reading/ablate_reading.py --out /tmp/abl --variant frozen+c --seed 0 --steps 1000
    python experiments/reading/ablate_reading.py --out /tmp/abl --variant train-1e-3 --seed 1 --steps 1000

Rows are appended to `<out>/results.jsonl` (data under `<out>/data/<task>`, shared by the variants and seeds; the
held-out set at the demo's 1/8 scale); each run folder's `run.json` records the command and the training figures,
and `--rescore` scores a finished run again.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from nativevl.conversion.export import save_folder
from nativevl.demo import READING, SCALE, SCRATCH_RECIPE, train_for, write_training_set
from nativevl.evaluation.data import load_records
from nativevl.evaluation.run import evaluate
from nativevl.evaluation.synth_rc import generate_benchmark
from nativevl.processing import NativeVLProcessor
from nativevl.runs import read_predictions
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
}
TASKS = {
    "corner-digit": dict(rc_contents=["digit"], rc_placement="corner", text_size=13, snap=28),
    "random-digit": dict(rc_contents=["digit"], rc_placement="random", text_size=13, snap=28),
    "reading": READING | {"text_size": 13},  # the demo's items with capitals 9 px tall
    "reading-14px": READING | {"text_size": 20},  # the demo's items (capitals 14 px tall)
}


def variant_argv(variant: str) -> list[str]:
    argv = list(VARIANTS[variant])
    return argv + ["--center_vision_tokens", "256" if variant.endswith("+c") else "0"]


def scores_by_content(run_dir: Path, records: list[dict]) -> dict[str, float]:
    content = {r["id"]: r["content"] for r in records}
    hits = defaultdict(list)
    for row in read_predictions(run_dir / "predictions.jsonl").values():
        hits[content[row["id"]]].append(row["score"])
    return {name: round(100 * sum(v) / len(v), 1) for name, v in sorted(hits.items())}


def held_out_set(out: Path, task: str, train_per_cell: int) -> tuple[Path, Path]:
    """The task's training set and held-out set (both at the demo's 1/8 scale), generated on first use."""
    data, items = out / "data" / task, TASKS[task]
    train_jsonl, test_jsonl = data / "train" / "train.jsonl", data / "heldout" / "data.jsonl"
    if not train_jsonl.is_file():
        write_training_set(data / "train", train_per_cell, 0, **items)
    if not test_jsonl.is_file():
        generate_benchmark(data / "heldout", per_cell=4, seed=1, scale=SCALE, **items)
    return train_jsonl, test_jsonl


def score(run: Path, model, final: Path, test_jsonl: Path) -> dict:
    """Greedy held-out scores of a trained run: overall, per content type, RC per area group; and the
    input-dependent share of the vision tokens of the RC test images."""
    records = load_records(test_jsonl)
    processor = NativeVLProcessor.from_pretrained(final)  # with the recipe's pixel bounds, as trained
    rc_images = [str(test_jsonl.parent / r["image"]) for r in records if r["kind"] == "rc"]
    scores = evaluate(
        model, processor, records, run / "eval", batch_size=16, max_new_tokens=16, progress=False,
        image_root=test_jsonl.parent, model_path=str(final), overwrite=True,
    )  # fmt: skip
    rows = [r for r in read_predictions(run / "eval" / "predictions.jsonl").values() if r["kind"] == "rc"]
    groups = {"A-B": "AB", "C-D": "CD", "E-G": "EFG"}
    by_area = {
        name: round(100 * statistics.fmean(r["score"] for r in rows if r["area_bin"] in bins), 1)
        for name, bins in groups.items()
    }
    return {
        "share_end": round(input_dependent_share(vision_tokens(model, processor, rc_images)), 4),
        "accuracy": round(scores["accuracy"], 1),
        "rc": round(scores["kind_accuracy"]["rc"], 1),
        "rc_by_area": by_area,
        "by_content": scores_by_content(run / "eval", records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--task", choices=TASKS, default="corner-digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-per-cell", type=int, default=120, help="training items per cell and kind")
    parser.add_argument("--llm-width", type=int, default=64, help="LLM hidden size (intermediate: twice it)")
    parser.add_argument("--rescore", action="store_true", help="score the run's trained model again, no training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_jsonl, test_jsonl = held_out_set(out, args.task, args.train_per_cell)
    width = "" if args.llm_width == 64 else f"-w{args.llm_width}"
    run = out / f"{args.task}-{args.variant}{width}-s{args.seed}"
    if args.rescore:
        final = run / "train" / "final"
        row = json.loads((run / "run.json").read_text())
        model = AutoModelForImageTextToText.from_pretrained(final).eval()
    else:
        row = {"task": args.task, "variant": args.variant, "seed": args.seed, "llm_width": args.llm_width}
        row |= {"command": "python experiments/reading/ablate_reading.py " + " ".join(argv or sys.argv[1:])}
        heads = args.llm_width // 16  # head dim 16, as the tiny config's M-RoPE sections (2, 3, 3) need
        size = {"hidden_size": args.llm_width, "intermediate_size": 2 * args.llm_width}
        size |= {"num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2)}
        model, processor = build_tiny(seed=args.seed, max_pixels=448 * 448, **size)
        save_folder(model, processor, run / "init", overwrite=True)
        train_argv = [str(SCRATCH_RECIPE), "--model_name_or_path", str(run / "init")]
        train_argv += ["--dataset_path", str(train_jsonl), "--output_dir", str(run / "train")]
        train_argv += ["--max_steps", str(args.steps), "--seed", str(args.seed), "--overwrite", "true"]
        trainer, final, stats = train_for([*train_argv, *variant_argv(args.variant)], seconds=float("inf"))
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        row |= {"parameters": model.num_parameters(), "steps": stats["steps"], "train_seconds": stats["seconds"]}
        row |= {"threads": args.threads, "last_loss": stats["mean_last_10_losses"]}
        (run / "run.json").write_text(json.dumps(row, indent=2))
    row |= score(run, model, final, test_jsonl)
    print(json.dumps(row), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
