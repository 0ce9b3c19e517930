"""The `nativevl` command line: `nativevl demo | convert | train | eval | export`."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nativevl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="build a tiny model and run it on a generated image")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from nativevl.demo import main as demo_main

        return demo_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
