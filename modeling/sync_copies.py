"""Regenerates the copies the remote-code rule forces between `modeling/` and `processing/`.

A model folder on the Hub holds the files of both folders flat, and a processing file cannot import a modeling one
(nor the reverse), so the processor's grid, token-count and M-RoPE functions are a copy of those in
`modeling/positions_nativevl.py`: `processing/processing_positions_nativevl.py` holds the functions the processor
imports and the ones they call, their source unchanged, under a "generated, do not edit" banner.

    python -m nativevl.modeling.sync_copies           # rewrite the copies from their source
    python -m nativevl.modeling.sync_copies --check   # exit 1, naming the stale copies, when one differs

tests/test_processing_nativevl.py fails when a copy is stale. This file is a development tool, not remote code: nothing in
`modeling/` imports it, so `save_pretrained` does not export it; it imports only the standard library.
"""

import argparse
import ast
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent  # the repository root: modeling/ and processing/ side by side

# copy (relative to ROOT) -> (source, the functions it exports; the functions they call come along)
COPIES = {
    "processing/processing_positions_nativevl.py": (
        "modeling/positions_nativevl.py",
        ("batch_mrope_positions", "grid_token_counts", "level_grid", "placeholder_kinds", "repeat_per_grid"),
    ),
}

BANNER = '''"""GENERATED from {source} by `python -m nativevl.modeling.sync_copies`: do not edit.

The functions of {source} this folder imports (`__all__`) and those they call, their source
unchanged: remote-code folders cannot import each other. Edit the source and rerun the command;
tests/test_processing_nativevl.py fails when this file is stale.
"""
'''


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def render(source_text: str, source_name: str, exports: tuple[str, ...]) -> str:
    """The text of a copy: the banner, the imports the kept functions use (in the source's order and groups), the
    functions `exports` names plus every top-level function they call (in the source's order), and `__all__`."""
    tree = ast.parse(source_text)
    lines = source_text.splitlines()
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = [name for name in exports if name not in functions]
    if missing:
        raise ValueError(f"{source_name} defines no top-level function {missing}")
    kept, todo = set(), list(exports)
    while todo:  # the exports and, transitively, the top-level functions they call
        name = todo.pop()
        if name not in kept:
            kept.add(name)
            todo.extend(sorted(_names_used(functions[name]) & functions.keys()))
    bodies = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in kept]
    used = set().union(*(_names_used(n) for n in bodies))
    imports, previous_end = [], None
    for node in tree.body:
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        aliases = [a for a in node.names if (a.asname or a.name.split(".")[0]) in used]
        if aliases:
            if imports and previous_end is not None and node.lineno > previous_end + 1:
                imports.append("")  # the source's blank line between import groups
            names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in aliases)
            imports.append(f"import {names}" if isinstance(node, ast.Import) else f"from {node.module} import {names}")
            previous_end = node.end_lineno
    parts = [BANNER.format(source=source_name) + "\n" + "\n".join(imports) + "\n"]
    parts += ["\n".join(lines[n.lineno - 1 : n.end_lineno]) + "\n" for n in bodies]
    parts.append("__all__ = [\n" + "".join(f'    "{name}",\n' for name in sorted(exports)) + "]\n")
    return "\n\n".join(parts)


def expected_copies(root: Path = ROOT) -> dict[Path, str]:
    """{path of each copy: the text it must hold}, rendered from the sources under `root`."""
    return {
        root / copy: render((root / source).read_text(), source, exports) for copy, (source, exports) in COPIES.items()
    }


def stale_copies(root: Path = ROOT) -> list[Path]:
    """The copies under `root` whose text differs from what their source renders (or that are missing)."""
    return [path for path, text in expected_copies(root).items() if not path.is_file() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a copy is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_copies()
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run `python -m nativevl.modeling.sync_copies`)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected_copies().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
