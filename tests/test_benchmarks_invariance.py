"""benchmarks/invariance.py at tiny scale: the shifted items move only the text, and the script scores a model per
shift and per scale."""

import json
import runpy
from pathlib import Path

import numpy as np

from nativevl.conversion.export import save_folder
from nativevl.demo import READING
from nativevl.testing import build_tiny


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "invariance.py"


def test_a_shift_moves_the_text_by_that_many_pixels_and_nothing_else():
    bench = runpy.run_path(str(SCRIPT))
    keys = bench["item_keys"](6, 0, READING["text_size"], READING["rc_contents"])
    assert len(keys) == 6 and all(w % 28 == 0 and h % 28 == 0 for _, w, h in keys)
    for key, w, h in keys:
        base, record = bench["shifted_item"](key, w, h, 0, READING["text_size"], READING["rc_contents"])
        moved, record_moved = bench["shifted_item"](key, w, h, 5, READING["text_size"], READING["rc_contents"])
        box, box_moved = record.pop("text_box"), record_moved.pop("text_box")
        assert record == record_moved and base.size == moved.size
        assert [b - a for a, b in zip(box, box_moved, strict=True)] == [5, 5, 5, 5]
        a, b = (np.asarray(im.convert("L"), dtype=int) for im in (base, moved))
        ink_a, ink_b = np.argwhere(a < 100), np.argwhere(b < 100)  # the text's dark ink (backgrounds >= 175)
        assert len(ink_a) == len(ink_b) > 0
        np.testing.assert_array_equal(ink_b.min(0) - ink_a.min(0), [5, 5])  # (row, col) moved by 5 px each
        assert ((a != b).sum(0) > 0).sum() < w  # elsewhere the background is the same
        for axes, moved_by in (("x", [0, 5]), ("y", [5, 0])):  # one direction only
            one, _ = bench["shifted_item"](key, w, h, 5, READING["text_size"], READING["rc_contents"], axes)
            ink = np.argwhere(np.asarray(one.convert("L"), dtype=int) < 100)
            np.testing.assert_array_equal(ink.min(0) - ink_a.min(0), moved_by)


def test_invariance_script_scores_a_model_per_shift_and_scale(tmp_path, capsys):
    folder = tmp_path / "model"
    save_folder(*build_tiny(seed=0), folder)
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "inv"
    args = ["--model", str(folder), "--out", str(out), "--items", "3", "--shifts", "0", "27", "--scales", "1", "1.25"]
    assert main(args) == 0
    result = json.loads((out / "invariance.json").read_text())
    assert result["items"] == 3 and set(result["shift"]) == {"0", "27"} and set(result["scale"]) == {"1.0", "1.25"}
    for axis in ("shift", "scale"):
        accs = list(result[axis].values())
        assert all(0 <= a <= 100 for a in accs) and result[f"{axis}_spread"] == max(accs) - min(accs)
    assert "max - min over shifts" in capsys.readouterr().out
    assert main([*args[:6], "--shifts", "0", "9", "--shift-axes", "y", "--scales"]) == 0  # shifts only, down
    result = json.loads((out / "invariance.json").read_text())
    assert result["shift_axes"] == "y" and set(result["shift"]) == {"0", "9"} and result["scale"] == {}
    assert result["scale_spread"] is None
