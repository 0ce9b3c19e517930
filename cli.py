"""The `nativevl` command line: `nativevl demo | convert | train | eval | export`."""

import argparse
import importlib
import sys


# subcommand -> (module under nativevl with a `main(argv)`, help)
COMMANDS = {
    "demo": "generate data, run a native-resolution model end to end",
    "export": "write a Hub-style remote-code folder (--tiny for a random tiny model)",
}
MODULES = {"demo": "demo", "export": "conversion.export"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nativevl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    module = importlib.import_module(f"nativevl.{MODULES[args.command]}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
