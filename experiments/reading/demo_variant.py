"""`nativevl demo` with one thing changed: the tiny LLM's config, and / or options added to its training run.

The ablations of experiments/reading/README.md ("What the LLM reads: the merger trains with it") are demo runs that
differ from the default in the LLM's architecture or in the recipe's trainable parts and learning rates. This runs
the demo's own code (data, training through `nativevl train`, export, evaluation) with:

- `--text JSON`: fields of the tiny text config (`testing.tiny_config`), e.g. `{"num_hidden_layers": 4}`, and
  `position_scheme` (`"mrope"` or `"1d"`);
- `--train-args "..."`: `nativevl train` options appended after the recipe's (later options win), e.g.
  `"--train_merger true --merger_lr 3e-4"`.

Every other argument goes to `nativevl demo`:

    python experiments/reading/demo_variant.py --text '{"position_scheme": "1d"}' -- --out demo1d --seed 0
    python experiments/reading/demo_variant.py --train-args "--train_vision_tower true --vision_tower_lr 1e-4" \\
        -- --out demoMV --seed 0
"""

import argparse
import json
import shlex
import sys

import nativevl.demo as demo


def patch(text: dict, train_args: list[str]) -> None:
    """Makes `nativevl.demo` build its model with the `text` overrides and train with `train_args` appended."""
    text = dict(text)
    position_scheme = text.pop("position_scheme", "mrope")
    build_tiny, train_for = demo.build_tiny, demo.train_for

    def build_variant(*args, **kwargs):
        return build_tiny(*args, **kwargs, position_scheme=position_scheme, **text)

    def train_variant(argv: list[str], seconds: float):
        return train_for([*argv, *train_args], seconds)

    demo.build_tiny, demo.train_for = build_variant, train_variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=json.loads, default={}, help="tiny text config fields (JSON object)")
    parser.add_argument("--train-args", default="", help="`nativevl train` options appended to the recipe's")
    parser.add_argument("demo_args", nargs=argparse.REMAINDER, help="`nativevl demo` arguments (after --)")
    args = parser.parse_args(argv)
    if not isinstance(args.text, dict):
        parser.error(f"--text must be a JSON object, got {args.text!r}")
    patch(args.text, shlex.split(args.train_args))
    demo_args = args.demo_args[1:] if args.demo_args[:1] == ["--"] else args.demo_args
    return demo.main(demo_args)


if __name__ == "__main__":
    sys.exit(main())
