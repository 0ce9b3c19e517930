"""Evaluation runs (`nativevl.evaluation.run` and `nativevl eval`) on a tiny synthetic benchmark and a random tiny
model: output files, resuming, the blank-image control, compare, profile, bad input, and batched generation with
left padding against one sample at a time."""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import nativevl
from nativevl.conversion.export import save_folder
from nativevl.evaluation import cli as eval_cli
from nativevl.evaluation import generate_benchmark, load_benchmark, profile_dataset
from nativevl.evaluation import run as run_module
from nativevl.evaluation.cli import main, synth_main
from nativevl.evaluation.data import EvalInputError, dataset_sizes, load_records
from nativevl.evaluation.report import print_report
from nativevl.evaluation.run import evaluate
from nativevl.testing import build_tiny


# scale 1/8 is the smallest power of two at which every rc image holds a digit at the minimum font size
SCALE = 1 / 8
RUN_ARGS = ["--max-new-tokens", "4", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """data.jsonl of 35 cells x 1 item x 2 kinds."""
    return generate_benchmark(tmp_path_factory.mktemp("bench"), per_cell=1, seed=0, scale=SCALE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_folder(*build_tiny(), path)
    return path


@pytest.fixture
def count_generate(monkeypatch) -> list:
    """Counts model.generate calls (each call still generates)."""
    calls = []
    original = nativevl.NativeVLForConditionalGeneration.generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nativevl.NativeVLForConditionalGeneration, "generate", counting)
    return calls


def _run(model_dir, data, out, *extra) -> int:
    return main(["run", "--model", str(model_dir), "--data", str(data), "--out", str(out), *RUN_ARGS, *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_outputs_and_resumes(bench, model_dir, tmp_path, count_generate, capsys):
    out = tmp_path / "native"
    assert _run(model_dir, bench, out, "--limit", "6") == 0
    assert sum(count_generate) == 6 and len(count_generate) == 2  # batches of 4 and 2

    rows = _lines(out / "predictions.jsonl")
    assert len(rows) == 6
    expected = {"id", "prediction", "answers", "score", "metric", "kind", "width", "height", "nominal_width"}
    expected |= {"nominal_height", "area_bin", "aspect_bin", "visual_tokens"}
    assert expected <= set(rows[0])
    areas = [r["width"] * r["height"] for r in rows]
    assert areas == sorted(areas, reverse=True)  # batches hold similar sizes
    assert all(r["visual_tokens"] > 0 for r in rows)

    scores = json.loads((out / "scores.json").read_text())
    for key in ("accuracy", "acv", "rcv", "cell_accuracy", "cell_count", "area_accuracy", "aspect_accuracy"):
        assert key in scores
    assert scores["count"] == 6 and scores["new_items"] == 6 and scores["resumed_items"] == 0
    assert scores["mode"] == "native" and scores["model"] == str(model_dir.resolve())
    assert scores["mean_visual_tokens"] == pytest.approx(sum(r["visual_tokens"] for r in rows) / 6)
    with open(out / "cells.csv") as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == 35 and sum(int(c["count"]) for c in cells) == 6
    with Image.open(out / "heatmap.png") as image:
        assert image.size[0] > 100
    report = capsys.readouterr().out
    assert "Acc" in report and "G >=24" in report and "6 new, 0 resumed" in report

    # rerun: nothing new is generated and the predictions are untouched
    before = (out / "predictions.jsonl").read_bytes()
    count_generate.clear()
    assert _run(model_dir, bench, out, "--limit", "6") == 0
    assert count_generate == []
    assert (out / "predictions.jsonl").read_bytes() == before
    assert json.loads((out / "scores.json").read_text())["new_items"] == 0
    assert "0 new, 6 resumed" in capsys.readouterr().out

    # a run killed in the middle of a line: the partial line is dropped and only that item is generated again
    text = before.decode()
    last = text.splitlines()[-1]
    (out / "predictions.jsonl").write_text(text[: -len(last) - 1] + last[:20])
    assert _run(model_dir, bench, out, "--limit", "8") == 0
    assert count_generate == [3]  # the cut item and records 7 and 8
    assert len(_lines(out / "predictions.jsonl")) == 8

    # a smaller limit scores the first records from the answers already there; the file keeps every answer
    count_generate.clear()
    assert _run(model_dir, bench, out, "--limit", "5") == 0
    assert count_generate == [] and len(_lines(out / "predictions.jsonl")) == 8
    assert json.loads((out / "scores.json").read_text())["count"] == 5
    capsys.readouterr()

    # other settings into the same folder are refused
    assert _run(model_dir, bench, out, "--limit", "8", "--mode", "fixed") == 2
    assert "other settings" in capsys.readouterr().err


def test_eval_help_says_what_a_rerun_with_another_limit_does(capsys):
    """The help and the behaviour above agree: another --limit extends the run; other settings are refused."""
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "a larger N extends the run" in text and "smaller one scores its first N" in text
    doc = " ".join(eval_cli.__doc__.split())
    assert "a larger limit generates only the records not yet answered" in doc
    assert "mode or limit is refused" not in doc


def test_blank_images_and_compare(bench, model_dir, tmp_path, monkeypatch, capsys):
    seen = []
    original = run_module.generate_batch

    def spy(model, processor, images, *args, **kwargs):
        seen.extend(images)
        return original(model, processor, images, *args, **kwargs)

    monkeypatch.setattr(run_module, "generate_batch", spy)
    assert _run(model_dir, bench, tmp_path / "native", "--limit", "4") == 0
    assert _run(model_dir, bench, tmp_path / "blank", "--limit", "4", "--blank-images") == 0
    blank = seen[4:]
    assert len(blank) == 4 and all(
        image.getcolors() == [(image.width * image.height, (128, 128, 128))] for image in blank
    )
    assert [image.size for image in blank] == [image.size for image in seen[:4]]
    assert json.loads((tmp_path / "blank" / "scores.json").read_text())["blank_images"] is True
    capsys.readouterr()

    assert main(["compare", str(tmp_path / "native"), str(tmp_path / "blank")]) == 0
    text = capsys.readouterr().out
    assert "native" in text and "blank" in text and "A - B" in text
    for label in ("Acc", "ACV", "RCV", "area A", "area G", "aspect BH", "aspect BW", "kind rc"):
        assert label in text
    png = tmp_path / "compare_native_vs_blank.png"
    with Image.open(png) as image:
        assert image.format == "PNG"
    assert main(["compare", str(tmp_path / "native"), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_profile_counts(bench, tmp_path, capsys):
    assert profile_dataset(dataset_sizes(bench)) == [[2] * 5 for _ in range(7)]  # nominal sizes: 2 kinds per cell
    assert main(["profile", str(bench), "--out", str(tmp_path / "profile.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in table if line[:2] in {f"{a} " for a in "ABCDEFG"}]
    assert [[int(n) for n in row[2:]] for row in rows] == [[2] * 5 + [10] for _ in range(7)]
    Image.open(tmp_path / "profile.png").verify()

    # without size fields, sizes come from the image headers (the actual, scaled sizes); absolute paths outside
    # the data file's folder need allow_outside_paths
    records = load_benchmark(bench)
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({"image": r["image_path"]}) + "\n" for r in records))
    assert dataset_sizes(bare, allow_outside_paths=True) == [(r["width"], r["height"]) for r in records]
    assert main(["profile", str(bare)]) == 2
    assert "outside the data folder" in capsys.readouterr().err
    assert main(["profile", str(bare), "--allow-outside-paths"]) == 0
    assert (tmp_path / "bare_profile.png").is_file()


def _png_base64(size=(40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_base64_images(model_dir, tmp_path):
    data = tmp_path / "b64.jsonl"
    rows = [
        {"id": "uri", "image": "data:image/png;base64," + _png_base64(), "question": "Colour?", "answers": ["red"]},
        {"image": _png_base64((30, 90)), "question": "Colour?", "answers": ["red"], "kind": "sc"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(data)
    assert [r["id"] for r in records] == ["uri", "line-2"]
    assert (
        main(["run", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"), *RUN_ARGS]) == 0
    )
    predictions = {r["id"]: r for r in _lines(tmp_path / "run" / "predictions.jsonl")}
    assert (predictions["uri"]["width"], predictions["uri"]["height"]) == (40, 30)
    assert (predictions["line-2"]["width"], predictions["line-2"]["height"]) == (30, 90)
    assert predictions["uri"]["metric"] == "exact_match"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"id": "q1", "image": "x.png", "question": "Q?"}, "'q1' lacks ['answers']"),
        ({"id": "q2", "image": "x.png", "question": "Q?", "answers": "yes"}, "'q2': answers must be a non-empty list"),
        ({"id": "q3", "question": "Q?", "answers": ["a"]}, "'q3' lacks ['image']"),
        ({"id": "q4", "image": "missing.png", "question": "Q?", "answers": ["a"]}, "missing.png"),
        (
            {
                "id": "q5",
                "image": "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
                "question": "?",
            }
            | {"answers": ["a"]},
            "record 'q5': cannot read image",
        ),
        (
            {"id": "q6", "image": base64.b64encode(b"corrupt bytes, not a PNG").decode(), "question": "?"}
            | {"answers": ["a"], "width": 10, "height": 10},
            "record 'q6': cannot read image",  # the header check before decoding
        ),
        (
            {
                "id": "q7",
                "image": "data:image/png;base64," + _png_base64((1000, 4)),
                "question": "?",
                "answers": ["a"],
            },
            "record 'q7': image: size 4x1000 (h x w) has aspect ratio 250.0",
        ),
    ],
)
def test_bad_input_exits_2(record, message, model_dir, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"")
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(record) + "\n")
    assert (
        main(["run", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"), *RUN_ARGS]) == 2
    )
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_bad_arguments_exit_2(bench, model_dir, tmp_path, capsys):
    assert _run(model_dir, tmp_path / "missing.jsonl", tmp_path / "run") == 2
    assert "data file not found" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert _run(model_dir, bench, tmp_path / "run", "--mode", "tiles") == 2
    assert "'tiles'" in capsys.readouterr().err
    assert _run(tmp_path / "no_model", bench, tmp_path / "run") == 2
    assert "no_model" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "missing.jsonl")]) == 2
    model, processor = build_tiny()
    with pytest.raises(EvalInputError, match="unknown mode 'tiles'"):
        evaluate(model, processor, load_records(bench, limit=1), tmp_path / "run", mode="tiles")


def test_synth_main(tmp_path, capsys):
    assert (
        synth_main([str(tmp_path / "s"), "--per-cell", "1", "--seed", "0", "--scale", "0.125", "--kinds", "sc"]) == 0
    )
    assert len(load_benchmark(tmp_path / "s" / "data.jsonl")) == 35
    assert synth_main([str(tmp_path / "t"), "--per-cell", "1", "--scale", "0.01"]) == 2
    assert "cannot hold" in capsys.readouterr().err
    argv = [str(tmp_path / "d"), "--per-cell", "1", "--scale", "0.125", "--kinds", "rc", "--rc-contents", "digit"]
    assert synth_main([*argv, "--rc-placement", "corner"]) == 0
    records = load_benchmark(tmp_path / "d" / "data.jsonl")
    assert {r["content"] for r in records} == {"digit"} and {tuple(r["text_box"][:2]) for r in records} == {(2, 2)}
    assert synth_main([*argv, "--rc-placement", "middle"]) == 2
    assert "rc_placement must be one of" in capsys.readouterr().err


def test_batched_generation_matches_one_by_one(bench, tmp_path):
    """Left padding in a batch of mixed image sizes gives the same greedy answers as batch size 1."""
    model, processor = build_tiny()
    records = load_benchmark(bench)[::9]  # 8 records over all area bins, sizes from 17x84 to 179x400
    scores = {}
    for batch_size in (1, 8):
        out = tmp_path / f"bs{batch_size}"
        scores[batch_size] = evaluate(
            model, processor, records, out, batch_size=batch_size, max_new_tokens=6, progress=False
        )
        assert scores[batch_size]["new_items"] == 8
    one = {r["id"]: r for r in _lines(tmp_path / "bs1" / "predictions.jsonl")}
    batched = {r["id"]: r for r in _lines(tmp_path / "bs8" / "predictions.jsonl")}
    assert one.keys() == batched.keys()
    assert len({r["visual_tokens"] for r in one.values()}) > 1  # the batch really mixes sizes
    assert len({r["prediction"] for r in one.values()}) > 1  # and the answers depend on the image
    for key in one:
        assert batched[key]["prediction"] == one[key]["prediction"], key
        assert batched[key]["visual_tokens"] == one[key]["visual_tokens"], key
    assert "Acc" in print_report(scores[8])
