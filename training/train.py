"""`nativevl train RECIPE.yaml [--overrides]`: supervised fine-tuning through TRL's `SFTTrainer`, packed.

Recipes (`training/recipes/`) hold TRL `SFTConfig` fields plus `NativeVLArguments` (model, data, which parts train,
per-part learning rates, LoRA preset, image limits and mode, packing, attention). The stages follow NativeRes-LLaVA
(arXiv 2506.12776): stage 1 trains the projector, stage 2 projector + LLM, stage 3 everything (ViT at a lower lr).

    nativevl export --tiny runs/tiny                 # a random tiny model to start from
    nativevl train training/recipes/tiny_stage2.yaml --model_name_or_path runs/tiny \\
        --dataset_path data/train.jsonl --output_dir runs/sft --max_steps 20
    accelerate launch --config_file training/accelerate/ddp.yaml -m nativevl.cli train training/recipes/stage2.yaml \
        --model_name_or_path ... --dataset_path ...      # DDP; fsdp.yaml, deepspeed_zero{2,3}.yaml likewise
    accelerate launch --multi_gpu --num_processes 2 -m nativevl.cli train training/recipes/tiny_stage2.yaml \
        --use_cpu true ...                               # 2 CPU processes (gloo), as the test suite runs it
    accelerate launch --config_file training/accelerate/deepspeed_zero3.yaml --num_processes 2 --mixed_precision no \
        -m nativevl.cli train training/recipes/tiny_stage2.yaml --ddp_backend gloo ...   # ZeRO-3 on 2 CPU processes

Adaptive visual granularity (AVG-LLaVA, arXiv 2410.02745): `--granularity 3` gives the model 3 levels and a router
(fresh when the checkpoint has none); stage 1 adds `--granularity_training all|random` to any SFT recipe (every
sample at every level, loss averaged over levels; or one random level per image); stage 2 is `stage: rglf`
(`recipes/rglf.yaml`, `tiny_rglf.yaml`; `training/rglf.py`), which trains the router alone.

    nativevl train training/recipes/tiny_stage2.yaml --model_name_or_path runs/tiny --granularity 3 \
        --granularity_training all --dataset_path data/train.jsonl --output_dir runs/avg1 --max_steps 20
    nativevl train training/recipes/tiny_rglf.yaml --model_name_or_path runs/avg1/final \
        --dataset_path data/train.jsonl --output_dir runs/avg2 --max_steps 20

Data (`training/data.py`, checked in one pass before training): `--dataset_path` a `.jsonl`, `.json`, `.parquet`
file or a `save_to_disk` folder (a `DatasetDict` gives its train split, and its eval split to evaluation), or
`--dataset_name` a local folder of data files; records in TRL's conversational format (`messages` + `images` or
`image`), LLaVA / ShareGPT's (`conversations` of from/value with `<image>` markers) or `nativevl synth-rc`'s
`data.jsonl`. Relative image paths are resolved against the data's folder.

Loss: assistant tokens only with `assistant_only_loss: true` (the recipes), found from the rendered conversation
(`{% generation %}` markers not needed, so converted folders keep their source's template), packed or not
(`--multimodal_packing false`: one sample per row, the same labels); `false` trains on every text token. A batch with
nothing to train on is an error.

The final model is written as a remote-code folder (`<output_dir>/final` unless `--export_dir`), LoRA merged in;
a LoRA run also leaves its adapter at `output_dir` (`adapter_config.json`, `adapter_model.safetensors`, PEFT's
layout), as TRL's `save_model` does.
"""

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer, TrlParser

from nativevl.conversion.export import save_folder
from nativevl.conversion.layerwise import on_meta
from nativevl.modeling import NativeVLForConditionalGeneration
from nativevl.processing import NativeVLProcessor
from nativevl.runs import RunFolderError, RunLock, check_fingerprint, file_digest, weights_fingerprint
from nativevl.training.checkpoints import AtomicCheckpointMixin
from nativevl.training.data import load_training_data
from nativevl.training.packing import PackingCollator, PaddedCollator
from nativevl.training.vision_init import center_vision_tokens, input_dependent_share, training_images


PARTS = ("vision_tower", "merger", "projector", "llm")
LLM_LINEARS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PROJECTOR_LINEARS = r"model\.(multi_modal_projector\.linear_[12]|visual\.merger\.mlp\.[02])"
RUN_FILE = "nativevl_run.json"  # fingerprint of the run whose checkpoints an output_dir holds (`check_output_dir`)
LORA_PRESETS = {
    "llm": LLM_LINEARS,
    "llm+projector": f"({LLM_LINEARS}|{PROJECTOR_LINEARS})",
    "all-linear": "all-linear",
}


@dataclass
class NativeVLArguments:
    """nativevl's own training options (TRL's `SFTConfig` holds the rest)."""

    model_name_or_path: str = field(metadata={"help": "nativevl folder to start from (e.g. `nativevl export --tiny`)"})
    dataset_path: str | None = field(
        default=None, metadata={"help": ".jsonl / .json / .parquet file or save_to_disk folder (training/data.py)"}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "instead of dataset_path: a local folder of data files (load_dataset)"}
    )
    eval_dataset_path: str | None = field(default=None, metadata={"help": "optional evaluation data, same formats"})
    train_vision_tower: bool = field(default=False, metadata={"help": "train the ViT blocks and patch embedding"})
    train_merger: bool = field(default=False, metadata={"help": "train the 2x2 patch merger"})
    train_projector: bool = field(default=True, metadata={"help": "train the MLP projector (merger_mlp models)"})
    train_llm: bool = field(default=False, metadata={"help": "train the language model and LM head"})
    vision_tower_lr: float | None = field(default=None, metadata={"help": "lr of the ViT; None: learning_rate"})
    merger_lr: float | None = field(default=None, metadata={"help": "lr of the merger; None: learning_rate"})
    projector_lr: float | None = field(default=None, metadata={"help": "lr of the projector; None: learning_rate"})
    llm_lr: float | None = field(default=None, metadata={"help": "lr of the LLM; None: learning_rate"})
    lora: str | None = field(default=None, metadata={"help": "LoRA preset: llm | llm+projector | all-linear"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    image_mode: str = field(default="native", metadata={"help": "native | fixed | crop"})
    min_pixels: int | None = field(default=None, metadata={"help": "override the processor's min_pixels"})
    max_pixels: int | None = field(default=None, metadata={"help": "override the processor's max_pixels"})
    fixed_pixels: int | None = field(default=None, metadata={"help": "pixels per image in fixed mode"})
    max_image_tokens: int | None = field(default=None, metadata={"help": "per-sample image token budget"})
    multimodal_packing: bool = field(
        default=True,
        metadata={
            "help": "padding-free packing (PackingCollator); false: one sample per row, padded (PaddedCollator)"
        },
    )
    max_tokens_per_row: int | None = field(default=None, metadata={"help": "row length when packing; None: 1 row"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager | flex_attention | flash_..."})
    export_dir: str | None = field(default=None, metadata={"help": "final remote-code folder (<output_dir>/final)"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "start over: delete the checkpoints in output_dir, also those of another run"},
    )
    allow_outside_paths: bool = field(
        default=False, metadata={"help": "let image paths of a JSONL dataset leave the dataset file's folder"}
    )
    stage: str = field(default="sft", metadata={"help": "sft | rglf (AVG-LLaVA stage 2: train the router only)"})
    granularity: int | None = field(
        default=None, metadata={"help": "granularity levels L; adds a fresh router if the checkpoint has none"}
    )
    granularity_training: str | None = field(
        default=None, metadata={"help": "AVG-LLaVA stage 1 (sft): all (every level, loss averaged) | random"}
    )
    center_vision_tokens: int = field(
        default=0,
        metadata={
            "help": "from scratch: before training, centre the vision tokens over this many training images "
            "(`training/vision_init.py`); 0: off"
        },
    )
    rglf_margin: float = field(default=1.0, metadata={"help": "RGLF ranking margin per unit of loss gap"})
    rglf_rank_weight: float = field(default=1.0, metadata={"help": "weight of the RGLF ranking loss"})
    rglf_ce_weight: float = field(default=0.1, metadata={"help": "weight of the CE towards the best level"})
    rglf_token_cost: float = field(
        default=0.0,
        metadata={"help": "RGLF feedback = answer loss + this x (level's visual tokens / level 0's); 0: the release"},
    )
    rglf_feedback: str = field(
        default="loss",
        metadata={"help": "what ranks the levels: loss (the release) | exact_match (the greedy answer is the label)"},
    )


def part_of(name: str) -> str:
    """Which trainable part a parameter name (plain or PEFT-wrapped) belongs to."""
    if ".visual.merger." in f".{name}":
        return "merger"
    if ".visual." in f".{name}":
        return "vision_tower"
    if ".multi_modal_projector." in f".{name}":
        return "projector"
    if ".granularity_router." in f".{name}":
        return "router"
    return "llm"


def load_model_and_processor(args: NativeVLArguments):
    extra = {} if args.granularity is None else {"granularity": args.granularity}
    model = NativeVLForConditionalGeneration.from_pretrained(
        args.model_name_or_path, attn_implementation=args.attn_implementation, dtype=torch.float32, **extra
    )
    overrides = {
        k: v
        for k, v in dict(
            mode=args.image_mode,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            fixed_pixels=args.fixed_pixels,
        ).items()
        if v is not None
    }
    processor = NativeVLProcessor.from_pretrained(args.model_name_or_path)
    # the model's config decides the position ids (folders converted before processor_config.json held the scheme)
    processor.position_scheme = model.config.position_scheme
    for key, value in overrides.items():
        setattr(processor.image_processor, key, value)
    processor.image_processor.validate()  # the overrides, now rather than at the first batch
    if args.max_image_tokens is not None:
        processor.max_image_tokens = args.max_image_tokens
    return model, processor


def full_numel(param) -> int:
    """Elements of a parameter, also when ZeRO-3 (`zero3_init_flag`) partitioned it at load: its local tensor is then
    empty and DeepSpeed keeps the full count in `ds_numel`."""
    return getattr(param, "ds_numel", param.numel())


def set_trainable_parts(model, args: NativeVLArguments) -> dict[str, int]:
    """Freezes every part not selected; returns trainable parameter counts per part. In a `merger` model (Qwen2-VL)
    the merger is the projector, so `train_projector` trains it too."""
    wanted = {part: getattr(args, f"train_{part}") for part in PARTS}
    if model.config.projector_type == "merger":
        wanted["merger"] = wanted["merger"] or wanted["projector"]
    wanted["router"] = False  # the router learns in stage rglf only
    counts = dict.fromkeys(wanted, 0)
    for name, param in model.named_parameters():
        part = part_of(name)
        param.requires_grad_(wanted[part])
        counts[part] += full_numel(param) if wanted[part] else 0
    if not any(counts.values()):
        raise ValueError(f"no parameter trains: select at least one of train_{{{', '.join(PARTS)}}} with parameters")
    return counts


def center_on_training_images(model, processor, dataset, limit: int) -> None:
    """`center_vision_tokens` over up to `limit` training images drawn at random (seeded, the same on every
    process); prints the input-dependent share of the vision tokens before and after (`training/vision_init.py`)."""
    images = training_images(dataset, limit)
    if not images:
        raise ValueError(f"center_vision_tokens={limit} needs training images, and the training data has none")
    tokens = center_vision_tokens(model, processor, images)
    mean = tokens.mean(0)
    before, after = input_dependent_share(tokens), input_dependent_share(tokens - mean)
    print(
        f"centred the vision tokens over {len(images)} training images: mean of norm {float(mean.norm()):.3g} "
        f"removed, input-dependent share {before:.1%} -> {after:.1%}",
        flush=True,
    )


def load_data(args: NativeVLArguments):
    """(train, eval) datasets of `args` (`training/data.py`): `eval_dataset_path` when given, else the eval split
    of a `DatasetDict`, else None. Raises ValueError unless exactly one of dataset_path / dataset_name is given."""
    if (args.dataset_path is None) == (args.dataset_name is None):
        raise ValueError(
            f"give exactly one of --dataset_path ({args.dataset_path!r}) and --dataset_name ({args.dataset_name!r})"
        )
    train, evaluation = load_training_data(
        args.dataset_path or args.dataset_name, args.allow_outside_paths, from_hub_layout=args.dataset_path is None
    )
    if args.eval_dataset_path:
        evaluation, _ = load_training_data(args.eval_dataset_path, args.allow_outside_paths)
    return train, evaluation


class NativeVLTrainer(AtomicCheckpointMixin, SFTTrainer):
    """`SFTTrainer` with per-part learning rates and checkpoints written atomically; everything else is TRL's.

    TRL refuses `packing=True` and `padding_free=True` for vision data; here they mean nativevl's `PackingCollator`
    (rows of at most `max_length` tokens with `packing`, one row per batch with `padding_free` alone), loss on the
    assistant tokens when `assistant_only_loss`. A collator of another kind with those flags is refused."""

    def __init__(self, *args, part_lrs: dict[str, float | None] | None = None, **kwargs):
        self.part_lrs = part_lrs or {}
        config, collator = kwargs.get("args"), kwargs.get("data_collator")
        if config is not None and (config.packing or config.padding_free):
            if collator is not None and not isinstance(collator, PackingCollator):
                raise ValueError(
                    f"packing={config.packing} padding_free={config.padding_free} pack vision data with nativevl's "
                    f"PackingCollator, but data_collator is a {type(collator).__name__}; drop it, or set both off"
                )
            if collator is None:
                kwargs["data_collator"] = PackingCollator(
                    kwargs["processing_class"],
                    max_tokens=config.max_length if config.packing else None,
                    assistant_only_loss=config.assistant_only_loss,
                    seed=config.seed,
                )
            config.packing = config.padding_free = False  # TRL's own refuse vision data
            config.assistant_only_loss = False  # the collator's; TRL would look for {% generation %} markers
            config.remove_unused_columns = False
            config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None and any(lr is not None for lr in self.part_lrs.values()):
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[str, bool], list] = {}
            for name, param in opt_model.named_parameters():
                if param.requires_grad:
                    groups.setdefault((part_of(name), name in decay), []).append(param)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(
                [
                    {
                        "params": params,
                        "weight_decay": self.args.weight_decay if decayed else 0.0,
                        "lr": self.part_lrs.get(part) or self.args.learning_rate,
                    }
                    for (part, decayed), params in groups.items()
                ],
                **optimizer_kwargs,
            )
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs["position_ids"].shape[-2] if "cu_seq_lens_q" in inputs else None
        if self.is_fsdp_enabled:
            # TRL's fused LM head reads `lm_head.weight` without calling `lm_head`, but accelerate's FSDP2 gives
            # [final norm, lm_head] their own FSDP unit: the weight stays a sharded DTensor, TRL gathers it with
            # `full_tensor()`, and its gradient is never reduced across ranks (each rank keeps its own). The model's
            # own loss calls `lm_head`, so FSDP gathers and reduces it; same value (sum of token losses /
            # num_items_in_batch), without TRL's entropy, token accuracy and token count logs.
            inputs["use_cache"] = False
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if rows is not None and self.model.training:
            # TRL counts position_ids.size(1) tokens for a batch without attention mask: for packed
            # (4, rows, seq) ids that is the row count; add the rest of the row slots
            extra = torch.tensor(inputs["input_ids"].numel() - rows, device=inputs["input_ids"].device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(extra).sum())
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return result


def run_fingerprint(args: NativeVLArguments) -> dict:
    """What a training run's checkpoints depend on: the starting weights, the data and the options that change
    what is trained (`nativevl.runs`)."""
    data = Path(args.dataset_path or args.dataset_name)
    if data.is_dir():
        dataset = {str(p.relative_to(data)): file_digest(p) for p in sorted(data.rglob("*")) if p.is_file()}
    else:
        dataset = file_digest(data)
    model = Path(args.model_name_or_path)
    options = ("stage", "lora", "lora_r", "granularity", "granularity_training", "image_mode", "multimodal_packing")
    options += ("center_vision_tokens",)
    if args.stage == "rglf":  # what the router is trained towards
        options += ("rglf_margin", "rglf_rank_weight", "rglf_ce_weight", "rglf_token_cost", "rglf_feedback")
    return {
        "model": weights_fingerprint(model) if model.is_dir() else args.model_name_or_path,
        "dataset": dataset,
        **{f"train_{part}": getattr(args, f"train_{part}") for part in PARTS},
        **{name: getattr(args, name) for name in options},
    }


def check_output_dir(training_args: SFTConfig, args: NativeVLArguments) -> None:
    """Refuses an output_dir holding checkpoints of another run: another fingerprint, checkpoints without
    `RUN_FILE`, or, whatever the fingerprint, a run that does not resume (`--resume_from_checkpoint`) and would
    leave them beside its own, for a later `--resume_from_checkpoint true` to take. Resuming or rotating would mix
    the two runs. With `overwrite` the checkpoints are deleted and the run starts over. Records this run's
    fingerprint in `output_dir / RUN_FILE` (main process only; the other ranks of a distributed run check without
    writing)."""
    out = Path(training_args.output_dir)
    checkpoints = sorted(p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir()) if out.is_dir() else []
    main = training_args.process_index == 0
    if checkpoints and not (out / RUN_FILE).is_file() and not args.overwrite:
        raise RunFolderError(
            f"{out} holds checkpoints ({', '.join(p.name for p in checkpoints[:5])}) of a run that recorded no "
            f"{RUN_FILE}; pass --overwrite true to delete them and start over, or use another --output_dir"
        )
    if main:
        out.mkdir(parents=True, exist_ok=True)
    # without checkpoints nothing can be mixed: the fingerprint of the last run is simply replaced
    start_over = check_fingerprint(out / RUN_FILE, run_fingerprint(args), args.overwrite or not checkpoints, main)
    if checkpoints and not args.overwrite and resume_argument(training_args.resume_from_checkpoint) is None:
        raise RunFolderError(
            f"{out} holds checkpoints of an earlier run ({', '.join(p.name for p in checkpoints[:5])}); a run that "
            "does not resume would leave them beside its own; pass --resume_from_checkpoint true to continue that "
            "run, --overwrite true to delete them and start over, or use another --output_dir"
        )
    if main and checkpoints and (start_over or args.overwrite):
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)


def build_trainer(training_args: SFTConfig, args: NativeVLArguments, data: tuple | None = None) -> Trainer:
    """The trainer of a run; `data` the (train, eval) datasets when already loaded (`load_data`)."""
    train_dataset, eval_dataset = load_data(args) if data is None else data
    check_output_dir(training_args, args)
    check_stage(args)
    model, processor = load_model_and_processor(args)
    check_granularity_levels(model, args)
    if args.stage == "rglf":
        from nativevl.training.rglf import build_rglf_trainer

        trainer = build_rglf_trainer(training_args, model, processor, train_dataset, eval_dataset, args)
        check_engine(trainer)
        return trainer
    peft_config = lora_config(model, args)
    if peft_config is None:
        set_trainable_parts(model, args)
    if args.center_vision_tokens:
        center_on_training_images(model, processor, train_dataset, args.center_vision_tokens)
    assistant_only = hand_batching_to_the_collator(training_args)
    trainer = NativeVLTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=build_collator(processor, model.config, training_args, args, assistant_only),
        peft_config=peft_config,
        part_lrs={part: getattr(args, f"{part}_lr") for part in PARTS},
    )
    check_engine(trainer)
    return trainer


def check_stage(args: NativeVLArguments) -> None:
    """Raises ValueError, naming the value, for an unknown `stage` or `granularity_training`."""
    if args.stage not in ("sft", "rglf"):
        raise ValueError(f"stage must be 'sft' or 'rglf', got {args.stage!r}")
    if args.granularity_training not in (None, "all", "random"):
        raise ValueError(f"granularity_training must be all or random, got {args.granularity_training!r}")


def check_granularity_levels(model, args: NativeVLArguments) -> None:
    """Multi-granularity SFT and RGLF need a model with granularity levels (`config.granularity`)."""
    if (args.granularity_training or args.stage == "rglf") and model.config.granularity is None:
        raise ValueError(
            f"stage={args.stage!r} granularity_training={args.granularity_training!r} needs granularity levels: "
            f"{args.model_name_or_path} has none, pass --granularity L"
        )


def lora_config(model, args: NativeVLArguments):
    """PEFT's `LoraConfig` for `args.lora` (a `LORA_PRESETS` name), with every base parameter frozen; None
    without LoRA (the model is then untouched)."""
    if args.lora is None:
        return None
    from peft import LoraConfig

    if args.lora not in LORA_PRESETS:
        raise ValueError(f"lora preset must be one of {sorted(LORA_PRESETS)}, got {args.lora!r}")
    for param in model.parameters():
        param.requires_grad_(False)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_PRESETS[args.lora],
        task_type="CAUSAL_LM",
    )


def hand_batching_to_the_collator(training_args: SFTConfig) -> bool:
    """Turns off what TRL would do to the data itself (dataset preparation, packing, truncation, its
    assistant-only check): nativevl's collators do it. Returns the requested `assistant_only_loss`."""
    training_args.remove_unused_columns = False
    training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    training_args.packing = False  # TRL's own packing refuses vision data; PackingCollator does it instead
    training_args.padding_free = False
    training_args.max_length = None  # samples are never truncated through an image; rows are bounded instead
    assistant_only = training_args.assistant_only_loss
    training_args.assistant_only_loss = False  # the collator's job; TRL's check would demand generation markers
    return assistant_only


def build_collator(processor, config, training_args: SFTConfig, args: NativeVLArguments, assistant_only: bool):
    """`PackingCollator` (multimodal packing, granularity levels) or `PaddedCollator` (one sample per row, the same
    labels)."""
    if args.multimodal_packing:
        return PackingCollator(
            processor,
            max_tokens=args.max_tokens_per_row,
            assistant_only_loss=assistant_only,
            granularity_training=args.granularity_training,
            num_levels=config.granularity,
            seed=training_args.seed,
        )
    if args.granularity_training is not None:
        raise ValueError("granularity_training needs multimodal_packing (PackingCollator)")
    return PaddedCollator(processor, assistant_only_loss=assistant_only)


def check_engine(trainer: Trainer) -> None:
    """Raises when `accelerate launch` asked for FSDP or DeepSpeed but the trainer runs something else: accelerate
    1.x runs FSDP only on accelerator devices and, on CPU processes, silently falls back to DDP; it runs DeepSpeed on
    CPU processes (DeepSpeed's `cpu` accelerator) only without `--use_cpu true`, and there only with `--ddp_backend
    gloo`: without it accelerate sets up one process per rank and DeepSpeed refuses the batch size at the first
    step, naming neither."""
    state = trainer.accelerator.state
    hints = {
        "FSDP": "accelerate runs FSDP on accelerator devices only (on CPU it falls back to DDP)",
        "DEEPSPEED": "on CPU processes run DeepSpeed with --ddp_backend gloo and without --use_cpu true",
    }
    for engine, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(flag, "false").lower() == "true" and state.distributed_type.value != engine:
            raise ValueError(
                f"accelerate was launched with {engine} ({flag}=true) but runs {state.distributed_type.value} on "
                f"{state.device}: {hints[engine]}"
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.distributed_type.value == "DEEPSPEED" and state.num_processes != world:
        raise ValueError(
            f"DeepSpeed was launched on {world} processes but accelerate set up {state.num_processes} (process-group "
            f"backend {state.backend!r}): without an accelerator accelerate picks no backend; on CPU processes pass "
            "--ddp_backend gloo"
        )


def export_final(trainer: NativeVLTrainer, args: NativeVLArguments, output_dir: str) -> str:
    """Writes the trained model (LoRA merged) and its processor as a remote-code folder; returns its path.

    Under FSDP and DeepSpeed ZeRO-3 the parameters are shards: every rank joins in gathering the full state dict (to
    rank 0's CPU; ZeRO-3 needs `stage3_gather_16bit_weights_on_model_save`, `zero3_save_16bit_model` in accelerate's
    config), and rank 0 writes it through a plain `NativeVLForConditionalGeneration` built on the meta device (a
    LoRA run's adapters merged into it), so the folder is the same as a single process writes. ZeRO-2 keeps whole
    parameters on every rank and is written like DDP."""
    target = args.export_dir or os.path.join(output_dir, "final")
    if zero3_enabled(trainer):
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # collective; None except on rank 0
        if trainer.accelerator.is_main_process:
            model = from_gathered_state(trainer.accelerator.unwrap_model(trainer.model), state)
            save_folder(model, trainer.processing_class, target, overwrite=True, base_model=args.model_name_or_path)
        trainer.accelerator.wait_for_everyone()
        return target
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = trainer.accelerator.unwrap_model(model)
    if trainer.is_fsdp_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model)  # collective; empty except on rank 0
        if trainer.accelerator.is_main_process:
            config = model.config
            model = on_meta(lambda: NativeVLForConditionalGeneration(config))
            model.load_state_dict(state, strict=True, assign=True)
            model.tie_weights()
    if trainer.accelerator.is_main_process:
        save_folder(model, trainer.processing_class, target, overwrite=True, base_model=args.model_name_or_path)
    trainer.accelerator.wait_for_everyone()
    return target


def zero3_enabled(trainer: Trainer) -> bool:
    """Whether the trainer runs DeepSpeed ZeRO-3 (parameters partitioned across ranks)."""
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def without_zero3_init():
    """Builds models as plain modules inside a ZeRO-3 run: transformers' `_from_config` (the vision tower, the
    language model) enters `deepspeed.zero.Init` while its DeepSpeed config is registered, which would partition
    (and, on the meta device, fail to copy) the parameters. The registration is a weak reference in
    `transformers.integrations.deepspeed`, restored on exit."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def from_gathered_state(trained, state: dict):
    """A plain `NativeVLForConditionalGeneration` holding `state`, the full state dict gathered from the ZeRO-3
    partitions of `trained` (the trained module, a PEFT model for a LoRA run): built on the meta device, wrapped
    like `trained` when it has LoRA adapters, loaded by assignment, adapters merged."""
    if state is None:
        raise ValueError("no gathered state dict on the main process: DeepSpeed returned None")
    peft_config = getattr(trained, "peft_config", None)
    config = (trained.get_base_model() if peft_config else trained).config
    with without_zero3_init():
        model = on_meta(lambda: NativeVLForConditionalGeneration(config))
    if peft_config:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config["default"])
    model.load_state_dict(state, strict=True, assign=True)
    if peft_config:
        model = model.merge_and_unload()
    model.tie_weights()
    return model.eval()


def parse(argv: list[str]) -> tuple[SFTConfig, NativeVLArguments]:
    """`RECIPE.yaml [--overrides]` (or plain flags) into the two dataclasses."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", argv[0], *argv[1:]]
    parser = TrlParser((SFTConfig, NativeVLArguments))
    training_args, args = parser.parse_args_and_config(argv)
    return training_args, args


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: "true" means the latest checkpoint of output_dir
    (True), "false" or empty none (None), anything else a checkpoint path."""
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0", ""):
        return True if value.strip().lower() in ("true", "yes", "1") else None
    return value


def main(argv: list[str] | None = None) -> int:
    training_args, args = parse(list(sys.argv[1:] if argv is None else argv))
    data = load_data(args)  # bad data fails before output_dir is touched
    with RunLock(training_args.output_dir) if training_args.process_index == 0 else contextlib.nullcontext():
        trainer = build_trainer(training_args, args, data)
        trainer.train(resume_from_checkpoint=resume_argument(training_args.resume_from_checkpoint))
        if args.lora is not None:
            trainer.save_model(training_args.output_dir)  # the adapter where TRL leaves it (PEFT's layout)
        target = export_final(trainer, args, training_args.output_dir)
    collator = trainer.data_collator
    if trainer.accelerator.is_main_process:
        if isinstance(collator, PackingCollator):
            print(f"packing fill rate: {collator.fill_rate:.1%} of row slots hold sample tokens")
        print(f"final model: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
