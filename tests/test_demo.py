"""`nativevl demo` end to end on a minimal budget: every output exists and parses."""

import json

from PIL import Image

from nativevl.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--minutes", "1", "--out", str(out), "--train-per-cell", "3", "--test-per-cell", "1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["steps"] > 0 and summary["pipeline"]["answer"] is not None
    for run in ("native", "fixed", "blank"):
        scores = json.loads((out / "runs" / run / "scores.json").read_text())
        assert scores["count"] == 70 and 0 <= scores["accuracy"] <= 100
        assert len((out / "runs" / run / "cells.csv").read_text().strip().splitlines()) == 36  # header + 35 cells
        assert Image.open(out / "runs" / run / "heatmap.png").size[0] > 100
        assert f"heatmap ({run}): {out / 'runs' / run / 'heatmap.png'}" in printed
    config = json.loads((out / "train" / "final" / "config.json").read_text())
    assert "AutoModelForImageTextToText" in config["auto_map"]
    assert "uses the image: native" in printed and "pipeline('image-text-to-text')" in printed
