"""Trains a tiny AVG-LLaVA model (arXiv 2410.02745) on the synthetic RC/SC benchmark for
`benchmarks/bench_granularity.py`.

1. Generates, with `nativevl.evaluation.synth_rc` at 1/8 linear scale (as `nativevl demo` does; `--scale`), a
   stage-1 training set, a separate RGLF set (the router is trained on feedback from items the model was not
   fitted on) and a held-out test set (`<out>/data/test/data.jsonl`). `--rc-contents digit`, `--rc-placement
   corner` and `--text-size` make the reading task easier; `--rc-contents tile` replaces reading by the colour of
   a one-token square (a detail that pooling mixes with its neighbours); `--vision-depth` / `--vision-embed-dim`
   size the ViT.
2. Stage 1, multi-granularity instruction tuning: a fresh `build_tiny(granularity=L)` model trained through the
   `nativevl train` path (`tiny_scratch` recipe: random frozen ViT with centred tokens, LLM at lr 1e-3;
   `--granularity_training all|random`) for `--stage1-steps` steps; the router stays frozen in this stage.
3. Stage 2, RGLF: `tiny_rglf` recipe from the stage-1 folder, router only, for its own time budget
   (`--rglf-token-cost`: the token cost of the feedback, 0 as released).
4. Prints which level the model's own feedback (lowest answer loss) prefers on RGLF items, per kind (RC/SC), and
   how many of them each level answers right.

`--rglf-only --rglf-dir NAME` repeats stage 2 alone from a finished run's stage-1 model and data (e.g. to compare
token costs), into `<out>/NAME`; with another `--rglf-per-cell` it first writes that many RGLF items per cell and
kind, like the run's own (`<out>/data/rglf-N`).

    python experiments/granularity/train_granularity.py --out /tmp/tile --rc-contents tile --snap \
        --rglf-token-cost 0.05
    python benchmarks/bench_granularity.py --model /tmp/tile/rglf/final --data /tmp/tile/data/test/data.jsonl

With the `tiny_scratch` recipe the tiny model reads the demo's items (experiments/reading/README.md, "Reading
from scratch"); a run with reading items (experiments/granularity/README.md has the tables):

    python experiments/granularity/train_granularity.py --out /tmp/avg0 --seed 0 \
        --rc-contents short_number short_code word --rc-placement grid --text-size 20 --snap --train-per-cell 120 \
        --stage1-steps 2000 --batch-size 8 --rglf-minutes 4 --rglf-token-cost 0.05
"""

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from nativevl.conversion.export import save_folder
from nativevl.demo import RECIPES, SCALE, train_for, write_training_set
from nativevl.evaluation.synth_rc import DEFAULT_RC_CONTENTS, RC_CONTENTS, RC_PLACEMENTS, generate_benchmark
from nativevl.testing import build_tiny


RGLF_PER_CELL = 20  # RGLF items per cell and kind by default (data/rglf)
ITEMS_FILE = "items.json"  # the item options of a run's data (`--rglf-only --rglf-per-cell` writes more like them)
COMMON = ["--max_steps", "100000", "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]


def feedback_summary(trainer, jsonl: Path, limit: int, batch_size: int = 16) -> dict:
    """Per kind: how often each level has the lowest answer loss (the release's RGLF target), the mean loss per
    level, and how many items each level answers right (teacher-forced greedy answer = label, the `exact_match`
    feedback)."""
    from nativevl.training.data import load_training_data

    examples, _ = load_training_data(str(jsonl))
    # spread over all cells (the file runs cell by cell, rc and sc alternating): take (rc, sc) pairs at a stride
    stride = max(1, len(examples) // limit) * 2
    examples = examples.select(sorted({i + j for i in range(0, len(examples) - 1, stride) for j in (0, 1)})[:limit])
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    best, totals, right, counts = {}, {}, {}, Counter()
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        levels = trainer.data_collator(chunk)["levels"]
        losses, errors = trainer.level_losses(model, levels), trainer.level_errors(model, levels)  # (samples, L)
        for example, row, wrong in zip(chunk, losses.tolist(), errors.tolist(), strict=True):
            kind = example["id"].rsplit("-", 1)[-1]
            counts[kind] += 1
            best.setdefault(kind, Counter())[min(range(len(row)), key=row.__getitem__)] += 1
            totals[kind] = [a + b for a, b in zip(totals.get(kind, [0.0] * len(row)), row, strict=True)]
            right[kind] = [a + (1 - b) for a, b in zip(right.get(kind, [0] * len(row)), wrong, strict=True)]
    return {
        kind: {
            "items": counts[kind],
            "best_level_counts": dict(sorted(best[kind].items())),
            "mean_loss_per_level": [round(t / counts[kind], 3) for t in totals[kind]],
            "right_per_level": [round(r) for r in right[kind]],
        }
        for kind in sorted(counts)
    }


def item_options(args: argparse.Namespace) -> dict:
    """The `generate_benchmark` keyword arguments of the items given on the command line."""
    items = {"rc_contents": args.rc_contents, "rc_placement": args.rc_placement, "text_size": args.text_size}
    items |= {"min_side": args.min_side} if args.min_side is not None else {}
    return items | {"scale": args.scale, "snap": 28 if args.snap else None}


def rglf_folder(out: Path, per_cell: int) -> Path:
    """Where the RGLF items live: `data/rglf` at the default count, `data/rglf-<per_cell>` for another."""
    return out / "data" / ("rglf" if per_cell == RGLF_PER_CELL else f"rglf-{per_cell}")


def run_stage1(args: argparse.Namespace, out: Path, batch: list[str]) -> tuple[Path, dict]:
    """Writes the three data sets under `<out>/data` (and their item options, `items.json`), then trains stage 1
    from a fresh tiny model."""
    print(f"generating data in {out / 'data'} ...", flush=True)
    items = item_options(args)
    train_jsonl = write_training_set(out / "data" / "train", args.train_per_cell, args.seed, **items)
    (out / "data" / ITEMS_FILE).write_text(json.dumps(items, indent=2))
    write_training_set(rglf_folder(out, args.rglf_per_cell), args.rglf_per_cell, args.seed + 2, **items)
    test_jsonl = generate_benchmark(out / "data" / "test", per_cell=args.test_per_cell, seed=args.seed + 1, **items)
    print(f"held-out set: {test_jsonl}", flush=True)

    if args.init_model:  # a trained model (e.g. `nativevl demo`'s): levels and a fresh router are added to it
        start, levels = args.init_model, ["--granularity", str(args.levels)]
        # the demo's own recipe (merger at 3e-4, ViT frozen), without re-centring: a trained merger's mean token is
        # part of what its LLM reads, and centring it away would change the reader's input
        recipe, levels = RECIPES / "tiny_from_stage0.yaml", [*levels, "--center_vision_tokens", "0"]
        print(f"stage 1 starts from {start}, adding {args.levels} levels", flush=True)
    else:
        vision = {"depth": args.vision_depth, "embed_dim": args.vision_embed_dim}
        model, processor = build_tiny(seed=args.seed, max_pixels=448 * 448, granularity=args.levels, vision=vision)
        print(f"model: {model.num_parameters()} parameters ({args.levels} levels)", flush=True)
        save_folder(model, processor, out / "init", overwrite=True)
        start, levels, recipe = str(out / "init"), [], RECIPES / "tiny_scratch.yaml"
    stage1 = [str(recipe), "--model_name_or_path", start, *levels]
    stage1 += ["--dataset_path", str(train_jsonl), "--output_dir", str(out / "stage1"), *COMMON[2:], *batch]
    stage1 += ["--granularity_training", args.granularity_training, "--max_steps", str(args.stage1_steps)]
    print(
        f"stage 1 ({args.granularity_training} levels, {recipe.stem} recipe) for {args.stage1_steps} steps "
        f"(at most {args.stage1_minutes} min) ...",
        flush=True,
    )
    _, stage1_final, stage1_stats = train_for(stage1, args.stage1_minutes * 60)
    print(f"stage 1: {stage1_stats}; model: {stage1_final}", flush=True)
    return stage1_final, stage1_stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gran-run", help="output folder (data, stage1, rglf, summary.json)")
    parser.add_argument("--levels", type=int, default=3, help="granularity levels L")
    parser.add_argument("--granularity-training", choices=["all", "random"], default="all")
    parser.add_argument("--stage1-steps", type=int, default=2000, help="stage-1 steps (tiny_scratch recipe)")
    parser.add_argument("--init-model", default=None, help="stage 1 from this trained folder instead of a fresh model")
    parser.add_argument("--stage1-minutes", type=float, default=30.0, help="wall-clock cap on stage 1")
    parser.add_argument("--rglf-minutes", type=float, default=4.0)
    parser.add_argument("--train-per-cell", type=int, default=40, help="stage-1 items per cell and kind")
    parser.add_argument("--rglf-per-cell", type=int, default=RGLF_PER_CELL, help="RGLF items per cell and kind")
    parser.add_argument("--test-per-cell", type=int, default=4, help="held-out items per cell and kind")
    parser.add_argument(
        "--rc-contents", nargs="+", choices=RC_CONTENTS, default=list(DEFAULT_RC_CONTENTS), help="RC content types"
    )
    parser.add_argument("--text-size", type=float, default=None, help="RC font size in px (default: the scale's)")
    parser.add_argument("--rc-placement", choices=RC_PLACEMENTS, default="random", help="where RC text is drawn")
    parser.add_argument("--scale", type=float, default=SCALE, help="linear scale of the synthetic images")
    parser.add_argument(
        "--min-side", type=int, default=None, help="shortest image side in px (the demo's text-anywhere items: 22)"
    )
    parser.add_argument(
        "--snap", action="store_true", help="image sides multiples of 28 px and min_pixels 28x28: no resampling"
    )
    parser.add_argument("--vision-depth", type=int, default=2, help="ViT blocks of the tiny model")
    parser.add_argument("--vision-embed-dim", type=int, default=64, help="ViT width of the tiny model")
    parser.add_argument("--rglf-token-cost", type=float, default=0.0, help="RGLF token cost (0: the release)")
    parser.add_argument(
        "--rglf-feedback", choices=["loss", "exact_match"], default="loss", help="what ranks the levels in RGLF"
    )
    parser.add_argument(
        "--rglf-only", action="store_true", help="reuse <out>/data and <out>/stage1/final: run stage 2 only"
    )
    parser.add_argument("--rglf-dir", default="rglf", help="stage-2 folder name under --out (to compare costs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out, seed = Path(args.out), args.seed
    torch.manual_seed(seed)
    start = time.monotonic()

    batch = ["--per_device_train_batch_size", str(args.batch_size), "--seed", str(seed)]
    if args.snap:  # no upscaling of 28 px sides, and no 224x224 cap (the recipes'): every snapped image as it is
        batch += ["--min_pixels", str(28 * 28), "--max_pixels", str(448 * 448)]
    rglf_jsonl, test_jsonl = rglf_folder(out, args.rglf_per_cell) / "train.jsonl", out / "data" / "test" / "data.jsonl"
    stage1_final = out / "stage1" / "final"
    if args.rglf_only:
        if missing := [str(p) for p in (test_jsonl, stage1_final) if not p.exists()]:
            parser.error(f"--rglf-only needs a finished run in {out}; missing: {', '.join(missing)}")
        stage1_stats = json.loads((out / "summary.json").read_text())["stage1"]
        if not rglf_jsonl.exists():  # another --rglf-per-cell: new RGLF items like the run's own
            saved = out / "data" / ITEMS_FILE
            items = json.loads(saved.read_text()) if saved.exists() else item_options(args)
            print(f"writing {args.rglf_per_cell} RGLF items per cell and kind ({items}) ...", flush=True)
            write_training_set(rglf_jsonl.parent, args.rglf_per_cell, args.seed + 2, **items)
    else:
        stage1_final, stage1_stats = run_stage1(args, out, batch)

    rglf = [str(RECIPES / "tiny_rglf.yaml"), "--model_name_or_path", str(stage1_final), "--granularity"]
    rglf += [str(args.levels), "--dataset_path", str(rglf_jsonl), "--output_dir", str(out / args.rglf_dir)]
    rglf += [*COMMON, *batch, "--logging_steps", "10", "--rglf_token_cost", str(args.rglf_token_cost)]
    rglf += ["--rglf_feedback", args.rglf_feedback]
    print(f"stage 2 (RGLF, router only) for {args.rglf_minutes} min ...", flush=True)
    trainer, final, rglf_stats = train_for(rglf, args.rglf_minutes * 60)
    print(f"RGLF: {rglf_stats}; model: {final}", flush=True)

    feedback = feedback_summary(trainer, rglf_jsonl, limit=320, batch_size=args.batch_size)
    print(f"model feedback on RGLF items (level with the lowest answer loss): {json.dumps(feedback)}", flush=True)
    summary = {"stage1": stage1_stats, "rglf": rglf_stats, "feedback": feedback, "model": str(final)}
    summary |= {"test_data": str(test_jsonl), "minutes": round((time.monotonic() - start) / 60, 2)}
    path = out / ("summary.json" if args.rglf_dir == "rglf" else f"summary-{args.rglf_dir}.json")
    path.write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['minutes']} min; summary: {path}", flush=True)
    print(f"next: python benchmarks/bench_granularity.py --model {final} --data {test_jsonl}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
