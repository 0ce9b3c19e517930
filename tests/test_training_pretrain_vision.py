"""Vision pre-training (`training/pretrain_vision.py`): the per-token glyph targets, reproducibility, the atomic
output that loads into a tiny model, and that training the ViT keeps its tokens input-dependent."""

import dataclasses
import json
import random

import pytest
import torch

from nativevl.testing import build_tiny
from nativevl.training import pretrain_vision as pv


TINY = {  # a few-second run of the recipe: a 32-wide 1-block tower, small images
    "max_steps": 4,
    "batch_size": 4,
    "warmup_steps": 2,
    "vision_depth": 1,
    "vision_embed_dim": 32,
    "max_area": 90 * 90,
    "eval_images": 8,
    "eval_every": 0,
    "log_every": 0,
}


def tiny_argv(tmp_path, **overrides) -> list[str]:
    """`RECIPE --output_dir tmp_path/stage0` with the TINY overrides (and `overrides`) as command-line flags."""
    argv = [str(pv.RECIPE), "--output_dir", str(tmp_path / "stage0")]
    for key, value in (TINY | overrides).items():
        argv += [f"--{key}", str(value)]
    return argv


def tiny_args(tmp_path, **overrides) -> pv.PretrainVisionArguments:
    return pv.parse(tiny_argv(tmp_path, **overrides))


def test_token_targets_follow_the_resampling_into_token_and_sub_cell():
    # a 100x50 image resampled to 112x56 (w x h): x * 1.12, y * 1.12; tokens 28 px, sub-cells 14 px
    glyphs = [("A", 10.0, 10.0), ("7", 30.0, 10.0), ("Z", 99.0, 45.0)]
    targets = pv.token_targets(glyphs, size=(100, 50), resized=(56, 112))
    assert targets.shape == (2 * 4, 4)  # 2 token rows x 4 token columns, 4 sub-cells each
    a, seven, z = (pv.ALPHABET.index(c) + 1 for c in "A7Z")
    # A at (11.2, 11.2): token (0, 0), sub-cell (0, 0); 7 at x 33.6: token (0, 1), sub-cell (0, 0);
    # Z at (110.9, 50.4): token (1, 3), sub-cell (1, 1)
    expected = torch.zeros(8, 4, dtype=torch.long)
    expected[0, 0], expected[1, 0], expected[7, 3] = a, seven, z
    torch.testing.assert_close(targets, expected, rtol=0, atol=0)
    clash = pv.token_targets([("A", 3.0, 3.0), ("B", 9.0, 9.0)], size=(28, 28), resized=(28, 28))
    assert clash[0, 0] == pv.IGNORE  # two centres in one sub-cell: left out of the loss


def test_two_glyph_slots_read_both_centres_of_a_sub_cell_left_to_right():
    # B left of A in one sub-cell, 7 alone in another, three centres in a third (more than the slots: ignored)
    glyphs = [("A", 10.0, 3.0), ("B", 2.0, 9.0), ("7", 20.0, 20.0), ("X", 30, 2), ("Y", 34, 4), ("Z", 40, 6)]
    targets = pv.token_targets(glyphs, size=(56, 28), resized=(28, 56), slots=2)
    assert targets.shape == (2, 4 * 2)  # 1 token row x 2 token columns, 4 sub-cells x 2 slots each
    a, b, seven = (pv.ALPHABET.index(c) + 1 for c in "AB7")
    expected = torch.zeros(2, 8, dtype=torch.long)
    expected[0, 0:2] = torch.tensor([b, a])  # sub-cell (0, 0): B (x 2) then A (x 10)
    expected[0, 6:8] = torch.tensor([seven, 0])  # sub-cell (1, 1): 7 alone, second slot empty
    expected[1, 0:2] = pv.IGNORE  # token 1, sub-cell (0, 0): X, Y, Z
    torch.testing.assert_close(targets, expected, rtol=0, atol=0)
    one = pv.token_targets(glyphs, size=(56, 28), resized=(28, 56))  # one slot: the former target, unchanged
    torch.testing.assert_close(one, torch.tensor([[pv.IGNORE, 0, 0, seven], [pv.IGNORE, 0, 0, 0]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="slots"):
        pv.token_targets(glyphs, size=(56, 28), resized=(28, 56), slots=0)


def test_token_wide_cells_name_the_glyphs_of_each_patch_row_of_a_token_left_to_right():
    # the same glyphs as above, in cells 28 px wide: a token's two patch rows, 3 slots each
    glyphs = [("A", 10.0, 3.0), ("B", 2.0, 9.0), ("7", 20.0, 20.0), ("X", 30, 2), ("Y", 34, 4), ("Z", 40, 6)]
    targets = pv.token_targets(glyphs, size=(56, 28), resized=(28, 56), slots=3, cell_width=28)
    assert targets.shape == (2, 2 * 3)  # 1 token row x 2 token columns, 2 cells (rows) x 3 slots each
    a, b, seven, x, y, z = (pv.ALPHABET.index(c) + 1 for c in "AB7XYZ")
    expected = torch.tensor([[b, a, 0, seven, 0, 0], [x, y, z, 0, 0, 0]])
    torch.testing.assert_close(targets, expected, rtol=0, atol=0)
    two = pv.token_targets(glyphs, size=(56, 28), resized=(28, 56), slots=2, cell_width=28)
    torch.testing.assert_close(two, torch.tensor([[b, a, seven, 0], [pv.IGNORE] * 2 + [0, 0]]), rtol=0, atol=0)
    assert pv.cells_per_token(14, 28) == 2 and pv.cells_per_token(14, 14) == pv.cells_per_token() == 4
    with pytest.raises(ValueError, match="21"):
        pv.token_targets(glyphs, size=(56, 28), resized=(28, 56), cell_width=21)


def test_token_wide_cells_pretrain_with_their_head(tmp_path):
    args = tiny_args(tmp_path, glyph_slots=3, glyph_cell_width=28)
    visual, processor = pv.build_vision(args)
    pixels, grids, targets = pv.make_batch([f"t/{i}" for i in range(8)], processor, args)
    assert targets.shape == (int(grids.prod(-1).sum()) // 4, 2 * 3)
    assert (targets[:, 1::3] > 0).any()  # tokens naming two glyphs in one patch row
    state, log = pv.pretrain(args)
    assert len(log["losses"]) == args.max_steps and 0 <= log["evaluations"][-1]["glyph_recall"] <= 1


def test_balanced_slots_weigh_each_slot_index_alike(tmp_path):
    # 1 token, 2 cells x 2 slots: glyphs in slots (cell 0, slot 0), (cell 1, slot 0), (cell 1, slot 1); one empty slot
    head = torch.nn.Linear(3, 2 * 2 * pv.NUM_CLASSES)
    tokens, targets = torch.randn(1, 3), torch.tensor([[5, 0, 7, 9]])
    logits = head(tokens).view(4, pv.NUM_CLASSES)
    each = torch.nn.functional.cross_entropy(logits, targets[0], reduction="none")  # (4,) per slot
    plain, _ = pv.head_loss(tokens, head, targets)
    torch.testing.assert_close(plain, ((each[0] + each[2] + each[3]) / 3 + each[1]) / 2)
    balanced, _ = pv.head_loss(tokens, head, targets, balance_slots=2)
    torch.testing.assert_close(balanced, (((each[0] + each[2]) / 2 + each[3]) / 2 + each[1]) / 2)
    args = tiny_args(tmp_path, balance_slots=True)
    assert len(pv.pretrain(args)[1]["losses"]) == args.max_steps


def test_one_and_two_slot_pretraining_run_with_their_heads(tmp_path):
    # 14 px cells (a token's four patches), the tower before the recipe's 28 px ones
    args = tiny_args(tmp_path, glyph_slots=1, glyph_cell_width=14)
    _, _, targets = pv.make_batch([f"t/{i}" for i in range(4)], pv.build_vision(args)[1], args)
    assert targets.shape[1] == 4
    assert len(pv.pretrain(args)[1]["losses"]) == args.max_steps
    args = tiny_args(tmp_path, glyph_slots=2, glyph_cell_width=14)
    visual, processor = pv.build_vision(args)
    pixels, grids, targets = pv.make_batch([f"t/{i}" for i in range(16)], processor, args)
    assert targets.shape == (int(grids.prod(-1).sum()) // 4, 8)
    first, second = targets[:, 0::2], targets[:, 1::2]  # (tokens, 4) each
    assert (second > 0).any() and ((second > 0) <= (first > 0)).all()  # a second glyph only beside a first one
    state, log = pv.pretrain(args)
    assert len(log["losses"]) == args.max_steps and 0 <= log["evaluations"][-1]["glyph_recall"] <= 1


def test_glyph_images_are_deterministic_with_centres_on_ink():
    image, glyphs = pv.glyph_image(random.Random("k"), 30, 120 * 120, (14, 28))
    again, glyphs_again = pv.glyph_image(random.Random("k"), 30, 120 * 120, (14, 28))
    assert image.tobytes() == again.tobytes() and glyphs == glyphs_again
    drawn = [pv.glyph_image(random.Random(f"k{i}"), 30, 120 * 120, (14, 28)) for i in range(20)]
    assert sum(len(g) for _, g in drawn) > 20
    assert any(image.width % 28 or image.height % 28 for image, _ in drawn)  # sizes are not snapped
    for image, glyphs in drawn:
        gray = image.convert("L")
        for char, x, y in glyphs:
            assert char in pv.ALPHABET and 0 <= x < image.width and 0 <= y < image.height
            row = [gray.getpixel((min(image.width - 1, max(0, round(x) + dx)), round(y))) for dx in range(-6, 7)]
            assert min(row) < 150  # dark ink (text 0-70) beside every centre (O, D: a stroke); backgrounds >= 175


def test_make_batch_targets_match_the_processor_tokens(tmp_path):
    args = tiny_args(tmp_path)
    visual, processor = pv.build_vision(args)
    pixels, grids, targets = pv.make_batch([f"t/{i}" for i in range(6)], processor, args)
    assert (args.glyph_cell_width, args.glyph_slots) == (28, 4)  # the recipe's: 4 glyph centres per token row
    assert targets.shape == (int(grids.prod(-1).sum()) // 4, 2 * args.glyph_slots)
    assert visual(pixels, grids).pooler_output.shape == (targets.shape[0], args.hidden_size)
    assert (targets > 0).any()


def test_pretraining_is_reproducible_and_writes_a_folder_that_loads(tmp_path):
    args = tiny_args(tmp_path)
    state, log = pv.pretrain(args)
    state_again, log_again = pv.pretrain(args)
    # one thread, fixed seeds: the same losses and weights, exactly (tolerance 0)
    assert log["losses"] == log_again["losses"] and len(log["losses"]) == args.max_steps
    for key, value in state.items():
        torch.testing.assert_close(state_again[key], value, rtol=0, atol=0)
    untrained, _ = pv.build_vision(args)
    assert any(not torch.equal(untrained.state_dict()[k], v) for k, v in state.items())  # it trained

    assert pv.main(tiny_argv(tmp_path)) == 0
    folder = tmp_path / "stage0"
    assert sorted(p.name for p in folder.iterdir()) == sorted([pv.WEIGHTS_FILE, pv.CONFIG_FILE, pv.LOG_FILE])
    assert json.loads((folder / pv.LOG_FILE).read_text())["losses"] == log["losses"]
    with pytest.raises(FileExistsError, match="stage0"):
        pv.main(tiny_argv(tmp_path))

    model, _ = build_tiny(seed=3, vision=args.vision_config())
    pv.load_vision_weights(model, folder)
    for key, value in state.items():
        torch.testing.assert_close(model.model.visual.state_dict()[key], value, rtol=0, atol=0)
    other, _ = build_tiny(seed=3)  # the default tower: 2 blocks, 64 wide
    with pytest.raises(ValueError, match="embed_dim"):
        pv.load_vision_weights(other, folder)


def test_training_the_vit_keeps_its_tokens_input_dependent(tmp_path):
    """The collapse: trained through a head, a random tower first makes its tokens constant (the head's noise
    falls; under the LLM's loss the share fell from 0.9% to 0.1% in 20 steps, tests/test_training_vision_init.py). The
    recipe's head reads tokens standardised over the batch, so shrinking their variation gains nothing: after 20
    steps of the recipe (ViT, merger and head at its lr) the held-out share must stay above 3% (12.3% -> 7.5%; seed
    1: 9.0% -> 5.1%). Without the standardisation the same 20 steps take it to 0.8% (seed 1: 0.3%) and the head
    calls every cell empty, and this test catches that. (The full recipe's run keeps 65-72% from step 4000 on.)"""
    flags = ["--output_dir", str(tmp_path / "s"), "--max_steps", "20", "--warmup_steps", "10", "--eval_images", "32"]
    args = pv.parse([str(pv.RECIPE), *flags, "--log_every", "0"])
    assert args.standardize_tokens and args.vision_tower_lr is None  # the ViT trains at the full lr
    _, log = pv.pretrain(args)
    first, last = log["evaluations"][0], log["evaluations"][-1]
    assert last["share"] > 0.03, (first["share"], last["share"])
    assert last["false_alarms"] < first["false_alarms"]  # the head learnt something: empty cells read as empty
    args.standardize_tokens = False
    _, log = pv.pretrain(args)
    assert log["evaluations"][-1]["share"] < 0.03, log["evaluations"]


def test_demo_starts_from_a_pretrained_tower_with_text_anywhere(tmp_path):
    from safetensors.torch import load_file

    from nativevl.cli import main as cli
    from nativevl.evaluation.data import load_records

    assert pv.main(tiny_argv(tmp_path, max_steps=2, eval_images=4)) == 0
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--out", str(out), "--train-per-cell", "1", "--test-per-cell", "1"]
    assert cli([*argv, "--vision-init", str(tmp_path / "stage0")]) == 0
    tower = load_file(tmp_path / "stage0" / pv.WEIGHTS_FILE)
    init = load_file(out / "init" / "model.safetensors")
    for key, value in tower.items():
        assert init[f"model.visual.{key}"].equal(value), key
    records = load_records(out / "data" / "test" / "data.jsonl")
    assert any(r["width"] % 28 or r["height"] % 28 for r in records)  # sizes not snapped: resampled
    boxes = [r["text_box"] for r in records if r["kind"] == "rc"]
    assert len({(x0 - 2) % 28 for x0, *_ in boxes}) > 3  # text not on the 28 px grid
    assert json.loads((out / "demo_run.json").read_text())["vision_init"] == str((tmp_path / "stage0").resolve())


def test_saved_tower_emits_the_standardised_tokens_its_head_read(tmp_path):
    """With standardize_tokens the head read tokens standardised per channel; the saved tower has that folded into
    the merger's last linear, so its held-out tokens come out centred at unit variance per channel (what an LLM
    then receives), and the folding changes nothing the head can read (per-channel affine)."""
    args = tiny_args(tmp_path)
    state, log = pv.pretrain(args)
    assert log["folded_standardization"]["tokens"] > 0
    visual, processor = pv.build_vision(args)
    visual.load_state_dict(state)
    visual.eval()
    keys = [f"pretrain-vision/eval/{args.seed}/{i}" for i in range(args.eval_images)]
    with torch.no_grad():
        tokens = visual(*pv.make_batch(keys, processor, args)[:2]).pooler_output
    torch.testing.assert_close(tokens.mean(0), torch.zeros(args.hidden_size), rtol=0, atol=1e-4)
    torch.testing.assert_close(tokens.std(0), torch.ones(args.hidden_size), rtol=0, atol=1e-3)
    args.fold_standardization = False
    unfolded, log_unfolded = pv.pretrain(args)
    assert "folded_standardization" not in log_unfolded and log_unfolded["losses"] == log["losses"]
    assert not torch.allclose(unfolded["merger.mlp.2.weight"], state["merger.mlp.2.weight"])


def test_shipped_tower_is_what_its_recipe_trains():
    """The tower shipped with nativevl (`demo.PRETRAINED_VISION`, the demo's starting point) came from
    `python -m nativevl.training.pretrain_vision training/recipes/tiny_stage0.yaml`: its log holds the recipe's
    arguments, and the recipe's first `fingerprint_step` steps rerun here give the same losses and the same tensor
    norms as the shipped run recorded (relative tolerance 1e-4: the same code on another CPU may round differently
    in the last bits; on the machine that trained it they are equal). The folder loads into the demo's model, and its
    held-out tokens come out standardised (folded)."""
    from nativevl.demo import PRETRAINED_VISION

    shipped = json.loads((PRETRAINED_VISION / pv.LOG_FILE).read_text())
    args = pv.parse([str(pv.RECIPE), "--output_dir", shipped["arguments"]["output_dir"]])
    # an argument added after the shipped run must default to what that run did
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING}
    assert {k: v for k, v in defaults.items() if k not in shipped["arguments"]} | shipped["arguments"] == (
        dataclasses.asdict(args)
    )
    assert json.loads((PRETRAINED_VISION / pv.CONFIG_FILE).read_text()) == args.vision_config()
    assert shipped["fingerprint"]["step"] == args.fingerprint_step and "folded_standardization" in shipped
    state, log = pv.pretrain(args, stop_after=args.fingerprint_step)
    torch.testing.assert_close(
        torch.tensor(log["losses"]), torch.tensor(shipped["losses"][: args.fingerprint_step]), rtol=1e-4, atol=0
    )
    norms = log["fingerprint"]["norms"]
    assert norms.keys() == shipped["fingerprint"]["norms"].keys() == state.keys()
    for key, norm in shipped["fingerprint"]["norms"].items():
        assert norms[key] == pytest.approx(norm, rel=1e-4), key
    model, _ = build_tiny(seed=0, vision=args.vision_config())
    pv.load_vision_weights(model, PRETRAINED_VISION)
    assert shipped["evaluations"][-1]["step"] == args.max_steps
