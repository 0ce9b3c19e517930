"""The `nativevl` command line: `nativevl [--debug] demo | convert | train | eval | synth-rc | export`.

Any error a subcommand does not report itself ends as one line on stderr (`nativevl CMD: error: Type: message`)
and exit status 2, without a traceback; `nativevl --debug CMD ...` shows the traceback instead.
"""

import argparse
import importlib
import sys


# subcommand -> (module under nativevl with a `main(argv)` taking the remaining arguments, help)
COMMANDS = {
    "demo": ("demo", "generate data, train and evaluate a small native-resolution model end to end"),
    "convert": ("conversion.cli", "Qwen2-VL / NativeRes-LLaVA folders to nativevl, and back to stock Qwen2-VL"),
    "train": ("training.train", "fine-tune with TRL's SFTTrainer and padding-free multimodal packing"),
    "eval": ("evaluation.cli", "resolution-centric evaluation: run, compare, profile"),
    "synth-rc": ("evaluation.cli:synth_main", "generate the synthetic resolution-centric benchmark"),
    "export": ("conversion.export", "write a Hub-style remote-code folder (--tiny for a random tiny model)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nativevl", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    argv = argv[1:] if debug else argv
    args, _ = parser.parse_known_args(argv[:1])
    module_name, _, function = COMMANDS[args.command][0].partition(":")
    try:
        module = importlib.import_module(f"nativevl.{module_name}")
        return getattr(module, function or "main")(argv[1:])
    except Exception as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or "(no message)"  # one line
        hint = f"`nativevl --debug {args.command} ...` shows the traceback"
        print(f"nativevl {args.command}: error: {type(err).__name__}: {message} ({hint})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
