"""Nothing lost, nothing hung: bad input, faults and concurrency at every entry point.

Each test is a failure an outside reliability suite found: stale results resumed into a run folder, destinations
replaced under concurrency, hangs on non-regular files, wrong token budgets for some input types, paths escaping the
data folder, the decompression-bomb guard bypassed, and tracebacks instead of one-line errors. Kills are injected
deterministically: a subprocess patches the function it would be inside and SIGKILLs itself there.
"""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_colour_dataset
from PIL import Image
from transformers.trainer_utils import get_last_checkpoint

import nativevl
from nativevl.cli import main as cli_main
from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint
from nativevl.conversion.export import save_folder
from nativevl.demo import _num as demo_num
from nativevl.evaluation import generate_benchmark
from nativevl.evaluation.cli import main as eval_main
from nativevl.evaluation.data import EvalInputError, load_records
from nativevl.processing.image_io_nativevl import _array_to_pil, image_size
from nativevl.processing.image_processing_nativevl import NativeVLImageProcessor
from nativevl.runs import RunFolderError, RunLock, atomic_output_dir
from nativevl.testing import build_tiny
from nativevl.training.checkpoints import replace_checkpoint
from nativevl.training.train import check_output_dir, parse, resume_argument


RUN_ARGS = ["--max-new-tokens", "2", "--batch-size", "2", "--no-progress", "--limit", "2"]


def _fork(fn) -> int:
    """Runs `fn` in a forked copy of this process (everything already imported); returns its pid. The child never
    returns into pytest: it exits with status 0 after `fn`, 1 on an exception, or dies inside `fn`."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            fn()
            status = 0
        finally:
            os._exit(status)
    return pid


def _killed_at(fn) -> None:
    """Runs `fn` in a forked child and checks that it died of SIGKILL (the fault `fn` injects) rather than ending."""
    _, status = os.waitpid(_fork(fn), 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with status {status}"


def _sigkill(*args, **kwargs):
    """A fault: the calling process dies at once, as under `kill -9` or the OOM killer."""
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(max_pixels=224 * 224)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_folder(*tiny, path)
    return path


def _bench(folder: Path, seed: int) -> Path:
    return generate_benchmark(folder, per_cell=1, seed=seed, scale=1 / 8, kinds=["sc"])


def _eval(model_dir, data, out, *extra) -> int:
    return eval_main(["run", "--model", str(model_dir), "--data", str(data), "--out", str(out), *RUN_ARGS, *extra])


# ------------------------------------------------------------------------------------------ run folders (1, 10)
def test_eval_resume_refuses_other_data_weights_or_dtype(model_dir, tmp_path, capsys):
    data = _bench(tmp_path / "bench", seed=0)
    out = tmp_path / "run"
    assert _eval(model_dir, data, out) == 0
    assert "2 new, 0 resumed" in capsys.readouterr().out

    _bench(tmp_path / "bench", seed=1)  # same ids, other images and answers
    assert _eval(model_dir, data, out) == 2
    err = capsys.readouterr().err
    assert "data_digest" in err and "--overwrite" in err and "Traceback" not in err
    assert _eval(model_dir, data, out, "--overwrite") == 0
    assert "2 new, 0 resumed" in capsys.readouterr().out

    assert _eval(model_dir, data, out, "--dtype", "bfloat16") == 2
    assert "dtype" in capsys.readouterr().err

    model = tmp_path / "model"  # a model folder retrained in place: other weights under the same path
    shutil.copytree(model_dir, model)
    assert _eval(model, data, tmp_path / "run2") == 0
    capsys.readouterr()
    save_folder(*build_tiny(seed=1, max_pixels=224 * 224), model, overwrite=True)
    assert _eval(model, data, tmp_path / "run2") == 2
    assert "weights" in capsys.readouterr().err


def test_second_run_into_a_locked_folder_refuses_and_a_dead_owners_lock_is_taken_over(model_dir, tmp_path, capsys):
    data = _bench(tmp_path / "bench", seed=0)
    out = tmp_path / "run"
    ready, done = os.pipe()
    holder = _fork(lambda: (RunLock(out).__enter__(), os.write(done, b"locked"), time.sleep(600)))
    try:
        assert os.read(ready, 6) == b"locked"
        assert _eval(model_dir, data, out) == 2
        err = capsys.readouterr().err
        assert f"in use by process {holder}" in err
        assert not (out / "predictions.jsonl").exists()
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    assert (out / ".lock").read_text().strip() == str(holder)  # the dead owner's lock file is still there
    assert _eval(model_dir, data, out) == 0
    with RunLock(out), pytest.raises(RunFolderError, match=f"in use by process {os.getpid()}"):
        RunLock(out).__enter__()


# ------------------------------------------------------------------------------------------ data paths (8)
def test_eval_paths_stay_under_the_data_folder(tmp_path):
    inside = tmp_path / "data"
    inside.mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "secret.png")
    record = {"question": "?", "answers": ["a"]}
    messages = []
    for image in ("../secret.png", "../missing.png", str(tmp_path / "secret.png"), "/etc/passwd"):
        data = inside / "data.jsonl"
        data.write_text(json.dumps(record | {"image": image}) + "\n")
        with pytest.raises(EvalInputError, match="outside the data folder") as err:
            load_records(data)
        messages.append(str(err.value).replace(image, "IMAGE"))
    assert messages[0] == messages[1]  # an existing and a missing file: the same error
    assert len(load_records(_write(inside, "../secret.png"), allow_outside_paths=True)) == 1


def _write(folder: Path, image: str) -> Path:
    path = folder / "allowed.jsonl"
    path.write_text(json.dumps({"image": image, "question": "?", "answers": ["a"]}) + "\n")
    return path


# ------------------------------------------------------------------------------------------ image sizes (3, 7, 9)
def _inputs(tmp_path: Path, height: int = 45, width: int = 150) -> dict:
    """One height x width image as every input type the image processor accepts."""
    rgb = np.random.RandomState(0).randint(0, 255, (height, width, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    encoded = path.read_bytes()
    return {
        "pil": Image.fromarray(rgb),
        "numpy_hwc": rgb,
        "numpy_chw": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        "torch_chw": torch.from_numpy(rgb).permute(2, 0, 1),
        "torch_hwc": torch.from_numpy(rgb),
        "str": str(path),
        "pathlib": path,
        "bytes": encoded,
        "bytearray": bytearray(encoded),
    }


def test_one_size_reader_for_every_input_type_and_the_budget_uses_it(tmp_path, tiny):
    _, processor = tiny
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}], add_generation_prompt=True
    )
    reference = processor.image_processor(images=[_inputs(tmp_path)["pil"]])["image_grid_thw"].tolist()
    for kind, image in _inputs(tmp_path).items():
        assert image_size(image) == (45, 150), kind
        out = processor(images=[image], text=[prompt], max_image_tokens=4)
        tokens = int((out["input_ids"] == processor.image_token_id).sum())
        assert tokens <= 4 and out["image_grid_thw"].prod(-1).sum() // 4 == tokens, kind
        assert processor.image_processor(images=[image])["image_grid_thw"].tolist() == reference, kind
    with pytest.raises(ValueError, match="4-D array of shape"):
        processor(images=[np.zeros((2, 45, 150, 3), np.uint8)], text=[prompt])


def test_bad_text_is_a_value_error_naming_the_argument(tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"text must be a string or a non-empty list of strings, got \[\]"):
        processor(text=[])
    with pytest.raises(ValueError, match=r"text\[1\] must be a string, got 123 \(int\)"):
        processor(text=["fine", 123])
    with pytest.raises(ValueError, match=r"text must be a string .* got 7"):
        processor(text=7)


def test_per_sample_images_must_match_each_samples_placeholders(tmp_path, tiny):
    _, processor = tiny
    image = _inputs(tmp_path)["pil"]
    texts = ["no image here", "<|vision_start|><|image_pad|><|vision_end|>?"]
    with pytest.raises(
        ValueError, match=r"sample 0: 1 image\(s\) were given for it but its text holds 0 <\|image_pad"
    ):
        processor(images=[[image], []], text=texts)
    with pytest.raises(ValueError, match=r"2 per-sample list\(s\) \[1, 0\] but there are 1 text\(s\)"):
        processor(images=[[image], []], text=texts[1:])
    # matching per-sample lists and flat lists (matched to placeholders in order across the batch) are accepted
    nested = processor(images=[[], [image]], text=texts, padding_side="left")
    flat = processor(images=[image], text=texts, padding_side="left")
    assert torch.equal(nested["input_ids"], flat["input_ids"])
    assert torch.equal(nested["pixel_values"], flat["pixel_values"])
    frames = [np.zeros((56, 56, 3), np.uint8)] * 2
    videos_text = ["<|vision_start|><|video_pad|><|vision_end|>?", "no video"]
    with pytest.raises(
        ValueError, match=r"sample 0: 0 video\(s\) were given for it but its text holds 1 <\|video_pad"
    ):
        processor(videos=[[], [frames]], text=videos_text)
    assert processor(videos=[[frames], []], text=videos_text)["video_grid_thw"].shape == (1, 3)


def test_a_fifo_is_refused_without_being_opened(tmp_path, tiny):
    _, processor = tiny
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>?"
    errors = []

    def call():
        for budget in (None, 20):
            with pytest.raises(ValueError, match="is not a regular file") as err:
                processor(images=[str(fifo)], text=[prompt], max_image_tokens=budget)
            errors.append(str(err.value))

    worker = threading.Thread(target=call, daemon=True)  # the old code blocks forever in open()
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail("reading the size of a FIFO blocked")
    assert len(errors) == 2
    with pytest.raises(ValueError, match="not a regular file"):
        image_size(fifo)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_limit_applies_in_eval(model_dir, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    record = {"id": "big", "image": "big.png", "question": "?", "answers": ["a"], "width": 300, "height": 200}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # 60,000 px: PIL itself only warns below 2x the limit
    with pytest.raises(ValueError, match="decompression bomb"):
        image_size(tmp_path / "big.png")
    assert _eval(model_dir, tmp_path / "data.jsonl", tmp_path / "run") == 2
    assert "possible decompression bomb" in capsys.readouterr().err
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


def test_processor_settings_and_arrays_refused_with_their_values():
    with pytest.raises(ValueError, match=r"image_std.*0\.0"):
        NativeVLImageProcessor(image_std=0)
    with pytest.raises(ValueError, match="max_pixels must be an int, got '100000' \\(str\\)"):
        NativeVLImageProcessor()(images=[np.zeros((28, 28, 3), np.uint8)], max_pixels="100000")
    ambiguous = np.zeros((3, 56, 2), np.uint8)
    with pytest.raises(ValueError, match=r"\(3, 56, 2\) is ambiguous"):
        NativeVLImageProcessor()(images=[ambiguous])
    assert image_size(ambiguous, "channels_first") == (56, 2)


def test_rgba_arrays_composite_exactly_as_before_in_small_integers():
    rgba = np.random.RandomState(1).randint(0, 256, (64, 96, 4), dtype=np.uint8)
    rgba[:2, :2, 3] = [[0, 255], [128, 1]]
    alpha = rgba[..., 3:4] / 255  # transformers' convert_to_rgb, numpy branch (float64)
    expected = np.round(alpha * rgba[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    processor = NativeVLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56 * 4)
    ours = processor(images=[rgba], max_pixels=64 * 96, min_pixels=64 * 96)
    theirs = processor(images=[expected], max_pixels=64 * 96, min_pixels=64 * 96)
    assert np.array_equal(ours["pixel_values"], theirs["pixel_values"])
    every = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).reshape(-1, 1, 2)  # (x, a)
    grid = np.concatenate([np.repeat(every[..., :1], 3, -1), every[..., 1:]], -1).astype(np.uint8)  # (65536, 1, 4)
    a = grid[..., 3:4] / 255
    assert np.array_equal(
        np.asarray(_array_to_pil(grid, "x", processor._config({}), None, "channels_last")),
        np.round(a * grid[..., :3] + (1 - a) * 255).astype(np.uint8),
    )


# ------------------------------------------------------------------------------------------ atomic outputs (2, 4, 5)
def test_export_race_never_replaces_the_other_writers_folder(tiny, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        with atomic_output_dir(target) as slow:
            (slow / "slow.txt").write_text("slow")
            save_folder(*tiny, target)  # a second export to the same new destination finishes first
    assert (target / "model.safetensors").is_file() and not (target / "slow.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the slow writer's temporary folder is gone
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_export_killed_midway_leaves_nothing_and_its_leftovers_are_cleaned(tiny, tmp_path):
    target = tmp_path / "out"

    def killed_export():
        import nativevl.conversion.export as export

        export.render_card = _sigkill  # dies after the weights are written, before the README
        save_folder(*tiny, target)

    _killed_at(killed_export)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.tmp-") and not target.exists()
    save_folder(*tiny, target)  # the next writer removes the dead writer's temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_killed_while_replacing_restores_the_previous_folder(tiny, tmp_path):
    target = tmp_path / "out"
    save_folder(*tiny, target)
    before = (target / "model.safetensors").read_bytes()

    def killed_between_renames():
        original = os.replace

        def replace(src, dst, *args, **kwargs):  # dies once the old folder is aside, before the new one is in
            original(src, dst, *args, **kwargs)
            if Path(src) == target:
                _sigkill()

        os.replace = replace
        save_folder(*tiny, target, overwrite=True)

    _killed_at(killed_between_renames)
    assert not target.exists()
    with pytest.raises(FileExistsError, match="exists and is not empty"):  # the old folder is back: refused
        with atomic_output_dir(target):
            pass
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_removes_dead_writers_leftovers_of_any_name_in_its_parent(tiny, tmp_path):
    def killed_export():
        import nativevl.conversion.export as export

        export.render_card = _sigkill  # dies after the weights are written, before the README
        save_folder(*tiny, tmp_path / "a")

    _killed_at(killed_export)
    (dead,) = [p.name for p in tmp_path.iterdir()]
    assert dead.startswith(".a.tmp-")
    live = tmp_path / f".c.tmp-{os.getpid()}-abcdefgh"  # a writer still running (this process): kept
    live.mkdir()
    (tmp_path / "d.tmp-1-notmine").mkdir()  # not a writer's temporary name: kept
    assert cli_main(["export", "--tiny", str(tmp_path / "b")]) == 0  # another name, the same parent
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", live.name, "d.tmp-1-notmine"])


def test_atomic_write_keeps_the_old_file_on_failure_and_removes_dead_writers_files(tmp_path):
    from nativevl.runs import atomic_write

    target = tmp_path / "scores.json"
    target.write_text("old")

    def fails(path):
        path.write_text("half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"] and target.read_text() == "old"

    def killed_while_writing():
        atomic_write(target, lambda path: (path.write_text("half"), _sigkill()))

    _killed_at(killed_while_writing)
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 2  # the dead writer's .tmp- file
    atomic_write(tmp_path / "cells.csv", lambda path: path.write_text("new"))  # the next writer into the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "scores.json"]


def test_checkpoint_replacement_killed_midway_leaves_a_complete_checkpoint(tmp_path):
    files = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
    target, written = tmp_path / "checkpoint-4", tmp_path / ".staging-4" / "checkpoint-4"
    for folder, tag in ((target, "old"), (written, "new")):
        folder.mkdir(parents=True)
        for name in files:
            (folder / name).write_text(tag)

    def killed_while_deleting():
        original = os.unlink

        def unlink(*args, **kwargs):  # shutil.rmtree deletes file by file: die after the first
            original(*args, **kwargs)
            _sigkill()

        os.unlink = unlink
        replace_checkpoint(str(written), str(target))

    _killed_at(killed_while_deleting)
    assert sorted(p.name for p in target.iterdir()) == sorted(files)
    assert {(target / name).read_text() for name in files} == {"new"}
    assert get_last_checkpoint(str(tmp_path)) == str(target)  # the half-deleted old one is hidden aside
    (tmp_path / "next").mkdir()
    replace_checkpoint(str(tmp_path / "next"), str(target))  # the next replacement removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging-4", "checkpoint-4"]


def test_synth_rc_killed_midway_keeps_the_old_benchmark_and_a_smaller_rerun_leaves_no_stale_images(tmp_path):
    out = tmp_path / "bench"
    generate_benchmark(out, per_cell=2, seed=0, scale=1 / 8, kinds=["sc"])
    before = {p.name: p.read_bytes() for p in [out / "data.jsonl", *(out / "images").iterdir()]}

    def killed_while_saving():
        saved = []
        original = Image.Image.save

        def save(self, *args, **kwargs):
            if len(saved) == 5:
                _sigkill()
            saved.append(args[0])
            return original(self, *args, **kwargs)

        Image.Image.save = save
        generate_benchmark(out, per_cell=1, seed=1, scale=1 / 8, kinds=["sc"])

    _killed_at(killed_while_saving)
    assert {p.name: p.read_bytes() for p in [out / "data.jsonl", *(out / "images").iterdir()]} == before
    generate_benchmark(out, per_cell=1, seed=1, scale=1 / 8, kinds=["sc"])
    records = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["image"]).name for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds no data.jsonl"):
        generate_benchmark(tmp_path / "mine", per_cell=1, kinds=["sc"], scale=1 / 8)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------ training runs (6, 8, 11)
def _training_args(model_dir, data, out, *extra):
    recipe = Path(nativevl.__file__).parent / "training" / "recipes" / "tiny_stage2.yaml"
    return parse([str(recipe), "--model_name_or_path", str(model_dir), "--dataset_path", str(data), "--output_dir",
                  str(out), *extra])  # fmt: skip


RESUME = ("--resume_from_checkpoint", "true")


def test_training_into_another_runs_output_dir_refuses(model_dir, tmp_path):
    data_a = write_colour_dataset(tmp_path / "a", 2, seed=0)
    data_b = write_colour_dataset(tmp_path / "b", 2, seed=1)
    out = tmp_path / "out"
    check_output_dir(*_training_args(model_dir, data_b, out))  # a run that saved no checkpoint: nothing to mix
    check_output_dir(*_training_args(model_dir, data_a, out))  # run A records its fingerprint
    (out / "checkpoint-2").mkdir()
    check_output_dir(*_training_args(model_dir, data_a, out, *RESUME))  # A again (a resume): fine
    with pytest.raises(RunFolderError, match="dataset"):
        check_output_dir(*_training_args(model_dir, data_b, out))
    (out / "nativevl_run.json").unlink()
    with pytest.raises(RunFolderError, match=r"checkpoints \(checkpoint-2\) of a run that recorded no"):
        check_output_dir(*_training_args(model_dir, data_a, out))
    check_output_dir(*_training_args(model_dir, data_b, out, "--overwrite", "true"))
    assert not (out / "checkpoint-2").exists()
    assert resume_argument("true") is True and resume_argument("False") is None
    # stage rglf: the feedback the router learns from is part of the run (a resumed run must not change it)
    rglf = ("--stage", "rglf", "--granularity", "3")
    check_output_dir(*_training_args(model_dir, data_a, out, *rglf, "--overwrite", "true"))
    (out / "checkpoint-2").mkdir()
    check_output_dir(*_training_args(model_dir, data_a, out, *rglf, *RESUME))  # the same rglf run again: fine
    with pytest.raises(RunFolderError, match="rglf_feedback") as refused:
        check_output_dir(*_training_args(model_dir, data_a, out, *rglf, "--rglf_feedback", "exact_match"))
    assert "granularity" not in str(refused.value).replace("rglf_", "")
    assert resume_argument(str(out / "checkpoint-2")) == str(out / "checkpoint-2")


def test_training_without_resume_into_a_folder_with_checkpoints_exits_2(model_dir, tmp_path, capsys):
    data = write_colour_dataset(tmp_path / "a", 2, seed=0)
    out = tmp_path / "out"
    check_output_dir(*_training_args(model_dir, data, out))  # an earlier run with the same fingerprint...
    (out / "checkpoint-4").mkdir()  # ...left a checkpoint
    recipe = Path(nativevl.__file__).parent / "training" / "recipes" / "tiny_stage2.yaml"
    argv = ["train", str(recipe), "--model_name_or_path", str(model_dir), "--dataset_path", str(data),
            "--output_dir", str(out), "--max_steps", "1", "--save_strategy", "no"]  # fmt: skip
    assert cli_main(argv) == 2  # a fresh run would keep checkpoint-4 for a later resume to take
    _one_line_error(capsys, f"{out} holds checkpoints", "checkpoint-4", "--resume_from_checkpoint true", "--overwrite")
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["checkpoint-4", "nativevl_run.json"]


def test_train_cli_errors_are_one_line_and_write_nothing(model_dir, tmp_path, capsys):
    data = Path(write_colour_dataset(tmp_path / "data", 2))
    Image.new("RGB", (30, 30)).save(tmp_path / "outside.png")
    lines = data.read_text().splitlines()
    bad = {
        "malformed.jsonl": (lines[0] + "\n{not json\n", "malformed.jsonl line 2 is not UTF-8 JSON"),
        "latin1.jsonl": (lines[0] + "\n", "latin1.jsonl line 1 is not UTF-8 JSON"),
        "missing.jsonl": (
            lines[0].replace("images/0.png", "images/9.png") + "\n",
            "line 1: field images[0] 'images/9.png' is not a file",
        ),
        "outside.jsonl": (lines[0].replace("images/0.png", "../outside.png") + "\n", "lies outside the dataset"),
    }
    recipe = Path(nativevl.__file__).parent / "training" / "recipes" / "tiny_stage2.yaml"
    cases = [([str(tmp_path / "nope.yaml")], "nope.yaml"), ([str(recipe)], "dataset")]
    for name, (text, message) in bad.items():
        path = data.parent / name
        encoded = text.encode()
        path.write_bytes(encoded.replace(b"Colour", b"Colo\xfcr") if name == "latin1.jsonl" else encoded)
        cases.append(([str(recipe), "--dataset_path", str(path)], message))
    for argv, message in cases:
        out = tmp_path / "out"
        argv = ["train", *argv, "--model_name_or_path", str(model_dir), "--output_dir", str(out)]
        if "--dataset_path" not in argv:
            argv += ["--dataset_path", str(tmp_path / "absent.jsonl")]
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()


# ------------------------------------------------------------------------------------------ one-line CLI errors (11)
def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and "Traceback" not in err and all(f in lines[0] for f in fragments), err
    return lines[0]


def test_cli_errors_are_one_line_exit_2_and_write_nothing(model_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    assert cli_main(["export", "--tiny", str(tmp_path / "full")]) == 2
    _one_line_error(capsys, "FileExistsError", "full exists and is not empty")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError):  # --debug: the traceback
        cli_main(["--debug", "export", "--tiny", str(tmp_path / "full")])

    data = _bench(tmp_path / "bench", seed=0)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9"}\n')
    truncated, disagreeing = tmp_path / "truncated", tmp_path / "disagreeing"
    for folder in (truncated, disagreeing):
        shutil.copytree(model_dir, folder)
    (truncated / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    config = json.loads((disagreeing / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 32
    (disagreeing / "config.json").write_text(json.dumps(config))
    (tmp_path / "file").write_text("")
    cases = [
        (tmp_path / "missing_model", data, "model folder not found"),
        (model_dir, tmp_path / "latin1.jsonl", "latin1.jsonl line 1 is not UTF-8"),
        (truncated, data, "cannot load the model in"),
        (disagreeing, data, "cannot load the model in"),
    ]
    for model, data_file, message in cases:
        assert _eval(model, data_file, tmp_path / "run") == 2
        _one_line_error(capsys, message)
        assert not (tmp_path / "run").exists()
    assert _eval(model_dir, data, tmp_path / "file") == 2
    _one_line_error(capsys, "exists and is not a folder")

    assert _eval(model_dir, data, tmp_path / "run") == 0
    capsys.readouterr()
    settings = tmp_path / "run" / "settings.json"
    settings.write_text(settings.read_text()[:50])  # a run killed while writing it
    assert _eval(model_dir, data, tmp_path / "run") == 2
    _one_line_error(capsys, "settings.json is not valid JSON", "--overwrite")
    scores = tmp_path / "run" / "scores.json"
    scores.write_text(scores.read_text()[:50])
    assert eval_main(["compare", str(tmp_path / "run"), str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "scores.json is not valid JSON")


def test_convert_errors_exit_2(model_dir, tmp_path, capsys):
    absent = tmp_path / "absent"
    assert cli_main(["convert", "qwen2-vl", "--input", str(absent), "--output", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, str(absent))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    argv = ["convert", "to-qwen2-vl", "--input", str(model_dir), "--output", str(tmp_path / "full")]
    assert cli_main(argv) == 2
    _one_line_error(capsys, "full exists and is not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_refused_pickle_is_a_conversion_error(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    (tmp_path / "src").mkdir()
    torch.save({"weight": Payload()}, tmp_path / "src" / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"cannot load .*pytorch_model.bin with torch.load\(weights_only=True\)"):
        SourceCheckpoint(tmp_path / "src", allow_pickle=True)


def test_demo_refuses_a_folder_of_another_demo_and_prints_a_run_without_losses(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_run.json").write_text(
        json.dumps({"steps": 2000, "max_minutes": 30.0, "train_per_cell": 120, "test_per_cell": 4, "seed": 0})
    )
    assert cli_main(["demo", "--out", str(out), "--seed", "1"]) == 2
    _one_line_error(capsys, "seed: 0 -> 1", "--overwrite")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert cli_main(["demo", "--out", str(tmp_path / "mine")]) == 2
    _one_line_error(capsys, "not a demo folder")
    assert demo_num(None, ".3f") == "    -" and demo_num(0.8612, ".3f") == "0.861"
