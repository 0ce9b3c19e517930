"""Training through TRL's SFTTrainer with nativevl's packing, LoRA, per-part learning rates and resumption."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import recipe_trainer, write_colour_dataset
from safetensors.torch import load_file

import nativevl
from nativevl.conversion.export import save_folder
from nativevl.testing import build_tiny
from nativevl.training.train import main


RECIPES = Path(nativevl.__file__).parent / "training" / "recipes"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_folder(*build_tiny(max_pixels=112 * 112), root / "tiny")
    data = write_colour_dataset(root / "data", 48)
    return root, str(root / "tiny"), data


def trainer_for(setup, recipe: str, out: str, *overrides: str):
    return recipe_trainer(*setup, recipe, out, *overrides)


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_packed_sft_run_reduces_the_loss(setup):
    trainer, _ = trainer_for(setup, "tiny_stage2.yaml", "sft", "--max_steps", "24", "--save_strategy", "no")
    trainer.train()
    history = losses(trainer)
    assert len(history) == 24
    assert sum(history[-4:]) / 4 < 0.8 * sum(history[:4]) / 4, history
    tokens = trainer.state.log_history[-2]["num_tokens"]
    assert tokens > 24 * 4 * 20  # real token counts, not rows (4 samples of > 20 tokens per step)


def test_stage1_trains_only_the_projector_and_part_lrs_apply(setup):
    trainer, _ = trainer_for(setup, "tiny_stage1.yaml", "stage1", "--max_steps", "3", "--save_strategy", "no")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (".visual.merger." in f".{name}"), name  # the merger is this model's projector
    trainer3, _ = trainer_for(setup, "tiny_stage3.yaml", "stage3", "--max_steps", "1", "--save_strategy", "no")
    optimizer = trainer3.create_optimizer()
    lrs = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            lrs[id(param)] = group["lr"]
    named = dict(trainer3.model.named_parameters())
    assert lrs[id(named["model.visual.blocks.0.attn.qkv.weight"])] == pytest.approx(2e-6)
    assert lrs[id(named["model.visual.merger.mlp.0.weight"])] == pytest.approx(2e-6)
    assert lrs[id(named["model.language_model.layers.0.mlp.up_proj.weight"])] == pytest.approx(1e-3)


def test_lora_trains_only_adapters_and_merges_to_same_logits(setup):
    trainer, _ = trainer_for(setup, "tiny_lora.yaml", "lora", "--max_steps", "4", "--save_strategy", "no")
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and ".language_model." in n for n in trained)
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(base[name], param.detach()), name
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        merged = model.merge_and_unload()
        assert type(merged) is nativevl.NativeVLForConditionalGeneration
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=0)


def test_resume_continues_with_the_same_losses(setup):
    root = setup[0]
    steps = ["--max_steps", "6", "--save_steps", "3", "--logging_steps", "1"]
    full, _ = trainer_for(setup, "tiny_stage2.yaml", "full", *steps)
    full.train()
    resumed, _ = trainer_for(setup, "tiny_stage2.yaml", "resumed", *steps)
    resumed.train(resume_from_checkpoint=str(root / "full" / "checkpoint-3"))
    history = [e for e in resumed.state.log_history if "loss" in e]
    assert [e["step"] for e in history] == [1, 2, 3, 4, 5, 6]  # 1-3 restored from the checkpoint, 4-6 trained
    assert losses(resumed)[3:] == pytest.approx(losses(full)[3:], abs=1e-5)
    checkpoint = root / "full" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "processor_config.json").exists()


def test_cli_writes_a_final_remote_code_folder(setup, capsys):
    root, model, data = setup
    out = root / "cli"
    argv = [str(RECIPES / "tiny_lora.yaml"), "--model_name_or_path", model, "--dataset_path", data]
    assert main(argv + ["--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no"]) == 0
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_nativevl.NativeVLForConditionalGeneration"
    weights = load_file(final / "model.safetensors")
    assert not [k for k in weights if "lora" in k]  # merged into a plain nativevl folder
    assert "packing fill rate: 100.0%" in capsys.readouterr().out


@pytest.mark.slow
def test_two_process_ddp_run(setup, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): ranks see different samples, end with identical weights."""
    root, model, data = setup
    out = tmp_path / "ddp"
    worker = Path(__file__).parent / "ddp_worker.py"
    # accelerate's torchrun launcher (--multi_gpu) with use_cpu: gloo process group over CPU processes
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker)]
    command += [str(RECIPES / "tiny_stage2.yaml"), "--model_name_or_path", model, "--dataset_path", data]
    command += ["--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no", "--seed", "0"]
    command += ["--use_cpu", "true", "--dataloader_num_workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [json.loads((out / f"seen_rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    states = [load_file(out / f"state_rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert (out / "final" / "model.safetensors").exists()


def test_checkpoints_are_complete_or_absent(setup, monkeypatch):
    from transformers.trainer_utils import get_last_checkpoint

    root = setup[0]
    trainer, _ = trainer_for(setup, "tiny_stage2.yaml", "atomic", "--max_steps", "4", "--save_steps", "2")
    original, calls = type(trainer)._save_rng_state, []

    def fails_second_time(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, output_dir)

    monkeypatch.setattr(type(trainer), "_save_rng_state", fails_second_time)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = root / "atomic"
    saved = sorted(p.name for p in out.iterdir() if p.name not in ("README.md", "nativevl_run.json"))  # + TRL's card
    assert saved == ["checkpoint-2"]  # step 4 died mid-save: no trace of it, no staging folder
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    monkeypatch.undo()
    rotated, _ = trainer_for(setup, "tiny_stage2.yaml", "rotated", "--max_steps", "6", "--save_steps", "2")
    rotated.args.save_total_limit = 1
    (root / "rotated" / ".staging-99" / "checkpoint-99").mkdir(parents=True)  # left by a killed run
    rotated.train()
    kept = sorted(p.name for p in (root / "rotated").iterdir() if p.name not in ("README.md", "nativevl_run.json"))
    assert kept == ["checkpoint-6"]
