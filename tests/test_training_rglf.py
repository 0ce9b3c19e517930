"""AVG-LLaVA training: stage 1 (multi-granularity SFT) and stage 2 (RGLF, router only) through `nativevl train`."""

import pytest
import torch
from conftest import recipe_trainer, write_colour_dataset
from PIL import Image

from nativevl.conversion.export import save_folder
from nativevl.testing import build_tiny
from nativevl.training.packing import PackingCollator
from nativevl.training.rglf import (
    RGLFCollator,
    per_sample_answer_errors,
    per_sample_answer_loss,
    rglf_loss,
    token_fractions,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rglf")
    save_folder(*build_tiny(max_pixels=112 * 112), root / "tiny")
    data = write_colour_dataset(root / "data", 16)
    return root, str(root / "tiny"), data


def trainer_for(setup, recipe: str, out: str, *overrides: str):
    torch.manual_seed(0)  # the fresh router is drawn while loading, before the Trainer seeds: same draw in any order
    return recipe_trainer(*setup, recipe, out, *overrides)[0]


def routed(trainer, samples: int = 8):
    """The trained router's levels and logits on the first `samples` training samples (at level 0, as inferred)."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(samples)])["levels"][0]
    with torch.no_grad():
        levels, logits, _ = trainer.model.eval().model.choose_granularity(
            batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
            instruction_mask=batch["labels"] == -100, cu_seq_lens_q=batch["cu_seq_lens_q"],
        )  # fmt: skip
    return levels, logits


def test_rglf_loss_by_hand():
    losses = torch.tensor([[1.0, 0.2, 0.6]])  # level 1 best, then 2, then 0
    aligned = torch.tensor([[0.0, 4.0, 2.0]])
    reversed_ = torch.tensor([[4.0, 0.0, 2.0]])
    assert rglf_loss(aligned, losses) < rglf_loss(reversed_, losses)
    # equal probabilities: every ordered pair (i better than j) costs margin * gap; mean of 0.8, 0.4, 0.4
    flat = torch.zeros(1, 3)
    expected = (0.8 + 0.4 + 0.4) / 3 + 0.1 * torch.log(torch.tensor(3.0))
    torch.testing.assert_close(rglf_loss(flat, losses), expected)
    torch.testing.assert_close(rglf_loss(flat, losses, margin=0.0, ce_weight=0.0), torch.tensor(0.0))


def test_per_sample_answer_loss_equals_each_sample_alone():
    model, processor = build_tiny(max_pixels=112 * 112, granularity=3)
    examples = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                {"role": "assistant", "content": [{"type": "text", "text": a}]},
            ],
            "images": [Image.new("RGB", (40 + 9 * i, 60), (200, 30 * i, 20))],
        }
        for i, (q, a) in enumerate([("Colour?", "red"), ("Which?", "orange, I think"), ("Hue?", "brown")])
    ]
    collator = PackingCollator(processor, granularity=2)
    batch = collator(examples)
    with torch.no_grad():
        packed = per_sample_answer_loss(model(**batch).logits, batch["labels"], batch["cu_seq_lens_q"])
        alone = torch.stack([model(**collator([ex])).loss for ex in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    levels = RGLFCollator(processor, 3)(examples)["levels"]
    assert [b["image_granularity"].tolist() for b in levels] == [[0] * 3, [1] * 3, [2] * 3]


def test_per_sample_answer_errors_by_hand():
    # one row, two segments [0, 3) and [3, 6); answer tokens (labels != -100) at positions 2 and 4, 5
    labels = torch.tensor([[-100, -100, 3, -100, 1, 2]])
    logits = torch.zeros(1, 6, 5)
    for position, token in ((1, 3), (3, 1), (4, 4)):  # prediction p is of token p + 1; (4, 4) misses label 2
        logits[0, position, token] = 1.0
    cu = torch.tensor([0, 3, 6])
    torch.testing.assert_close(per_sample_answer_errors(logits, labels, cu), torch.tensor([0.0, 1.0]))
    logits[0, 4, 2] = 2.0  # now the greedy token at 4 is the label: no miss left
    torch.testing.assert_close(per_sample_answer_errors(logits, labels, cu), torch.tensor([0.0, 0.0]))


def test_exact_match_feedback_ranks_right_answers_before_confidence(setup):
    trainer = trainer_for(
        setup, "tiny_rglf.yaml", "rglf-exact", "--max_steps", "40", "--save_strategy", "no",
        "--rglf_feedback", "exact_match", "--rglf_token_cost", "0.05",
    )  # fmt: skip

    def level_errors(model, batches):  # levels 0 and 1 answer right, level 2 wrong
        return torch.tensor([0.0, 0.0, 1.0]).expand(int(batches[0]["cu_seq_lens_q"].shape[0]) - 1, -1)

    def level_losses(model, batches):  # ... while level 0 is the most confident by far
        raise AssertionError("exact_match feedback must not rank by the answer loss")

    trainer.level_errors, trainer.level_losses = level_errors, level_losses
    trainer.train()
    levels, _ = routed(trainer)
    assert (levels == 1).all(), levels  # the cheapest level that answers right
    with pytest.raises(ValueError, match="rglf_feedback must be one of loss, exact_match, got 'accuracy'"):
        trainer_for(setup, "tiny_rglf.yaml", "rglf-bad-feedback", "--rglf_feedback", "accuracy")


def test_rglf_learns_the_feedback_ranking(setup):
    trainer = trainer_for(setup, "tiny_rglf.yaml", "rglf-synthetic", "--max_steps", "40", "--save_strategy", "no")
    feedback = torch.tensor([1.0, 0.2, 0.6])  # synthetic: level 1 always best, then level 2, then level 0

    def level_losses(model, batches):
        return feedback.expand(int(batches[0]["cu_seq_lens_q"].shape[0]) - 1, -1)

    trainer.level_losses = level_losses
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    history = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[:5]) / 5, history
    for name, param in trainer.model.named_parameters():
        assert torch.equal(before[name], param.detach()) != (".granularity_router." in name), name
    _, logits = routed(trainer)
    order = logits.argsort(-1, descending=True)
    assert (order == torch.tensor([1, 2, 0])).all(), order  # the router ranks levels as the feedback did


def test_token_fractions_by_hand():
    config = build_tiny(granularity=3)[0].config
    grids = torch.tensor([[1, 6, 10], [1, 2, 2]])  # merged 3x5: 15, 9 (3x3), 6 (2x3) tokens; merged 1x1: 1, 1, 1
    expected = torch.tensor([[1.0, 9 / 15, 6 / 15], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(token_fractions(grids, config), expected)
    # crop mode: the two grids as one image's global view and tile count together
    one_image = torch.tensor([[1.0, 10 / 16, 7 / 16]])
    torch.testing.assert_close(token_fractions(grids, config, torch.tensor([2])), one_image)


def test_token_cost_turns_equal_feedback_into_a_preference_for_fewer_tokens(setup):
    trainer = trainer_for(
        setup, "tiny_rglf.yaml", "rglf-cost", "--max_steps", "40", "--save_strategy", "no",
        "--rglf_token_cost", "0.05",
    )  # fmt: skip
    assert trainer.token_cost == 0.05

    def level_losses(model, batches):  # every level answers equally well
        return torch.full((int(batches[0]["cu_seq_lens_q"].shape[0]) - 1, 3), 0.5)

    trainer.level_losses = level_losses
    trainer.train()
    levels, _ = routed(trainer)
    assert (levels == 2).all(), levels  # the cheapest of the equally good levels
    with pytest.raises(ValueError, match="rglf_token_cost must be >= 0, got -1.0"):
        trainer_for(setup, "tiny_rglf.yaml", "rglf-bad", "--rglf_token_cost", "-1")


def test_stage1_and_rglf_through_nativevl_train(setup):
    root, _, _ = setup
    stage1 = trainer_for(
        setup,
        "tiny_stage2.yaml",
        "avg-stage1",
        "--max_steps", "2", "--save_strategy", "no", "--granularity", "3", "--granularity_training", "all",
    )  # fmt: skip
    router_before = {n: p.detach().clone() for n, p in stage1.model.named_parameters() if "granularity_router" in n}
    stage1.train()
    assert all(torch.equal(p, dict(stage1.model.named_parameters())[n]) for n, p in router_before.items())
    losses = [entry["loss"] for entry in stage1.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    stage1.save_model(str(root / "avg-stage1" / "final"))
    stage1.processing_class.save_pretrained(str(root / "avg-stage1" / "final"))
    rglf = trainer_for(
        (root, str(root / "avg-stage1" / "final"), setup[2]),
        "tiny_rglf.yaml",
        "avg-rglf",
        "--max_steps", "2", "--save_strategy", "no",
    )  # fmt: skip
    assert rglf.model.config.granularity == 3
    rglf.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in rglf.state.log_history if "loss" in e)
    with pytest.raises(ValueError, match="needs granularity levels"):
        trainer_for(setup, "tiny_stage2.yaml", "bad", "--granularity_training", "random")
