"""Calibrating the cascade's threshold on a model's own items (`evaluation/calibrate.py`): the frontier, the
threshold and the loss interval by hand, the complete output folder, and the old `nativevl.training.cascade`
command's deprecation."""

import pytest
import torch

from nativevl import NativeVLForConditionalGeneration


def test_frontier_and_threshold_by_hand():
    from nativevl.evaluation.calibrate import choose_threshold, fallback_frontier

    answers = {  # 4 items: coarse 3 tokens, full 10; item 2 is broken by pooling, item 3 wrong at both
        "coarse": torch.tensor([1.0, 1.0, 0.0, 0.0]),
        "full": torch.tensor([1.0, 1.0, 1.0, 0.0]),
        "coarse_tokens": torch.full((4,), 3.0),
        "full_tokens": torch.full((4,), 10.0),
    }
    confidence = torch.tensor([0.9, 0.8, 0.1, 0.5])
    assert fallback_frontier(confidence, answers, [0.0, 0.2, 0.6, 1.0]) == [
        (0.0, 3.0, 50.0),  # nothing falls back
        (0.2, 5.5, 75.0),  # item 2: 3 + 10 tokens, now right
        (0.6, 8.0, 75.0),  # item 3 too, for nothing
        (1.0, 13.0, 75.0),  # everything: the full grid's accuracy at both passes' tokens
    ]
    assert choose_threshold(confidence, answers, max_loss=1.0) == (0.5, 5.5, 75.0)  # the lowest that catches item 2
    assert choose_threshold(confidence, answers, max_loss=30.0) == (0.0, 3.0, 50.0)
    answers["coarse"] = torch.zeros(4)  # only falling back everywhere keeps the full grid's accuracy
    sure = torch.ones(4)  # every answer at probability 1: no threshold up to 1 sends one back
    assert choose_threshold(sure, answers, max_loss=1.0) == (float("inf"), 13.0, 75.0)


def test_loss_interval_by_hand():
    from nativevl.evaluation.calibrate import loss_interval

    answers = {"coarse": torch.tensor([1.0, 0.0]), "full": torch.tensor([1.0, 1.0])}  # item 1 broken by pooling
    confidence = torch.tensor([0.9, 0.5])
    assert loss_interval(confidence, answers, threshold=0.6) == (0.0, 0.0)  # item 1 falls back: nothing lost
    # kept coarse, item 1 loses 100 points: a resample of 2 items loses 0, 50 or 100 points on average
    low, high = loss_interval(confidence, answers, threshold=0.1)
    assert (low, high) == (0.0, 100.0)
    assert loss_interval(confidence, answers, 0.1, level=0.2) == (50.0, 50.0)  # the middle 20%: the mode, 50
    many = {key: value.repeat(500) for key, value in answers.items()}  # 1000 items, half of them losing 100
    low, high = loss_interval(confidence.repeat(500), many, threshold=0.1)
    assert 46.0 < low < 50.0 < high < 54.0  # 50 +- 1.96 x 100 x sqrt(0.25 / 1000) = 50 +- 3.1
    assert loss_interval(confidence.repeat(500), many, threshold=0.1) == (low, high)  # seeded


def test_cascade_calibration_writes_a_complete_folder(granular_tiny, tmp_path):
    import json

    from nativevl.evaluation.calibrate import RUN_FILE, main
    from nativevl.evaluation.synth_rc import generate_benchmark

    model, processor = granular_tiny
    source = tmp_path / "model"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    data = generate_benchmark(tmp_path / "data", per_cell=1, scale=1 / 8)
    out = tmp_path / "calibrated"
    args = ["--model", str(source), "--data", str(data), "--limit", "12", "--max-new-tokens", "4"]
    assert main([*args, "--output-dir", str(out), "--max-loss", "100"]) == 0
    run = json.loads((out / RUN_FILE).read_text())
    assert run["source_model"] == str(source.resolve()) and run["items"] == 12
    assert run["cascade_threshold"] == 0.0 and run["tokens"] == run["coarse_tokens"]  # any loss allowed: no fallback
    low, high = run["loss_interval_95"]
    assert low <= run["full_accuracy"] - run["accuracy"] <= high
    loaded = NativeVLForConditionalGeneration.from_pretrained(out)
    assert loaded.config.cascade_threshold == 0.0
    with pytest.raises(FileExistsError):  # a finished folder is never replaced silently
        main([*args, "--output-dir", str(out)])
    assert json.loads((out / RUN_FILE).read_text()) == run
    # scored in bfloat16, the copy keeps the source's weights byte for byte
    assert main([*args, "--output-dir", str(out), "--dtype", "bfloat16", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert json.loads((out / RUN_FILE).read_text())["args"]["dtype"] == "bfloat16"


def test_old_cascade_command_still_runs_with_a_deprecation_message(monkeypatch, capsys):
    import importlib
    import runpy
    import sys

    from nativevl.evaluation import calibrate

    monkeypatch.delitem(sys.modules, "nativevl.training.cascade", raising=False)
    with pytest.warns(FutureWarning, match="python -m nativevl.evaluation.calibrate"):
        old = importlib.import_module("nativevl.training.cascade")
    assert old.choose_threshold is calibrate.choose_threshold and old.RUN_FILE == calibrate.RUN_FILE
    monkeypatch.setattr(sys, "argv", ["cascade", "--help"])
    monkeypatch.delitem(sys.modules, "nativevl.training.cascade")  # `python -m` runs it fresh
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("nativevl.training.cascade", run_name="__main__")
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "moved to nativevl.evaluation.calibrate" in captured.err and "--max-loss" in captured.out
