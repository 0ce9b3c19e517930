"""`nativevl demo`: a native-resolution VLM trained and evaluated end to end on a CPU, with no download.

1. Generates a synthetic resolution-centric training set and a held-out test set over the 35 area x aspect cells
   (`nativevl.evaluation.synth_rc`, images at 1/8 linear scale so a laptop CPU keeps up): RC items ask for small
   text, SC items for the background colour or the large shape.
2. Trains a small nativevl model from scratch through the `nativevl train` path (TRL SFTTrainer, padding-free
   multimodal packing), stopping when its share of the time budget is spent, and exports a remote-code folder.
3. Answers a question about a freshly generated image through `pipeline("image-text-to-text")`.
4. Evaluates the model in native and fixed mode, and with blank images (does it use the image at all?), and prints
   the per-bin table, Acc / ACV / RCV and the heatmap paths. Every figure printed is measured in this run.

    nativevl demo                       # about 10 minutes on 2 cores, writes ./nativevl-demo
    nativevl demo --minutes 3 --out /tmp/demo

A rerun into the same --out starts over (new data, a new model, evaluation runs redone); one with other options
is refused (`--overwrite` allows it), and so is a second demo writing into the folder at the same time.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from nativevl.conversion.export import save_folder
from nativevl.evaluation.run import evaluate, load_records, print_report
from nativevl.evaluation.synth_rc import generate_benchmark, make_item
from nativevl.runs import LOCK_FILE, RunFolderError, RunLock, check_fingerprint
from nativevl.testing import build_tiny
from nativevl.training.train import build_trainer, export_final, parse


RECIPE = Path(__file__).parent / "training" / "recipes" / "tiny_stage3.yaml"
SCALE = 1 / 8  # linear scale of the synthetic images: nominal cell sizes / 8 (areas / 64)
FIXED_PIXELS = 56 * 56  # the Fixed baseline at this scale: 4 LLM tokens per image, aspect kept
RUN_FILE = "demo_run.json"  # the options of the demo that wrote an --out folder (`nativevl.runs.check_fingerprint`)


class TimeBudget(TrainerCallback):
    """Stops training once `seconds` have passed since the first step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = None

    def on_step_end(self, args, state, control, **kwargs):
        self.start = self.start or time.monotonic()
        if time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True
        return control


def write_training_set(folder: Path, per_cell: int, seed: int, scale: float = SCALE, **benchmark) -> Path:
    """The synthetic benchmark generator's items as TRL conversational examples (`train.jsonl`); `benchmark`:
    further keyword arguments of `generate_benchmark` (e.g. `rc_contents`, `text_size`)."""
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


def train(out: Path, train_jsonl: Path, seconds: float, seed: int) -> tuple[Path, dict]:
    """Trains from a fresh tiny model for `seconds` through the `nativevl train` path; returns the final folder."""
    save_folder(*build_tiny(seed=seed, max_pixels=448 * 448), out / "init", overwrite=True)
    argv = [str(RECIPE), "--model_name_or_path", str(out / "init"), "--dataset_path", str(train_jsonl)]
    argv += ["--output_dir", str(out / "train"), "--max_steps", "100000", "--save_strategy", "no", "--seed", str(seed)]
    # from scratch, every part at one learning rate; the step count is unknown in advance, so a constant schedule
    argv += ["--learning_rate", "1e-3", "--vision_tower_lr", "1e-3", "--merger_lr", "1e-3", "--warmup_steps", "30"]
    argv += [
        "--lr_scheduler_type",
        "constant_with_warmup",
        "--logging_steps",
        "50",
        "--per_device_train_batch_size",
        "16",
    ]
    argv += ["--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    trainer, final, stats = train_for(argv, seconds)
    stats["fill_rate"] = trainer.data_collator.fill_rate
    return final, stats


def train_for(argv: list[str], seconds: float):
    """One `nativevl train` run (recipe + overrides in `argv`) stopped after `seconds` of training; exports the
    final folder. Returns the trainer, the folder and stats (steps, seconds, first / last / mean of last 10 loss)."""
    training_args, args = parse(argv)
    trainer = build_trainer(training_args, args)
    trainer.add_callback(TimeBudget(seconds))
    result = trainer.train()
    final = Path(export_final(trainer, args, training_args.output_dir))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    stats = {
        "steps": trainer.state.global_step,
        "seconds": round(result.metrics["train_runtime"], 1),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "mean_last_10_losses": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }
    return trainer, final, stats


def ask_pipeline(final: Path, seed: int) -> dict:
    """One fresh SC image through `pipeline("image-text-to-text")` (remote code, as a user would load it)."""
    from transformers import pipeline

    image, record = make_item("sc", 96, 64, random.Random(f"demo-pipeline/{seed}"))
    pipe = pipeline("image-text-to-text", model=str(final), trust_remote_code=True)
    message = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": record["question"]}]}
    ]
    answer = pipe(text=message, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    return {"question": record["question"], "expected": record["answers"][0], "answer": answer.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nativevl demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="nativevl-demo", help="output folder (data, model, runs)")
    parser.add_argument("--minutes", type=float, default=10.0, help="total time budget; training gets what is left")
    parser.add_argument("--train-per-cell", type=int, default=40, help="training items per cell and kind")
    parser.add_argument("--test-per-cell", type=int, default=4, help="held-out items per cell and kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="reuse an --out folder of a demo with other options")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    if args.train_per_cell < 1 or args.test_per_cell < 1:
        parser.error(
            f"--train-per-cell and --test-per-cell must be >= 1, got {args.train_per_cell}, {args.test_per_cell}"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} exists and is not a folder")
    foreign = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not (out / RUN_FILE).is_file()
    if foreign and not args.overwrite:
        raise RunFolderError(f"--out {out} is not empty and not a demo folder (no {RUN_FILE}); --overwrite uses it")
    with RunLock(out):
        options = {k: getattr(args, k) for k in ("minutes", "train_per_cell", "test_per_cell", "seed")}
        check_fingerprint(out / RUN_FILE, options, args.overwrite)
        return run_demo(out, args)


def run_demo(out: Path, args: argparse.Namespace) -> int:
    """The four steps of the module docstring into `out` (locked and fingerprinted by `main`)."""
    start = time.monotonic()
    torch.manual_seed(args.seed)

    print(f"[1/4] generating data in {out / 'data'} ...", flush=True)
    train_jsonl = write_training_set(out / "data" / "train", args.train_per_cell, args.seed)
    test_jsonl = generate_benchmark(
        out / "data" / "test", per_cell=args.test_per_cell, seed=args.seed + 1, scale=SCALE
    )
    n_train, records = sum(1 for _ in open(train_jsonl)), load_records(test_jsonl)
    print(f"      {n_train} training items, {len(records)} held-out items (35 cells x 2 kinds)", flush=True)

    budget = args.minutes * 60
    eval_reserve = max(45.0, 0.2 * budget)  # three evaluation runs and the pipeline call
    seconds = max(10.0, budget - (time.monotonic() - start) - eval_reserve)
    print(f"[2/4] training a {RECIPE.stem} model from scratch for {seconds:.0f} s ...", flush=True)
    final, stats = train(out, train_jsonl, seconds, args.seed)
    print(
        f"      {stats['steps']} steps in {stats['seconds']} s, loss {_num(stats['first_loss'], '.3f')} -> "
        f"{_num(stats['last_loss'], '.3f')}, packing fill rate {stats['fill_rate']:.1%}; model: {final}",
        flush=True,
    )

    print("[3/4] pipeline('image-text-to-text') on a fresh image:", flush=True)
    asked = ask_pipeline(final, args.seed)
    print(f"      Q: {asked['question']}  expected: {asked['expected']!r}  answer: {asked['answer']!r}", flush=True)

    print("[4/4] evaluating on the held-out set ...", flush=True)
    runs = evaluate_three_ways(final, records, test_jsonl.parent, out)
    print_summary(runs, out)
    summary = {
        "training": stats,
        "pipeline": asked,
        "runs": {k: {m: v[m] for m in ("accuracy", "acv", "rcv")} for k, v in runs.items()},
    }
    summary["minutes"] = round((time.monotonic() - start) / 60, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done in {summary['minutes']} min; summary: {out / 'summary.json'}")
    return 0


def _num(value, spec: str = "5.1f") -> str:
    """`value` formatted by `spec`, or a dash of the same width when it is None (e.g. no loss logged yet: a run
    shorter than `logging_steps`)."""
    return format(value, spec) if value is not None else "-".rjust(len(format(0.0, spec)))


def evaluate_three_ways(final: Path, records: list, image_root: Path, out: Path) -> dict[str, dict]:
    """Scores of the trained model in native mode, in fixed mode and with blank images (the control)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    # every demo trains a new model, so its evaluation runs start over (overwrite) instead of being refused
    common = dict(
        batch_size=16, max_new_tokens=16, progress=False, image_root=image_root, model_path=str(final), overwrite=True
    )
    fixed = {"fixed_pixels": FIXED_PIXELS}
    return {
        "native": evaluate(model, processor, records, out / "runs" / "native", mode="native", **common),
        "fixed": evaluate(
            model, processor, records, out / "runs" / "fixed", mode="fixed", images_kwargs=fixed, **common
        ),
        "blank": evaluate(
            model, processor, records, out / "runs" / "blank", mode="native", blank_images=True, **common
        ),
    }


def print_summary(runs: dict[str, dict], out: Path) -> None:
    """The native run's report, one summary row per run, the blank-image margin and the heatmap paths."""
    print("\nnative resolution:\n" + print_report(runs["native"]))
    rows = []
    for name, scores in runs.items():
        kinds = scores.get("kind_accuracy") or {}
        rows.append(
            f"  {name:7} Acc {scores['accuracy']:5.1f}  ACV {_num(scores['acv'])}  RCV {_num(scores['rcv'])}  "
            f"RC {_num(kinds.get('rc'))}  SC {_num(kinds.get('sc'))}  visual tokens/item {scores['mean_visual_tokens']:.1f}"
        )
    print("summary (accuracy in %, ACV/RCV = 100 x std / mean over area / aspect bins):\n" + "\n".join(rows))
    margin = runs["native"]["accuracy"] - runs["blank"]["accuracy"]
    print(
        f"uses the image: native {runs['native']['accuracy']:.1f} vs blank images {runs['blank']['accuracy']:.1f} ({margin:+.1f} points)"
    )
    for name in runs:
        print(f"heatmap ({name}): {out / 'runs' / name / 'heatmap.png'}")
