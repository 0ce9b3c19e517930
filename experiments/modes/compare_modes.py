"""NativeRes-LLaVA's Native / Fixed / Crop comparison with one model trained per mode, as the paper does.

`nativevl demo` trains one model, in native mode, and scores it in every mode, so its fixed and crop rows also
measure layouts the model never saw. This trains a model in each other mode from the demo's own random init and
training set (same recipe, steps and seed; fixed: `demo.FIXED_PIXELS`, crop: `demo.CROP`, set in a copy of the
init folder's processor), scores each in the mode it was trained in on the demo's held-out items, and prints one
row per mode next to the demo's native model: accuracy, RC, SC, RC pooled over the large-area and the
extreme-aspect bins, RC ACV / RCV and visual tokens per item.

    nativevl demo --seed 0 --out /tmp/demo0
    python experiments/modes/compare_modes.py --demo /tmp/demo0                 # 2 x the demo's training time
    python experiments/modes/compare_modes.py --demo /tmp/demo0 --modes crop --steps 300 --out /tmp/modes-smoke

Writes `<out>/<mode>/train/final` (the model, with its run fingerprint) and `<out>/<mode>/run` (predictions, scores),
and `<out>/summary.json`.
"""

import argparse
import json
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor

from nativevl.conversion.export import save_folder
from nativevl.demo import (
    EVALUATION,
    EXTREMES,
    RUN_FILE,
    SETTINGS,
    _num,
    pooled_extremes,
    rc_summary,
    recipe_for,
    run_row,
    train_for,
)
from nativevl.evaluation.data import load_records
from nativevl.evaluation.run import evaluate


def mode_init(demo: Path, mode: str, out: Path) -> Path:
    """A copy of the demo's random init whose image processor is set to `mode` (and the demo's settings of that
    mode, `demo.SETTINGS`)."""
    model = AutoModelForImageTextToText.from_pretrained(demo / "init")
    processor = AutoProcessor.from_pretrained(demo / "init")
    processor.image_processor.mode = mode
    for key, value in SETTINGS[mode].get("images_kwargs", {}).items():
        setattr(processor.image_processor, key, value)
    processor.image_processor.validate()
    save_folder(model, processor, out, overwrite=True)
    return out


def score(final: Path, mode: str, records: list, image_root: Path, out: Path) -> dict:
    """The model's scores in `mode` on `records`, with its RC-only summary and the pooled extreme bins."""
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    scores = evaluate(
        model, processor, records, out, **SETTINGS[mode], image_root=image_root, model_path=str(final), **EVALUATION
    )
    rc = rc_summary(out)
    return run_row(scores, rc) | {"rc_pooled": pooled_extremes(rc)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a finished `nativevl demo` folder (data, init, train/final)")
    parser.add_argument("--modes", nargs="+", choices=["fixed", "crop"], default=["fixed", "crop"])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's)")
    parser.add_argument("--out", default=None, help="output folder (default: <demo>/modes)")
    args = parser.parse_args(argv)
    demo = Path(args.demo)
    options = json.loads((demo / RUN_FILE).read_text())  # the demo's steps, seed and tower (its recipe)
    steps, seed = args.steps or options["steps"], options["seed"]
    out = Path(args.out) if args.out else demo / "modes"
    test = demo / "data" / "test" / "data.jsonl"
    records = load_records(test)
    rows = {
        "native (the demo's model)": score(demo / "train" / "final", "native", records, test.parent, out / "native")
    }
    training = {}
    for mode in args.modes:
        print(f"training a {mode}-mode model for {steps} steps (seed {seed}) ...", flush=True)
        init = mode_init(demo, mode, out / mode / "init")
        argv = [str(recipe_for(options.get("vision_init"))), "--model_name_or_path", str(init), "--image_mode", mode]
        argv += [
            "--dataset_path",
            str(demo / "data" / "train" / "train.jsonl"),
            "--output_dir",
            str(out / mode / "train"),
        ]
        argv += ["--max_steps", str(steps), "--seed", str(seed), "--overwrite", "true"]
        _, final, stats = train_for(argv, seconds=float("inf"))
        training[mode] = stats
        print(f"  {stats}", flush=True)
        rows[f"{mode} (trained in {mode} mode)"] = score(final, mode, records, test.parent, out / mode / "run")
    labels = list(EXTREMES)
    print(f"\n{'model, scored in its mode':30} {'Acc':>5} {'RC':>5} {'SC':>5} {'E-G':>5} {'BH/BW':>5} "
          f"{'ACV':>5} {'RCV':>5} {'tokens':>6}")  # fmt: skip
    for name, row in rows.items():
        values = [row[k] for k in ("accuracy", "rc", "sc")] + [row["rc_pooled"][label] for label in labels]
        values += [row["rc_acv"], row["rc_rcv"]]
        print(f"{name:30} " + " ".join(_num(v) for v in values) + f" {row['mean_visual_tokens']:6.1f}")
    summary = {"demo": str(demo), "steps": steps, "seed": seed, "training": training, "scores": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
