"""`nativevl demo`: a native-resolution VLM trained on a CPU and evaluated end to end, with no download.

1. Generates a synthetic resolution-centric training set and a held-out test set over the 35 area x aspect cells
   (`nativevl.evaluation.synth_rc`, images at 1/8 linear scale so a laptop CPU keeps up): RC items ask for a short
   number, code or word printed at a fixed pixel height (14 px capitals) at a random pixel position in an image whose
   sides are not multiples of 28 px (the processor resamples it), SC items for the background colour or the large
   shape; the training set holds a third as many SC items as RC ones (`SC_SHARE`), so most steps train reading.
2. Trains a small nativevl model through the `nativevl train` path (TRL SFTTrainer, padding-free multimodal packing)
   for a fixed number of steps, starting from the vision tower shipped with nativevl (`PRETRAINED_VISION`:
   `training/pretrain_vision.py` on the `tiny_stage0` recipe), and exports a remote-code folder. The
   `tiny_from_stage0` recipe (`RECIPE`): the ViT as pre-trained, the merger trained at 3e-4, the LLM from scratch at
   1e-3, learning rates decaying linearly to 0; `--from-scratch`: the `tiny_scratch` recipe (the random vision side
   frozen with centred tokens).
3. Answers a question about a freshly generated image through `pipeline("image-text-to-text")`.
4. Evaluates the model in native, fixed (56x56 and 112x112 px: about 4 and 16 tokens) and crop mode and with
   blank images (does it use the image at all?) and prints the summary, the RC accuracy per area and aspect bin
   with native minus fixed, and the heatmap paths (the native-minus-fixed heatmap of RC items is NativeRes-LLaVA's
   figure). Every figure printed is measured in this run.

    nativevl demo                       # about 13.5 minutes on 2 cores, writes ./nativevl-demo
    nativevl demo --steps 300 --out /tmp/demo
    nativevl demo --vision-init stage0  # from another `python -m nativevl.training.pretrain_vision` tower
    nativevl demo --from-scratch        # the random frozen tower, text on the 28 px token grid (for comparison)

Training runs for `--steps` steps, so its figures do not depend on the machine's load; `--max-minutes` caps its
wall-clock time, and a run stopped by the cap says so. A rerun into the same --out starts over (new data, a new
model, evaluation runs redone); one with other options is refused (`--overwrite` allows it), and so is a second
demo writing into the folder at the same time.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from nativevl.conversion.export import save_folder
from nativevl.evaluation.data import load_records
from nativevl.evaluation.metrics import AREA_BINS, ASPECT_BINS, summarize
from nativevl.evaluation.report import AREA_LABELS, ASPECT_LABELS, grid_difference, render_heatmap
from nativevl.evaluation.run import evaluate
from nativevl.evaluation.synth_rc import KINDS, generate_benchmark, make_item
from nativevl.runs import LOCK_FILE, RunFolderError, RunLock, check_fingerprint, read_predictions
from nativevl.testing import build_tiny
from nativevl.training.pretrain_vision import CONFIG_FILE as VISION_CONFIG_FILE
from nativevl.training.pretrain_vision import load_vision_weights
from nativevl.training.train import build_trainer, export_final, parse


RECIPES = Path(__file__).parent / "training" / "recipes"
RECIPE = RECIPES / "tiny_from_stage0.yaml"  # from a pre-trained tower: the merger learns with the LLM
SCRATCH_RECIPE = RECIPES / "tiny_scratch.yaml"  # from the random tower: the vision side frozen, its tokens centred
# the vision tower the demo starts from: `python -m nativevl.training.pretrain_vision` on the tiny_stage0 recipe,
# shipped as package data with its model card (README.md there: command, seed, commit, metrics)
PRETRAINED_VISION = Path(__file__).parent / "training" / "pretrained" / "stage0"
SCALE = 1 / 8  # linear scale of the synthetic images: nominal cell sizes / 8 (areas / 64)
# `--from-scratch` RC items: short text at a fixed pixel height (14 px capitals) in images whose sides are multiples
# of 28 px (native mode feeds them unresampled), starting at a random merged-token cell: the only placement the random
# frozen tower lets the LLM read (experiments/reading/README.md)
READING = dict(rc_contents=["short_number", "short_code", "word"], rc_placement="grid", text_size=20, snap=28)
# the default, from a pre-trained vision tower (training/pretrain_vision.py): the same items with the text at a
# random pixel position in images of any size (the processor resamples them), as in photos and documents; sides of at
# least 22 px so that the 14 px text fits the thinnest images (at 1/8 scale bin A's 1:5 images are ~15 px tall)
READING_ANYWHERE = dict(
    rc_contents=["short_number", "short_code", "word"], rc_placement="random", text_size=20, min_side=22
)
FIXED_PIXELS = 56 * 56  # the Fixed baseline at this scale: about 4 LLM tokens per image (2-8), aspect kept
# A second Fixed budget, 112x112 px (about 16 tokens: 8-24, 14.7-14.8 per item on the demo's items). The paper's
# Fixed (182 tokens) still spreads a large object over many tokens; in 4 the demo's tiny LLM names the large shape
# less well than from the native grid although the tokens carry it (experiments/modes/README.md, "The shape question
# at 4 tokens"); in 16 it names it about as well, and the reading in large and extreme-aspect images is still lost.
FIXED16_PIXELS = 112 * 112
# the Crop baseline at this scale (LLaVA-NeXT's 336 px tiles / 8 -> 56): a 56x56 global view plus 2-4 56x56 tiles
CROP = {
    "crop_base_size": 56,
    "crop_grid_pinpoints": [[56 * h, 56 * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))],
}
# the demo's evaluation runs: `evaluate` settings per run name, and what they share (every demo trains a new model,
# so its evaluation runs start over, overwrite, instead of being refused)
SETTINGS = {
    "native": dict(mode="native"),
    "fixed": dict(mode="fixed", images_kwargs={"fixed_pixels": FIXED_PIXELS}),
    "fixed16": dict(mode="fixed", images_kwargs={"fixed_pixels": FIXED16_PIXELS}),
    "crop": dict(mode="crop", images_kwargs=CROP),
    "blank": dict(mode="native", blank_images=True),
}
EVALUATION = dict(batch_size=16, max_new_tokens=16, progress=False, overwrite=True)
# 12600 RC training items: at 120 per cell and 4500 steps (9 passes) the model fits its training items (RC 86% on
# them) far better than it reads new ones (64%; experiments/reading/README.md). SC (the main colour) is learnt from
# far fewer: a third as many SC items puts three of every four steps' samples on reading.
TRAIN_PER_CELL = 360
SC_SHARE = 1 / 3  # SC training items per RC item, the default of --train-sc-per-cell
DEFAULT_STEPS = 3300  # on the reference machine (2 cores), alone: 4.2-4.4 steps/s, 13.4-14.0 min in all (budget 15)
RUN_FILE = "demo_run.json"  # the options of the demo that wrote an --out folder (`nativevl.runs.check_fingerprint`)
EXTREMES = {"large area (E, F, G)": ("area", ("E", "F", "G")), "extreme aspect (BH, BW)": ("aspect", ("BH", "BW"))}


class WallClockCap(TrainerCallback):
    """Stops training once `seconds` have passed since the first step; `hit` tells whether it did."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = None
        self.hit = False

    def on_step_end(self, args, state, control, **kwargs):
        self.start = self.start or time.monotonic()
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = self.hit = True
        return control


def write_training_set(
    folder: Path, per_cell: int | dict[str, int], seed: int, scale: float = SCALE, **benchmark
) -> Path:
    """The synthetic benchmark generator's items as TRL conversational examples (`train.jsonl`); `per_cell`: items
    per cell of each kind, or {kind: count}; `benchmark`: further keyword arguments of `generate_benchmark` (e.g.
    `rc_contents`, `text_size`)."""
    data = generate_benchmark(folder, per_cell=per_cell, seed=seed, scale=scale, **benchmark)
    out = folder / "train.jsonl"
    with open(out, "w") as f:
        for record in load_records(data):
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": record["answers"][0]}]},
            ]
            f.write(json.dumps({"id": record["id"], "messages": messages, "images": [record["image"]]}) + "\n")
    return out


def train(
    out: Path, train_jsonl: Path, steps: int, max_seconds: float, seed: int, vision_init: str | None = None
) -> tuple[Path, dict]:
    """Trains a fresh tiny model for `steps` steps (`recipe_for(vision_init)`, nothing overridden but the step
    count) through the `nativevl train` path, stopping early after `max_seconds`; returns the final folder.
    `vision_init`: a pre-trained tower (`training/pretrain_vision.py` output folder) the model starts from, its
    vision config included; None: the random tower of `build_tiny`."""
    save_folder(*initial_model(seed, vision_init), out / "init", overwrite=True)
    recipe = recipe_for(vision_init)
    argv = [str(recipe), "--model_name_or_path", str(out / "init"), "--dataset_path", str(train_jsonl)]
    argv += ["--output_dir", str(out / "train"), "--max_steps", str(steps), "--seed", str(seed), "--overwrite", "true"]
    trainer, final, stats = train_for(argv, max_seconds)
    stats["fill_rate"] = trainer.data_collator.fill_rate
    return final, stats | {"recipe": recipe.name}


def initial_model(seed: int, vision_init: str | Path | None = None):
    """The demo's fresh tiny model and processor: `build_tiny`'s, with the pre-trained tower in `vision_init` (its
    vision config and weights) when given."""
    vision = None if vision_init is None else json.loads((Path(vision_init) / VISION_CONFIG_FILE).read_text())
    model, processor = build_tiny(seed=seed, max_pixels=448 * 448, vision=vision)
    if vision_init is not None:
        load_vision_weights(model, vision_init)
    return model, processor


def recipe_for(vision_init: str | None) -> Path:
    """The demo's training recipe: `RECIPE` from a pre-trained tower, `SCRATCH_RECIPE` from the random one (None)."""
    return SCRATCH_RECIPE if vision_init is None else RECIPE


def train_for(argv: list[str], seconds: float):
    """One `nativevl train` run (recipe + overrides in `argv`) until its `max_steps` or, earlier, after `seconds`
    of training; exports the final folder. Returns the trainer, the folder and stats (steps, seconds, steps per
    second, whether the wall-clock cap stopped it, first / last / mean of the last 10 logged losses)."""
    training_args, args = parse(argv)
    trainer = build_trainer(training_args, args)
    cap = WallClockCap(seconds)
    trainer.add_callback(cap)
    result = trainer.train()
    final = Path(export_final(trainer, args, training_args.output_dir))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    seconds_run = result.metrics["train_runtime"]
    stats = {
        "steps": trainer.state.global_step,
        "max_steps": training_args.max_steps,
        "seconds": round(seconds_run, 1),
        "steps_per_second": round(trainer.state.global_step / seconds_run, 2) if seconds_run else None,
        "stopped_by_wall_clock": cap.hit,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "mean_last_10_losses": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }
    return trainer, final, stats


def ask_pipeline(final: Path, seed: int, reading: dict = READING) -> list[dict]:
    """Two fresh images, one RC and one SC, through `pipeline("image-text-to-text")` (remote code, loaded as a user
    would load it, batch of 2)."""
    from transformers import pipeline

    items = [
        make_item(kind, 196, 84, random.Random(f"demo-pipeline/{seed}/{kind}"), **_item_args(reading))
        for kind in KINDS
    ]
    pipe = pipeline("image-text-to-text", model=str(final), trust_remote_code=True)
    messages = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": r["question"]}]}]
        for image, r in items
    ]
    outputs = pipe(text=messages, max_new_tokens=12, generate_kwargs={"do_sample": False}, batch_size=2)
    return [
        {
            "question": r["question"],
            "expected": r["answers"][0],
            "answer": o[0]["generated_text"][-1]["content"].strip(),
        }
        for (_, r), o in zip(items, outputs, strict=True)
    ]


def _item_args(reading: dict = READING) -> dict:
    """`make_item` keyword arguments of the demo's RC items (`reading` without the benchmark-level sizes)."""
    return {k: v for k, v in reading.items() if k not in ("snap", "min_side")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nativevl demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="nativevl-demo", help="output folder (data, model, runs)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps (16 samples each)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock cap on training (minutes)")
    parser.add_argument(
        "--train-per-cell",
        type=int,
        default=TRAIN_PER_CELL,
        help="RC (reading) training items per cell (35 cells)",
    )
    parser.add_argument(
        "--train-sc-per-cell",
        type=int,
        default=None,
        help=f"SC (main colour) training items per cell; default: {SC_SHARE:.2g} of --train-per-cell (at least 1)",
    )
    parser.add_argument("--test-per-cell", type=int, default=4, help="held-out items per cell and kind")
    parser.add_argument("--seed", type=int, default=0)
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--vision-init",
        default=None,
        metavar="DIR",
        help="the pre-trained vision tower to start from (a `python -m nativevl.training.pretrain_vision` output "
        f"folder); default: the one shipped with nativevl ({PRETRAINED_VISION.relative_to(Path(__file__).parent)})",
    )
    start.add_argument(
        "--from-scratch",
        action="store_true",
        help="no pre-trained tower: the random frozen ViT, and the text on the 28 px token grid of images whose sides "
        "are multiples of 28 px (the only placement a random tower reads; for comparison)",
    )
    parser.add_argument("--overwrite", action="store_true", help="reuse an --out folder of a demo with other options")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.max_minutes <= 0:
        parser.error(f"--steps must be >= 1 and --max-minutes positive, got {args.steps} and {args.max_minutes}")
    if args.train_sc_per_cell is None:
        args.train_sc_per_cell = max(1, round(args.train_per_cell * SC_SHARE))
    if min(args.train_per_cell, args.train_sc_per_cell, args.test_per_cell) < 1:
        parser.error(
            "--train-per-cell, --train-sc-per-cell and --test-per-cell must be >= 1, got "
            f"{args.train_per_cell}, {args.train_sc_per_cell}, {args.test_per_cell}"
        )
    tower = None if args.from_scratch else Path(args.vision_init or PRETRAINED_VISION)
    if tower is not None and not (tower / VISION_CONFIG_FILE).is_file():
        parser.error(f"--vision-init {tower} holds no {VISION_CONFIG_FILE}: not a pre-trained vision tower folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} exists and is not a folder")
    foreign = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / RUN_FILE).is_file()
    if foreign and not args.overwrite:
        raise RunFolderError(f"--out {out} is not empty and not a demo folder (no {RUN_FILE}); --overwrite uses it")
    with RunLock(out):
        names = ("steps", "max_minutes", "train_per_cell", "train_sc_per_cell", "test_per_cell", "seed")
        options = {k: getattr(args, k) for k in names}
        if not args.from_scratch:  # (absent from scratch: folders of earlier from-scratch demos keep theirs)
            args.vision_init = str(tower.resolve())
            options["vision_init"] = args.vision_init
        check_fingerprint(out / RUN_FILE, options, args.overwrite)
        return run_demo(out, args)


def run_demo(out: Path, args: argparse.Namespace) -> int:
    """The four steps of the module docstring into `out` (locked and fingerprinted by `main`)."""
    start = time.monotonic()
    torch.manual_seed(args.seed)

    reading = READING if args.from_scratch else READING_ANYWHERE
    print(f"[1/4] generating data in {out / 'data'} ...", flush=True)
    per_cell = {"rc": args.train_per_cell, "sc": args.train_sc_per_cell}
    train_jsonl = write_training_set(out / "data" / "train", per_cell, args.seed, **reading)
    test_jsonl = generate_benchmark(
        out / "data" / "test", per_cell=args.test_per_cell, seed=args.seed + 1, scale=SCALE, **reading
    )
    n_train, records = sum(1 for _ in open(train_jsonl)), load_records(test_jsonl)
    print(
        f"      {n_train} training items ({args.train_per_cell} RC and {args.train_sc_per_cell} SC per cell), "
        f"{len(records)} held-out items (35 cells x 2 kinds)",
        flush=True,
    )

    print(f"[2/4] training a fresh model for {args.steps} steps ({recipe_for(args.vision_init).name}) ...", flush=True)
    final, stats = train(out, train_jsonl, args.steps, args.max_minutes * 60, args.seed, args.vision_init)
    capped = f" (stopped by --max-minutes {args.max_minutes:g} after {stats['steps']} of {args.steps})"
    print(
        f"      {stats['steps']} steps in {stats['seconds']} s ({stats['steps_per_second']} steps/s)"
        f"{capped if stats['stopped_by_wall_clock'] else ''}, loss {_num(stats['first_loss'], '.3f')} -> "
        f"{_num(stats['mean_last_10_losses'], '.3f')} (mean of the last 10 logged), packing fill rate "
        f"{stats['fill_rate']:.1%}; model: {final}",
        flush=True,
    )

    print("[3/4] pipeline('image-text-to-text') on two fresh images:", flush=True)
    asked = ask_pipeline(final, args.seed, reading)
    for qa in asked:
        print(f"      Q: {qa['question']}  expected: {qa['expected']!r}  answer: {qa['answer']!r}", flush=True)

    print("[4/4] evaluating on the held-out set: native, fixed (56 and 112 px), crop, blank images ...", flush=True)
    runs = evaluate_modes(final, records, test_jsonl.parent, out)
    rc = {name: rc_summary(out / "runs" / name) for name in runs}
    print(summary_text(runs, rc, out))
    summary = {"training": stats, "pipeline": asked, "runs": {}}
    for name, scores in runs.items():
        summary["runs"][name] = run_row(scores, rc[name])
    summary["rc_native_minus_fixed"] = extremes_gap(rc["native"], rc["fixed"])
    summary["minutes"] = round((time.monotonic() - start) / 60, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['minutes']} min; summary: {out / 'summary.json'}")
    return 0


def _num(value, spec: str = "5.1f") -> str:
    """`value` formatted by `spec`, or a dash of the same width when it is None (e.g. no loss logged yet: a run
    shorter than `logging_steps`)."""
    return format(value, spec) if value is not None else "-".rjust(len(format(0.0, spec)))


def evaluate_modes(final: Path, records: list, image_root: Path, out: Path) -> dict[str, dict]:
    """Scores of the trained model in native, fixed (56x56 and 112x112 px) and crop mode and with blank images
    (the control)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    common = dict(image_root=image_root, model_path=str(final), **EVALUATION)
    return {
        name: evaluate(model, processor, records, out / "runs" / name, **kw, **common) for name, kw in SETTINGS.items()
    }


def run_row(scores: dict, rc: dict) -> dict:
    """The summary of one evaluation run: its `evaluate` scores and the `rc_summary` of its RC items."""
    kinds = scores.get("kind_accuracy") or {}
    row = {m: scores[m] for m in ("accuracy", "acv", "rcv", "mean_visual_tokens")}
    row |= {"rc": kinds.get("rc"), "sc": kinds.get("sc")}
    return row | {f"rc_{m}": rc[m] for m in ("acv", "rcv", "area_accuracy", "aspect_accuracy")}


def rc_summary(run_dir: Path) -> dict:
    """The RC-Bench summary (`summarize`) of a run's RC items alone."""
    rows = [row for row in read_predictions(run_dir / "predictions.jsonl").values() if row.get("kind") == "rc"]
    return summarize(rows).to_dict()


def pooled_extremes(scores: dict) -> dict[str, float | None]:
    """RC accuracy of one run (`rc_summary`) pooled over the large-area and over the extreme-aspect bins
    (EXTREMES); None where those bins hold no item."""
    pooled = {}
    for label, (axis, bins) in EXTREMES.items():
        acc, count = scores[f"{axis}_accuracy"], scores[f"{axis}_count"]
        n = sum(count[b] for b in bins)
        pooled[label] = sum(acc[b] * count[b] for b in bins if count[b]) / n if n else None
    return pooled


def extremes_gap(native: dict, fixed: dict) -> dict[str, dict]:
    """RC accuracy of native and fixed, and native minus fixed, pooled over the large-area and the extreme-aspect
    bins (EXTREMES)."""
    gaps = {}
    by_run = {"native": pooled_extremes(native), "fixed": pooled_extremes(fixed)}
    for label, (axis, bins) in EXTREMES.items():
        pooled = {name: by_run[name][label] for name in by_run}
        diff = None if None in pooled.values() else pooled["native"] - pooled["fixed"]
        gaps[label] = pooled | {"native_minus_fixed": diff, "items": sum(native[f"{axis}_count"][b] for b in bins)}
    return gaps


def summary_text(runs: dict[str, dict], rc: dict[str, dict], out: Path) -> str:
    """The summary rows, RC accuracy per bin with native minus fixed, the pooled extremes, the blank-image margin
    and the heatmap paths; writes the RC native-minus-fixed heatmap."""
    lines = ["", "summary (accuracy in %; ACV / RCV = 100 x std / mean of RC accuracy over area / aspect bins):"]
    for name, scores in runs.items():
        kinds = scores.get("kind_accuracy") or {}
        lines.append(
            f"  {name:7} Acc {scores['accuracy']:5.1f}  RC {_num(kinds.get('rc'))}  SC {_num(kinds.get('sc'))}  "
            f"RC ACV {_num(rc[name]['acv'])}  RC RCV {_num(rc[name]['rcv'])}  "
            f"visual tokens/item {scores['mean_visual_tokens']:5.1f}"
        )
    lines.append("\nRC accuracy per bin (native / fixed / crop, and native minus fixed):")
    for axis, bins, labels in (("area", AREA_BINS, AREA_LABELS), ("aspect", ASPECT_BINS, ASPECT_LABELS)):
        for b, label in zip(bins, labels, strict=True):
            accs = [rc[name][f"{axis}_accuracy"][b] for name in ("native", "fixed", "crop")]
            diff = None if None in accs[:2] else accs[0] - accs[1]
            row = " / ".join(_num(a) for a in accs)
            lines.append(
                f"  {axis:6} {b:2} {label:8} {row}   {_num(diff, '+6.1f')}  ({rc['native'][f'{axis}_count'][b]} items)"
            )
    for label, gap in extremes_gap(rc["native"], rc["fixed"]).items():
        lines.append(
            f"  {label}: native {_num(gap['native'])} vs fixed {_num(gap['fixed'])}, "
            f"{_num(gap['native_minus_fixed'], '+.1f')} points ({gap['items']} RC items)"
        )
    sc = {name: (runs[name].get("kind_accuracy") or {}).get("sc") for name in ("native", "fixed", "fixed16")}
    if None not in sc.values():
        lines.append(
            f"  SC items: native {sc['native']:.1f} vs fixed {sc['fixed']:.1f} ({sc['native'] - sc['fixed']:+.1f}) "
            f"and fixed16 {sc['fixed16']:.1f} ({sc['native'] - sc['fixed16']:+.1f})"
        )
    margin = runs["native"]["accuracy"] - runs["blank"]["accuracy"]
    lines.append(
        f"uses the image: native {runs['native']['accuracy']:.1f} vs blank images {runs['blank']['accuracy']:.1f} "
        f"({margin:+.1f} points)"
    )
    png = out / "runs" / "rc_native_minus_fixed.png"
    diff = grid_difference(rc["native"]["cell_accuracy"], rc["fixed"]["cell_accuracy"])
    render_heatmap(diff, png, "RC items: native minus fixed (accuracy points)", diverging=True)
    lines.append(f"heatmap (RC, native minus fixed): {png}")
    lines += [f"heatmap ({name}): {out / 'runs' / name / 'heatmap.png'}" for name in runs]
    return "\n".join(lines)
