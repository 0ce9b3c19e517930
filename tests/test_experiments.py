"""The research scripts of `experiments/`: their measuring functions on inputs whose answers are known by hand."""

import torch
from conftest import chat
from test_modeling_granularity import LEVELS, noise


def test_probe_fallback_signal_auc_and_residuals_by_hand():
    import runpy
    from pathlib import Path
    from types import SimpleNamespace

    script = Path(__file__).resolve().parent.parent / "experiments" / "granularity" / "probe_fallback_signal.py"
    probe = runpy.run_path(str(script))
    assert probe["auc"]([3.0, 2.0], [1.0, 2.0]) == (1 + 1 + 1 + 0.5) / 4
    # a merged 1x2 grid (patches t=1, h=2, w=4) with tokens (3, 0) and (-1, 0): mean (1, 0), spread 2;
    # level 1 pools the pair to (1, 0), so each token is 2 from its pooled token: residual 1.0; level 2 (height,
    # one row) changes nothing more
    tokens = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])
    model = SimpleNamespace(
        config=SimpleNamespace(granularity=3, vision_config=SimpleNamespace(spatial_merge_size=2)),
        model=SimpleNamespace(get_image_features=lambda pixels, grid: SimpleNamespace(pooler_output=(tokens,))),
    )
    processor = SimpleNamespace(
        image_processor=lambda images, return_tensors: {
            "pixel_values": None,
            "image_grid_thw": torch.tensor([[1, 2, 4]]),
        }
    )
    residuals = probe["pooling_residuals"](model, processor, image=None)
    assert residuals == {f"residual level {lv}, {s}": 1.0 for lv in (1, 2) for s in ("mean", "max")}


def test_probe_fallback_head_features_equal_the_teacher_forced_coarse_pass(granular_tiny, tmp_path):
    """The probe's head inputs, read through a hook while the cascade decodes (KV cache), equal those of one forward
    pass over the prompt expanded for the coarsest level plus the answer."""
    import runpy
    from pathlib import Path

    model, processor = granular_tiny
    script = Path(__file__).resolve().parent.parent / "experiments" / "granularity" / "probe_fallback_head.py"
    probe = runpy.run_path(str(script))
    assert probe["auc"](torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0])) == 1.0
    images = [noise(60, 90, 0), noise(57, 57, 1)]
    records = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "question": "Hi?", "answers": ["x"]})
    features = probe["coarse_features"](model, processor, records, tmp_path, max_new_tokens=6)
    end = model.generation_config.eos_token_id
    for b, image in enumerate(images):
        small = processor(images=[image], text=chat(processor, 1), granularity=LEVELS - 1)
        answer = model.generate(**small, granularity=LEVELS - 1, max_new_tokens=6, do_sample=False)
        answer = answer[0, small["input_ids"].shape[1] :]
        ends = (answer == end).nonzero()
        answer = answer[: ends[0, 0] + 1] if len(ends) else answer  # up to the end token, if any
        ids = torch.cat([small["input_ids"], answer[None]], dim=1)
        with torch.no_grad():
            state = model.model(
                input_ids=ids, pixel_values=small["pixel_values"], image_grid_thw=small["image_grid_thw"],
                image_granularity=torch.tensor([LEVELS - 1]),
            ).last_hidden_state[0]  # fmt: skip
        steps = state[small["input_ids"].shape[1] - 1 : ids.shape[1] - 1]  # (answer, D): each chose the next token
        log_probs = model.lm_head(steps).log_softmax(-1).gather(-1, answer[:, None]).squeeze(-1)
        expected = torch.cat([steps[0], steps.mean(0), log_probs.min()[None], log_probs.mean()[None]])
        torch.testing.assert_close(features[b], expected, atol=1e-5, rtol=1e-5)
    score = probe["fit_head"](features, torch.tensor([1.0, 0.0]), hidden=0, steps=50)
    assert score(features)[0] > score(features)[1]  # two points, one logistic head: separated


def test_demo_variant_builds_the_changed_llm_and_appends_the_training_options(monkeypatch):
    import runpy
    from pathlib import Path

    import nativevl.demo as demo

    monkeypatch.setattr(demo, "build_tiny", demo.build_tiny)  # restored after the test
    seen = []
    monkeypatch.setattr(demo, "train_for", lambda argv, seconds: seen.append((argv, seconds)))
    script = Path(__file__).resolve().parent.parent / "experiments" / "reading" / "demo_variant.py"
    variant = runpy.run_path(str(script))
    variant["patch"]({"position_scheme": "1d", "num_hidden_layers": 3}, ["--merger_lr", "3e-4"])
    model, _ = demo.build_tiny(seed=0)
    assert model.config.position_scheme == "1d" and model.config.text_config.num_hidden_layers == 3
    demo.train_for(["recipe.yaml", "--max_steps", "5"], 60.0)
    assert seen == [(["recipe.yaml", "--max_steps", "5", "--merger_lr", "3e-4"], 60.0)]


def test_glyph_columns_finds_the_centres_the_benchmark_drew():
    """experiments/reading/glyph_columns.py: the glyph centres it computes lie on the benchmark's ink, move with the
    shift, and its shares follow from them (by hand: the demo's digits advance 12 px, so at shift 0 the three
    centres of a code sit in three 14 px columns, and a 6 px shift puts two of them into one)."""
    import runpy
    from pathlib import Path

    import numpy as np

    script = Path(__file__).resolve().parent.parent / "experiments" / "reading" / "glyph_columns.py"
    glyphs = runpy.run_path(str(script))
    bench = glyphs["BENCH"]
    keys = bench["item_keys"](4, 0, 20, ["short_number", "short_code", "word"])
    for key, w, h in keys:
        image, record = bench["shifted_item"](key, w, h, 0, 20, ["short_number", "short_code", "word"])
        gray = np.asarray(image.convert("L"), dtype=int)
        points = glyphs["centres"](key, w, h, 0, "xy")
        assert len(points) == len(record["answers"][0])
        for x, y in points:  # dark ink within 6 px of each centre, on its row
            assert gray[round(y), max(0, round(x) - 6) : round(x) + 7].min() < 100
        moved = glyphs["centres"](key, w, h, 6, "x")
        assert [(a + 6, b) for a, b in points] == moved
    at0, at6 = (glyphs["shares"](keys, d, 1.0, "x") for d in (0, 6))
    assert at0["two_in_a_column"] < at6["two_in_a_column"] and at6["two_token_rows"] == 0.0


def test_tower_positions_places_each_named_glyph_and_weights_the_border_ones():
    """experiments/reading/tower_positions.py: every glyph it places is the class `token_targets` puts in that token
    and read-out slot, it places every named glyph, and the border weights fall on glyphs within the margin of a
    token's x border (by hand: a weight of 3 where min(x mod 28, 28 - x mod 28) < 2)."""
    import runpy
    from pathlib import Path

    from nativevl.training import pretrain_vision as pv

    script = Path(__file__).resolve().parent.parent / "experiments" / "reading" / "tower_positions.py"
    positions = runpy.run_path(str(script))
    args = positions["recipe_args"](20)
    assert (args.min_text_size, args.max_text_size, args.glyph_cell_width) == (20, 20, 28)
    _, processor = pv.build_vision(pv.parse([str(pv.RECIPE), "--output_dir", "x", "--vision_depth", "1"]))
    keys = [f"t/{i}" for i in range(6)]
    _, grids, targets = pv.make_batch(keys, processor, args)
    weights = positions["border_weights"](keys, grids, args, 3.0, 2.0)
    placed, near, first = 0, 0, 0
    for key, grid in zip(keys, grids.tolist(), strict=True):
        for token, k, x, in_row, slot, cls in positions["glyph_slots"](key, grid, args):
            assert targets[first + token, k] == cls and slot < in_row <= args.glyph_slots
            border = min(x % 28, 28 - x % 28) < 2.0
            assert weights[first + token, k] == (3.0 if border else 1.0)
            placed, near = placed + 1, near + border
        first += grid[1] * grid[2] // 4
    assert placed == int((targets > 0).sum()) and 0 < near < placed and int((weights == 3.0).sum()) == near
