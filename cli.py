"""The `nativevl` command line: `nativevl demo | convert | train | eval | synth-rc | export`."""

import argparse
import importlib
import sys


# subcommand -> (module under nativevl with a `main(argv)` taking the remaining arguments, help)
COMMANDS = {
    "demo": ("demo", "generate data, train and evaluate a small native-resolution model end to end"),
    "convert": ("conversion.cli", "convert a Qwen2-VL / NativeRes-LLaVA checkpoint folder into a nativevl folder"),
    "train": ("training.train", "fine-tune with TRL's SFTTrainer and padding-free multimodal packing"),
    "eval": ("evaluation.cli", "resolution-centric evaluation: run, compare, profile"),
    "synth-rc": ("evaluation.cli:synth_main", "generate the synthetic resolution-centric benchmark"),
    "export": ("conversion.export", "write a Hub-style remote-code folder (--tiny for a random tiny model)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nativevl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv[:1])
    module_name, _, function = COMMANDS[args.command][0].partition(":")
    module = importlib.import_module(f"nativevl.{module_name}")
    return getattr(module, function or "main")(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
