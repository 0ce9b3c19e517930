"""`nativevl eval` and `nativevl synth-rc`: resolution-centric evaluation from the command line.

The protocol is NativeRes-LLaVA's RC-Bench (arXiv 2506.12776), re-implemented in `nativevl.evaluation`; see
`nativevl.evaluation.data` for the data format and `nativevl.evaluation.run` for the files of a run folder.

Tiny CPU run (random weights, so accuracy is about 0; well under a minute)::

    nativevl synth-rc rc_demo --per-cell 1 --seed 0 --scale 0.125
    nativevl export --tiny tiny_model
    nativevl eval profile rc_demo/data.jsonl
    nativevl eval run --model tiny_model --data rc_demo/data.jsonl --out runs/native --limit 16 --max-new-tokens 4
    nativevl eval run --model tiny_model --data rc_demo/data.jsonl --out runs/fixed --mode fixed \\
        --fixed-pixels 50176 --limit 16 --max-new-tokens 4
    nativevl eval compare runs/native runs/fixed

The paper's three settings on a real model (Native-1792 = 1792 merged tokens = 1792 * 28 * 28 pixels, Fixed-378,
Crop with 336-px tiles) and the blank-image control::

    nativevl synth-rc rc_bench --per-cell 50 --seed 0
    nativevl eval run --model MODEL --data rc_bench/data.jsonl --out runs/native --max-pixels 1404928
    nativevl eval run --model MODEL --data rc_bench/data.jsonl --out runs/fixed --mode fixed --fixed-pixels 142884
    nativevl eval run --model MODEL --data rc_bench/data.jsonl --out runs/crop --mode crop
    nativevl eval run --model MODEL --data rc_bench/data.jsonl --out runs/blank --blank-images
    nativevl eval compare runs/native runs/crop

A killed `eval run` resumes where it stopped when rerun with the same arguments and inputs. A rerun with another
`--limit` reuses the run: a larger limit generates only the records not yet answered, a smaller one scores the
first N from the answers already there. A rerun into the same `--out` with another data file, model (weights), dtype,
mode or image setting is refused naming what differs (`--overwrite` starts over), and so is a second run into a
folder another process is writing. Image paths in the
data file must lie under its folder (`--allow-outside-paths` lifts this). Bad input (missing file, a record
without image/question/answers, an unreadable image, an unknown mode) exits with status 2 and a message naming the
value.
"""

import argparse
import sys
from pathlib import Path

from nativevl.evaluation.data import EvalInputError, load_records
from nativevl.evaluation.report import compare, print_report, profile
from nativevl.evaluation.run import MODES, evaluate
from nativevl.runs import RunFolderError, file_digest


PROG = "nativevl eval"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate answers for a JSONL benchmark and score them")
    run.add_argument("--model", required=True, help="model folder (save_pretrained / nativevl export output)")
    run.add_argument("--data", required=True, help="benchmark JSONL (e.g. `nativevl synth-rc` output data.jsonl)")
    run.add_argument("--out", required=True, help="run folder; rerunning into it resumes")
    run.add_argument("--mode", choices=MODES, default="native", help="image mode of the processor")
    run.add_argument("--max-pixels", type=_positive_int, help="native mode: pixel cap per image (tokens x 784)")
    run.add_argument("--fixed-pixels", type=_positive_int, help="fixed mode: pixel budget of every image")
    run.add_argument("--crop-base-size", type=_positive_int, help="crop mode: tile side in pixels (336)")
    run.add_argument("--batch-size", type=_positive_int, default=8)
    run.add_argument("--max-new-tokens", type=_positive_int, default=32)
    run.add_argument("--blank-images", action="store_true", help="control: uniform grey images of the same sizes")
    run.add_argument(
        "--limit",
        type=_positive_int,
        help="only the first N records of the data file; a rerun into --out with a larger N extends the run, with a "
        "smaller one scores its first N",
    )
    run.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--overwrite", action="store_true", help="start over when --out holds a run with other inputs")
    run.add_argument("--allow-outside-paths", action="store_true", help="let image paths leave the data file's folder")

    cmp = sub.add_parser("compare", help="table and A-minus-B heatmap of two run folders")
    cmp.add_argument("run_a")
    cmp.add_argument("run_b")
    cmp.add_argument("--out", help="folder for the heatmap PNG (default: RUN_A's parent)")

    prof = sub.add_parser("profile", help="area x aspect histogram of a JSONL dataset")
    prof.add_argument("data")
    prof.add_argument("--out", help="heatmap PNG path (default: <data stem>_profile.png next to the data)")
    prof.add_argument(
        "--allow-outside-paths", action="store_true", help="let image paths leave the data file's folder"
    )
    return parser


def load_model(model_dir: str | Path, device: str | None = None, dtype: str = "float32"):
    """(model, processor) of a nativevl folder, in eval mode, offline. Raises EvalInputError for a missing folder."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import nativevl  # noqa: F401 - registers the nativevl classes with the Auto classes

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise EvalInputError(f"model folder not found or without config.json: {model_dir}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), local_files_only=True
        )
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # truncated weights, config disagreeing with them, broken processor files
        message = " ".join(str(err).split())
        raise EvalInputError(f"cannot load the model in {model_dir}: {type(err).__name__}: {message:.400}") from None
    return model.to(device).eval(), processor


def _run(args: argparse.Namespace) -> int:
    records = load_records(args.data, limit=args.limit, allow_outside_paths=args.allow_outside_paths)
    model, processor = load_model(args.model, args.device, args.dtype)
    image_processor = processor.image_processor
    images_kwargs = {}
    if args.fixed_pixels is not None:
        images_kwargs["fixed_pixels"] = args.fixed_pixels
    if args.crop_base_size is not None:  # the canvases keep their shape in tiles: [2b, b] stays [2b', b']
        old = image_processor.crop_base_size
        pinpoints = [
            [h // old * args.crop_base_size, w // old * args.crop_base_size]
            for h, w in image_processor.crop_grid_pinpoints
        ]
        images_kwargs |= {"crop_base_size": args.crop_base_size, "crop_grid_pinpoints": pinpoints}
    scores = evaluate(
        model,
        processor,
        records,
        args.out,
        mode=args.mode,
        max_pixels=args.max_pixels,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        blank_images=args.blank_images,
        progress=not args.no_progress,
        images_kwargs=images_kwargs,
        model_path=str(Path(args.model).resolve()),
        overwrite=args.overwrite,
        allow_outside_paths=args.allow_outside_paths,
        data_digest=file_digest(args.data),
    )
    print(print_report(scores))
    print(f"\n{scores['new_items']} new, {scores['resumed_items']} resumed; wrote {Path(args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`nativevl eval run|compare|profile ...`; returns the exit status (2 on bad input)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse error (status 2, message printed) or --help (0)
        return int(exit_.code or 0)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "compare":
            print(compare(args.run_a, args.run_b, args.out))
        else:
            print(profile(args.data, args.out, args.allow_outside_paths))
        return 0
    except (EvalInputError, RunFolderError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


def synth_main(argv: list[str] | None = None) -> int:
    """`nativevl synth-rc OUT_DIR --per-cell N --seed S [--scale F] [--kinds rc,sc] [--rc-contents digit]`: writes a synthetic benchmark
    balanced over the 35 RC-Bench cells (`nativevl.evaluation.synth_rc.generate_benchmark`)."""
    from nativevl.evaluation.synth_rc import DEFAULT_RC_CONTENTS, KINDS, RC_CONTENTS, generate_benchmark

    parser = argparse.ArgumentParser(
        prog="nativevl synth-rc",
        description=(synth_main.__doc__ or "") + "\n\nExample (a second on CPU):\n"
        "    nativevl synth-rc rc_demo --per-cell 1 --seed 0 --scale 0.125",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir")
    parser.add_argument("--per-cell", type=_positive_int, default=50, help="items per cell and kind (50 as RC-Bench)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="linear scale of every image (0.125 for a demo)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of rc,sc")
    parser.add_argument("--max-area", type=float, help="cap of area bin G in 384x384 units (default 32)")
    parser.add_argument("--text-size", type=float, help="font size of rc text in px (default: 20 x scale, >= 10)")
    parser.add_argument(
        "--rc-contents",
        default=",".join(DEFAULT_RC_CONTENTS),
        help=f"comma-separated rc content types, a subset of {','.join(RC_CONTENTS)}",
    )
    parser.add_argument("--rc-placement", default="random", help="rc text anywhere (random) or top-left (corner)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        path = generate_benchmark(
            args.out_dir, args.per_cell, args.seed, kinds, args.max_area, args.scale, args.text_size,
            [c.strip() for c in args.rc_contents.split(",") if c.strip()], args.rc_placement,
        )  # fmt: skip
    except ValueError as err:
        print(f"nativevl synth-rc: error: {err}", file=sys.stderr)
        return 2
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    print(f"wrote {n} items to {path}")
    print(f"next: nativevl eval profile {path}   or   nativevl eval run --model MODEL --data {path} --out RUN_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
