"""Training through TRL's SFTTrainer with nativevl's packing, LoRA, per-part learning rates and resumption."""

import importlib.util
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


def sft_recipes() -> list[str]:
    """The recipes of `nativevl train` (every recipe but the vision pre-training stage's, which its own command
    reads: `test_training_pretrain_vision.py`)."""
    from nativevl.training.pretrain_vision import RECIPE as STAGE0

    return sorted(p.name for p in RECIPES.glob("*.yaml") if p.name != STAGE0.name)


def test_every_recipe_parses_with_its_command():
    from nativevl.training.pretrain_vision import RECIPE as STAGE0
    from nativevl.training.pretrain_vision import parse as parse_stage0

    assert STAGE0.parent == RECIPES and len(sft_recipes()) == len(list(RECIPES.glob("*.yaml"))) - 1
    assert parse_stage0([str(STAGE0), "--output_dir", "unused"]).max_steps > 0


@pytest.mark.parametrize("recipe", sft_recipes())
def test_every_recipe_names_its_activation_checkpointing(recipe, recwarn):
    """TRL's SFTConfig defaults the deprecated `gradient_checkpointing` to True; a recipe that leaves
    `activation_checkpointing` unset gets it on, with transformers' FutureWarning, instead of choosing."""
    from nativevl.training.train import parse

    argv = [str(RECIPES / recipe), "--model_name_or_path", "unused", "--output_dir", "unused"]
    training_args, _ = parse([*argv, "--bf16", "false"])  # the GPU recipes' bf16 is refused on a CPU machine
    assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)]
    expected = "tiny" not in recipe  # the tiny CPU recipes keep every activation; the real ones recompute
    assert training_args.activation_checkpointing is expected


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


WORKER = Path(__file__).parent / "ddp_worker.py"
# 4 steps of global batch 4 (fp32): one process x 4 samples, or two processes x 2 samples, same samples per step
RUN = ["--max_steps", "4", "--save_steps", "2", "--seed", "0", "--use_cpu", "true", "--dataloader_num_workers", "0"]


def run_worker(setup, out: Path, launch: list[str], *extra: str, env: dict | None = None):
    """`ddp_worker.py` on tiny_stage2 under `launch` (empty: one plain process); returns the finished process."""
    root, model, data = setup
    command = [sys.executable, *launch, str(WORKER), str(RECIPES / "tiny_stage2.yaml"), "--model_name_or_path", model]
    command += ["--dataset_path", data, "--output_dir", str(out), *RUN, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def launch(*config: str) -> list[str]:
    """accelerate's launcher for 2 CPU processes (gloo), fp32."""
    return ["-m", "accelerate.commands.launch", *config, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def assert_same_run(out: Path, reference: Path, steps=(1, 2, 3, 4)) -> None:
    """Same losses (1e-5) at `steps` and the same final remote-code folder (weights within 1e-5) as `reference`."""
    losses = json.loads((out / "losses.json").read_text())
    expected = json.loads((reference / "losses.json").read_text())
    for step in steps:
        assert losses[str(step)] == pytest.approx(expected[str(step)], abs=1e-5), (step, losses, expected)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_nativevl.NativeVLForConditionalGeneration"
    assert config == json.loads((reference / "final" / "config.json").read_text())
    final, single = (
        load_file(out / "final" / "model.safetensors"),
        load_file(reference / "final" / "model.safetensors"),
    )
    assert sorted(final) == sorted(single)
    for key in single:
        torch.testing.assert_close(final[key], single[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """The reference: one process, 4 samples per step."""
    out = tmp_path_factory.mktemp("one") / "run"
    result = run_worker(setup, out, [], "--per_device_train_batch_size", "4")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_two_process_ddp_matches_one_process(setup, one_process, tmp_path):
    """`accelerate launch --multi_gpu` with 2 CPU processes (gloo, DDP): ranks see different samples and end with
    identical weights; losses and the final folder equal one process at the same global batch."""
    out = tmp_path / "ddp"
    result = run_worker(setup, out, launch("--multi_gpu"), "--per_device_train_batch_size", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [json.loads((out / f"seen_rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(json.loads((one_process / "seen_rank0.json").read_text()))
    states = [load_file(out / f"state_rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert_same_run(out, one_process)


def test_two_process_fsdp_matches_one_process_and_resumes(setup, one_process, tmp_path):
    """`accelerate launch --config_file training/accelerate/fsdp.yaml` (FSDP2, full sharding, sharded checkpoints)
    over 2 CPU processes: the same losses and final folder as one process; a run resumed from its sharded
    checkpoint-2 continues with the same losses and ends with the same folder."""
    fsdp = launch("--config_file", str(RECIPES.parent / "accelerate" / "fsdp.yaml"))
    env = {"NATIVEVL_FSDP_ON_CPU": "1"}  # see ddp_worker.py: accelerate would turn FSDP on CPU into DDP
    out = tmp_path / "fsdp"
    result = run_worker(setup, out, fsdp, "--per_device_train_batch_size", "2", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "find_unused_parameters" not in result.stderr  # a DDP reducer would have warned: FSDP really ran
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert not (checkpoint / "model.safetensors").exists()  # sharded, not gathered
    assert_same_run(out, one_process)
    resumed = tmp_path / "resumed"
    extra = ["--per_device_train_batch_size", "2", "--resume_from_checkpoint", str(checkpoint)]
    result = run_worker(setup, resumed, fsdp, *extra, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_run(resumed, one_process, steps=(3, 4))


def test_fsdp_launch_that_would_run_ddp_is_refused(setup, tmp_path):
    """On CPU processes accelerate turns an FSDP launch into DDP; `nativevl train` says so instead of training."""
    fsdp = launch("--config_file", str(RECIPES.parent / "accelerate" / "fsdp.yaml"))
    result = run_worker(setup, tmp_path / "refused", fsdp, "--per_device_train_batch_size", "2", "--max_steps", "1")
    assert result.returncode != 0
    assert "accelerate was launched with FSDP (ACCELERATE_USE_FSDP=true) but runs MULTI_CPU" in result.stderr


# DeepSpeed on 2 CPU processes: its `cpu` accelerator (DS_ACCELERATOR=cpu makes the choice explicit) over gloo, which
# `--ddp_backend gloo` asks accelerate for (without an accelerator it would pick none). DeepSpeed JIT-builds its
# shared-memory comm op with g++ on first use (~/.cache/torch_extensions), once per machine.
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
# accelerate runs DeepSpeed only with use_cpu false (RUN's true would make it DDP); DeepSpeed keeps tensors on CPU
ON_CPU = ["--per_device_train_batch_size", "2", "--use_cpu", "false", "--ddp_backend", "gloo"]
DS_ENV = {"DS_ACCELERATOR": "cpu"}


def zero(stage: int) -> list[str]:
    """accelerate's launcher for 2 CPU processes with `training/accelerate/deepspeed_zero{stage}.yaml`, fp32."""
    return launch("--config_file", str(RECIPES.parent / "accelerate" / f"deepspeed_zero{stage}.yaml"))


def seen(out: Path) -> list[list[int]]:
    return [json.loads((out / f"seen_rank{r}.json").read_text()) for r in range(2)]


def assert_split_like_ddp(out: Path, one_process: Path) -> None:
    """The ranks packed disjoint samples, together those of one process."""
    ranks = seen(out)
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(json.loads((one_process / "seen_rank0.json").read_text()))


@needs_deepspeed
def test_two_process_zero2_matches_one_process(setup, one_process, tmp_path):
    """`accelerate launch --config_file training/accelerate/deepspeed_zero2.yaml` over 2 CPU processes: ZeRO-2
    shards the optimizer states (one file per rank in the checkpoint) and keeps whole parameters, equal on both ranks;
    losses and the final folder equal one process at the same global batch. The padding-free collator packs 2
    samples per row on each rank and 4 in one process: equal losses mean no sample sees another inside a row."""
    out = tmp_path / "zero2"
    result = run_worker(setup, out, zero(2), *ON_CPU, env=DS_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    shards = sorted(p.name for p in (out / "checkpoint-2" / "global_step2").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    states = [load_file(out / f"state_rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert_split_like_ddp(out, one_process)
    assert_same_run(out, one_process)


@needs_deepspeed
def test_two_process_zero3_matches_one_process_and_resumes(setup, one_process, tmp_path):
    """ZeRO-3 (`deepspeed_zero3.yaml`: parameters partitioned from the load on, whole weights gathered on rank 0 for
    checkpoints and the final folder) over 2 CPU processes: the same losses and final folder as one process; a run
    resumed from the ZeRO checkpoint-2 skips the data of steps 1-2 and continues with the same losses and folder."""
    out = tmp_path / "zero3"
    result = run_worker(setup, out, zero(3), *ON_CPU, env=DS_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = out / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "global_step2").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(2) for kind in ("model", "optim")
    ]
    assert not (out / "state_rank1.safetensors").exists()  # gathered on rank 0 only
    assert_split_like_ddp(out, one_process)
    assert_same_run(out, one_process)
    resumed = tmp_path / "resumed"
    result = run_worker(setup, resumed, zero(3), *ON_CPU, "--resume_from_checkpoint", str(checkpoint), env=DS_ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    assert seen(resumed) == [rank[4:] for rank in seen(out)]  # 2 steps x 2 samples per rank skipped, not retrained
    assert_same_run(resumed, one_process, steps=(3, 4))


@needs_deepspeed
def test_lora_under_zero3_matches_one_process_and_loads_without_nativevl(setup, tmp_path):
    """`nativevl train tiny_lora.yaml` under ZeRO-3 on 2 CPU processes (global batch 8: 2 x 2 x 2 accumulation steps)
    against one process (4 x 2): the same losses, the same adapter at output_dir and merged final folder (1e-5), and
    both load through transformers + PEFT without nativevl, with equal logits."""
    from test_training_finetune import LOAD_WITHOUT_NATIVEVL

    root, model, data = setup
    argv = ["-m", "nativevl.cli", "train", str(RECIPES / "tiny_lora.yaml"), "--model_name_or_path", model]
    argv += ["--dataset_path", data, "--max_steps", "2", "--save_steps", "2", "--seed", "0", "--lora_dropout", "0"]
    argv += ["--dataloader_num_workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **DS_ENV}
    outs = {"one": tmp_path / "one", "zero3": tmp_path / "zero3"}
    commands = {
        "one": [sys.executable, *argv, "--output_dir", str(outs["one"]), "--use_cpu", "true"],  # 4 x 2
        "zero3": [sys.executable, *zero(3), *argv, "--output_dir", str(outs["zero3"]), *ON_CPU],
    }
    for name, command in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, (name, result.stderr[-4000:])
    history = {
        name: [e["loss"] for e in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]]
        for name, out in outs.items()
    }
    assert len(history["one"]) == 2 and history["zero3"] == pytest.approx(history["one"], abs=1e-5), history
    for file in ("adapter_model.safetensors", "final/model.safetensors"):
        single, sharded = load_file(outs["one"] / file), load_file(outs["zero3"] / file)
        assert sorted(sharded) == sorted(single) and not any("lora" in k for k in single if file.startswith("final"))
        for key in single:
            torch.testing.assert_close(sharded[key], single[key], atol=1e-5, rtol=0, msg=(file, key))
    out = outs["zero3"]
    command = [sys.executable, "-c", LOAD_WITHOUT_NATIVEVL, str(out / "final"), model, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["lora"] > 0 and not loaded["nativevl"]
    assert loaded["max_diff"] < 1e-4 < loaded["trained"], loaded  # the merged model, and not the base one


@needs_deepspeed
def test_deepspeed_on_cpu_without_gloo_is_refused(setup, tmp_path):
    """Without `--ddp_backend gloo` accelerate sets up one process per rank on CPU and DeepSpeed later refuses the
    batch size without saying why; `nativevl train` names the flag before training."""
    extra = ["--per_device_train_batch_size", "2", "--use_cpu", "false", "--max_steps", "1"]
    result = run_worker(setup, tmp_path / "refused", zero(2), *extra, env=DS_ENV)
    assert result.returncode != 0
    assert "DeepSpeed was launched on 2 processes but accelerate set up 1" in result.stderr
    assert "pass --ddp_backend gloo" in result.stderr


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
