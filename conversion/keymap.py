"""Key tables: regex rewrites from a source checkpoint's parameter names to nativevl's, applied strictly.

Each table is a list of (source pattern, target template) pairs tried in order; the first full match wins. A
target of None means "known and deliberately dropped". A source key that no pattern matches, or a target key that
no source key produced, is an error that lists the keys (a strict load, never a warning).
"""

import re
from collections.abc import Iterable


KeyTable = list[tuple[str, str | None]]

# Rotary inverse-frequency buffers that old checkpoints saved: nativevl recomputes them from the config.
ROTARY_BUFFER_RULES: KeyTable = [(r".*\.(?:rotary_emb|rotary_pos_emb)\.inv_freq", None)]


def map_keys(source_keys: Iterable[str], table: KeyTable) -> dict[str, str]:
    """Returns {source key: target key} for every kept key; raises KeyError listing keys no pattern matches."""
    compiled = [(re.compile(pattern), target) for pattern, target in table]
    mapping, unmatched = {}, []
    for key in source_keys:
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match:
                if target is not None:
                    mapping[key] = match.expand(target)
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise KeyError(f"{len(unmatched)} source key(s) match no rule of the key table: {sorted(unmatched)[:20]}")
    targets = list(mapping.values())
    if len(set(targets)) != len(targets):
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        raise KeyError(f"several source keys map to the same target key(s): {dupes[:20]}")
    return mapping


def check_coverage(produced: Iterable[str], expected: Iterable[str]) -> None:
    """Raises KeyError when target keys are missing or unexpected, naming them."""
    produced, expected = set(produced), set(expected)
    missing, unexpected = sorted(expected - produced), sorted(produced - expected)
    if missing or unexpected:
        raise KeyError(
            f"converted weights do not match the nativevl model: missing {missing[:20]} "
            f"({len(missing)} in all), unexpected {unexpected[:20]} ({len(unexpected)} in all)"
        )
