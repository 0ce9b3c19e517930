"""`nativevl demo` end to end on a minimal budget: every output exists and parses, and the training follows the
demo's recipe (`tiny_from_stage0` from the shipped tower, `tiny_scratch` with `--from-scratch`; nothing overridden
but the step count)."""

import json
import runpy
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from nativevl.cli import main
from nativevl.demo import PRETRAINED_VISION, WallClockCap
from nativevl.evaluation.data import load_records


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "6", "--out", str(out), "--train-per-cell", "2", "--test-per-cell", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    training = summary["training"]
    assert training["steps"] == training["max_steps"] == 6 and not training["stopped_by_wall_clock"]
    assert f"6 steps in {training['seconds']} s ({training['steps_per_second']} steps/s)" in printed
    assert [qa["expected"] is not None for qa in summary["pipeline"]] == [True, True]
    for run in ("native", "fixed", "fixed16", "crop", "blank"):
        scores = json.loads((out / "runs" / run / "scores.json").read_text())
        assert scores["count"] == 70 and 0 <= scores["accuracy"] <= 100
        assert len((out / "runs" / run / "cells.csv").read_text().strip().splitlines()) == 36  # header + 35 cells
        assert Image.open(out / "runs" / run / "heatmap.png").size[0] > 100
        assert f"heatmap ({run}): {out / 'runs' / run / 'heatmap.png'}" in printed
        assert summary["runs"][run]["rc"] is not None and summary["runs"][run]["sc"] is not None
    tokens = {run: summary["runs"][run]["mean_visual_tokens"] for run in ("native", "fixed", "fixed16", "crop")}
    assert tokens["fixed"] < tokens["crop"] < tokens["native"] and tokens["fixed"] < tokens["fixed16"], tokens
    assert "  SC items: native" in printed and "and fixed16" in printed
    assert Image.open(out / "runs" / "rc_native_minus_fixed.png").size[0] > 100
    assert set(summary["rc_native_minus_fixed"]) == {"large area (E, F, G)", "extreme aspect (BH, BW)"}
    assert "large area (E, F, G): native" in printed and "area   G  >=24" in printed
    config = json.loads((out / "train" / "final" / "config.json").read_text())
    assert "AutoModelForImageTextToText" in config["auto_map"]
    assert "uses the image: native" in printed and "pipeline('image-text-to-text')" in printed
    # the shipped pre-trained tower is the starting point, and the text sits anywhere in images of any size
    assert json.loads((out / "demo_run.json").read_text())["vision_init"] == str(PRETRAINED_VISION.resolve())
    init, final = (load_file(out / name / "model.safetensors") for name in ("init", "train/final"))
    for key, value in load_file(PRETRAINED_VISION / "vision.safetensors").items():
        assert init[f"model.visual.{key}"].equal(value), key
    # fewer SC than RC training items (a third by default, at least 1 per cell); the held-out set keeps both at 1
    kinds = [row["id"].rsplit("-", 1)[1] for row in map(json.loads, open(out / "data" / "train" / "train.jsonl"))]
    assert (kinds.count("rc"), kinds.count("sc")) == (70, 35) and "(2 RC and 1 SC per cell)" in printed
    records = load_records(out / "data" / "test" / "data.jsonl")
    assert any(r["width"] % 28 or r["height"] % 28 for r in records)
    assert len({(r["text_box"][0] - 2) % 28 for r in records if r["kind"] == "rc"}) > 3
    # the tiny_from_stage0 recipe: the ViT as pre-trained, the merger and the LLM trained
    assert training["recipe"] == "tiny_from_stage0.yaml" and "(tiny_from_stage0.yaml)" in printed
    vit = [k for k in init if ".visual." in k and ".merger." not in k]
    merger = [k for k in init if ".visual.merger." in k and not k.endswith("merger.mlp.2.bias")]
    assert vit and all(init[k].equal(final[k]) for k in vit)
    assert merger and not any(init[k].equal(final[k]) for k in merger)
    assert not all(init[k].equal(final[k]) for k in init if ".visual." not in k)  # the LLM trained

    # experiments/modes/compare_modes.py on this demo: one model per mode, from the demo's init, scored in its own mode
    compare = runpy.run_path(
        str(Path(__file__).resolve().parent.parent / "experiments" / "modes" / "compare_modes.py")
    )["main"]
    assert compare(["--demo", str(out), "--steps", "2", "--out", str(tmp_path / "modes")]) == 0
    modes = json.loads((tmp_path / "modes" / "summary.json").read_text())
    assert modes["steps"] == 2 and [stats["steps"] for stats in modes["training"].values()] == [2, 2]
    tokens = {name.split()[0]: row["mean_visual_tokens"] for name, row in modes["scores"].items()}
    assert tokens["fixed"] < tokens["crop"] < tokens["native"], tokens
    assert tokens["native"] == summary["runs"]["native"]["mean_visual_tokens"]
    for mode in ("fixed", "crop"):
        processor = json.loads((tmp_path / "modes" / mode / "train" / "final" / "processor_config.json").read_text())
        assert processor["image_processor"]["mode"] == mode
        scores = json.loads((tmp_path / "modes" / mode / "run" / "scores.json").read_text())
        assert scores["count"] == 70


def test_from_scratch_keeps_the_random_tower_and_the_text_on_the_token_grid(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--out", str(out), "--train-per-cell", "1", "--test-per-cell", "1"]
    assert main([*argv, "--from-scratch"]) == 0
    assert "vision_init" not in json.loads((out / "demo_run.json").read_text())
    records = load_records(out / "data" / "test" / "data.jsonl")
    assert all(r["width"] % 28 == 0 and r["height"] % 28 == 0 for r in records)  # never resampled
    assert {(r["text_box"][0] - 2) % 28 for r in records if r["kind"] == "rc"} == {0}  # on the merged-token grid
    # the tiny_scratch recipe: the random vision side frozen, the merger's output bias moved by the centring only
    assert json.loads((out / "summary.json").read_text())["training"]["recipe"] == "tiny_scratch.yaml"
    init, final = (load_file(out / name / "model.safetensors") for name in ("init", "train/final"))
    vision = [k for k in init if ".visual." in k]
    assert vision and all(init[k].equal(final[k]) for k in vision if not k.endswith("merger.mlp.2.bias"))
    init = load_file(out / "init" / "model.safetensors")
    assert init["model.visual.patch_embed.proj.weight"].shape[0] == 64  # build_tiny's random tower
    capsys.readouterr()
    with pytest.raises(SystemExit) as error:
        main([*argv, "--from-scratch", "--vision-init", str(PRETRAINED_VISION)])
    assert error.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        main([*argv, "--vision-init", str(tmp_path)])
    assert error.value.code == 2 and f"--vision-init {tmp_path} holds no vision_config.json" in capsys.readouterr().err


def test_wall_clock_cap_stops_training_and_says_so():
    from transformers import TrainerControl

    cap, control = WallClockCap(3600.0), TrainerControl()
    cap.on_step_end(None, None, control)
    assert not control.should_training_stop and not cap.hit
    cap, control = WallClockCap(0.0), TrainerControl()
    cap.on_step_end(None, None, control)  # starts the clock
    while not control.should_training_stop:
        cap.on_step_end(None, None, control)
    assert cap.hit
