"""nativevl -> a stock transformers Qwen2-VL folder (`nativevl convert to-qwen2-vl`), for engines that run no remote
code.

A nativevl model with the merger projector and M-RoPE positions is a Qwen2-VL model (arXiv 2409.12191): same
parameters, same computation. The output is the folder `Qwen2VLForConditionalGeneration.save_pretrained` and
Qwen2-VL's processor files make:

- config.json with `model_type: qwen2_vl` and `architectures: [Qwen2VLForConditionalGeneration]`, no `auto_map`;
- the weights under the names transformers 5 saves (`visual.*`, `model.*`, `lm_head.weight`: the Hub layout, which
  every Qwen2-VL loader reads), sharded and indexed as `save_pretrained` shards them, streamed one tensor at a time;
- preprocessor_config.json for `Qwen2VLImageProcessor` (the source's pixel limits and normalisation) and
  video_preprocessor_config.json for `Qwen2VLVideoProcessor` (nativevl's separate video limits);
- the tokenizer, chat template and generation config of the source (tokenizer_config.json without nativevl's
  `auto_map`, its `processor_class` Qwen2VLProcessor); no `.py` file.

What Qwen2-VL cannot express is refused before anything is written, naming the reason: the `merger_mlp` projector,
1-D positions, the granularity router, an image processor in fixed or crop mode or with a token budget, and a LoRA
adapter folder (Qwen2-VL has no adapter weights: convert the merged model `nativevl train` writes to
OUTPUT_DIR/final; a PEFT adapter of your own, `merge_and_unload()` then `save_pretrained` first).

Verification (`verify.verify_to_qwen2_vl`) loads the written folder through transformers' Auto classes without
remote code and compares it with the source nativevl model, and transformers' processor with nativevl's.
"""

import json
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint, read_json, source_license
from nativevl.conversion.convert import ConversionPlan
from nativevl.conversion.keymap import ROTARY_BUFFER_RULES, KeyTable
from nativevl.conversion.layerwise import on_meta
from nativevl.conversion.verify import verify_to_qwen2_vl
from nativevl.conversion.writer import TOKENIZER_FILES, copy_files, map_checkpoint
from nativevl.modeling import NativeVLConfig
from nativevl.processing import NativeVLProcessor


# nativevl's names (transformers' in-memory Qwen2-VL names) -> the names transformers 5 saves (the Hub layout).
TO_QWEN2_VL_KEY_TABLE: KeyTable = ROTARY_BUFFER_RULES + [
    (r"model\.visual\.(.+)", r"visual.\1"),
    (r"model\.language_model\.(.+)", r"model.\1"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
SUB_CONFIG_KEYS_DROPPED = ("model_type", "transformers_version", "architectures", "auto_map", "dtype")


def load_nativevl_folder(folder: str | Path) -> NativeVLConfig:
    """The NativeVLConfig of a nativevl folder; a LoRA adapter folder or another model type is refused."""
    folder = Path(folder)
    if (folder / "adapter_config.json").exists():
        merged = folder / "final"
        hint = f" ({merged} holds it here)" if (merged / "config.json").exists() else ""
        raise ConversionError(
            f"{folder} holds a LoRA adapter (adapter_config.json); a Qwen2-VL folder has no adapter weights, so the "
            f"adapter is merged first: convert the merged model that `nativevl train` writes to OUTPUT_DIR/final or "
            f"--export_dir{hint}, or merge a PEFT adapter yourself (`merge_and_unload()`, then `save_pretrained`)"
        )
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "nativevl":
        raise ConversionError(f"{folder}/config.json has model_type {model_type!r}; a nativevl folder has 'nativevl'")
    return NativeVLConfig.from_pretrained(folder)


def unexpressible(config: NativeVLConfig, processor: NativeVLProcessor) -> list[str]:
    """Why a nativevl model and processor cannot be written as Qwen2-VL (empty when they can)."""
    reasons = []
    if config.projector_type != "merger":
        reasons.append(
            f"projector_type={config.projector_type!r}: Qwen2-VL's merger feeds the LLM directly, it has no projector "
            "after the merger (model.multi_modal_projector.*)"
        )
    if config.position_scheme != "mrope":
        reasons.append(
            f"position_scheme={config.position_scheme!r}: Qwen2-VL always gives vision tokens M-RoPE (temporal, height, "
            "width) positions, so a model that reads 1-D positions would compute other logits"
        )
    if config.granularity is not None:
        reasons.append(
            f"granularity={config.granularity}: Qwen2-VL has no AVG-LLaVA router (model.granularity_router.*) and no "
            "pooled granularity levels"
        )
    image_processor = processor.image_processor
    if image_processor.mode != "native":
        reasons.append(
            f"image processor mode={image_processor.mode!r}: Qwen2VLImageProcessor resizes at native resolution only"
        )
    if processor.max_image_tokens is not None:
        reasons.append(
            f"processor max_image_tokens={processor.max_image_tokens}: Qwen2VLProcessor has no per-sample image token "
            "budget"
        )
    return reasons


def qwen2_vl_config(config: NativeVLConfig) -> Qwen2VLConfig:
    """The transformers Qwen2VLConfig of a merger + M-RoPE NativeVLConfig: same text and vision hyper-parameters and
    special token ids (the inverse of `qwen2_vl.config_from_qwen2_vl`)."""
    text, vision = config.text_config.to_dict(), config.vision_config.to_dict()
    for part in (text, vision):
        for key in SUB_CONFIG_KEYS_DROPPED:
            part.pop(key, None)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def saved_shapes(config: Qwen2VLConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} that `Qwen2VLForConditionalGeneration(config).save_pretrained` writes, in its order: the
    in-memory names through transformers' own reverse conversion (`revert_weight_conversion`), tied head left out."""
    model = on_meta(lambda: Qwen2VLForConditionalGeneration(config))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {key: tuple(value.shape) for key, value in revert_weight_conversion(model, state).items()}


def image_processor_of(processor: NativeVLProcessor) -> Qwen2VLImageProcessorPil:
    """transformers' Qwen2-VL image processor with nativevl's settings (it saves as `Qwen2VLImageProcessor`)."""
    ours = processor.image_processor
    return Qwen2VLImageProcessorPil(
        min_pixels=ours.min_pixels,
        max_pixels=ours.max_pixels,
        patch_size=ours.patch_size,
        temporal_patch_size=ours.temporal_patch_size,
        merge_size=ours.merge_size,
        image_mean=list(ours.image_mean),
        image_std=list(ours.image_std),
        do_convert_rgb=ours.do_convert_rgb,
        do_rescale=ours.do_rescale,
        rescale_factor=ours.rescale_factor,
        do_normalize=ours.do_normalize,
        resample=ours.resample,
    )


def video_processor_config(processor: NativeVLProcessor) -> dict:
    """video_preprocessor_config.json for transformers' `Qwen2VLVideoProcessor` with nativevl's video settings (every
    frame kept, as nativevl's processor does). Written as JSON: the class needs torchvision to be built."""
    ours = processor.image_processor
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": ours.video_min_pixels, "longest_edge": ours.video_max_pixels},
        "patch_size": ours.patch_size,
        "temporal_patch_size": ours.temporal_patch_size,
        "merge_size": ours.merge_size,
        "image_mean": list(ours.image_mean),
        "image_std": list(ours.image_std),
        "do_convert_rgb": ours.do_convert_rgb,
        "do_resize": True,
        "resample": ours.resample,
        "do_rescale": ours.do_rescale,
        "rescale_factor": ours.rescale_factor,
        "do_normalize": ours.do_normalize,
        "do_sample_frames": False,
    }


def write_processor_files(folder: Path, source: Path, processor: NativeVLProcessor) -> None:
    """Tokenizer files and chat template (copied), tokenizer_config.json without nativevl's remote code,
    preprocessor_config.json and video_preprocessor_config.json for transformers' Qwen2-VL processors."""
    copied = copy_files(source, folder, TOKENIZER_FILES)
    config_path = folder / "tokenizer_config.json"
    if config_path.exists():
        tokenizer_config = read_json(config_path)
        tokenizer_config.pop("auto_map", None)
        tokenizer_config["processor_class"] = "Qwen2VLProcessor"
        config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    has_template = {"chat_template.jinja", "chat_template.json"} & set(copied)
    if not has_template and not (config_path.exists() and read_json(config_path).get("chat_template")):
        (folder / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")  # nativevl's default
    image_processor_of(processor).save_pretrained(folder)
    image_config = read_json(folder / "preprocessor_config.json")
    if image_config.get("image_processor_type") != "Qwen2VLImageProcessor":
        raise ConversionError(
            f"preprocessor_config.json names {image_config.get('image_processor_type')!r}, expected "
            "'Qwen2VLImageProcessor'"
        )
    # the released Qwen2-VL folders also carry the limits as min_pixels / max_pixels (older loaders read those)
    image_config.update(
        min_pixels=image_config["size"]["shortest_edge"], max_pixels=image_config["size"]["longest_edge"]
    )
    (folder / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
    video = json.dumps(video_processor_config(processor), indent=2, sort_keys=True) + "\n"
    (folder / "video_preprocessor_config.json").write_text(video)


def plan_to_qwen2_vl(
    input_folder: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> ConversionPlan:
    """Plans `nativevl convert to-qwen2-vl`: a nativevl folder (merger, M-RoPE) -> a stock Qwen2-VL folder."""
    folder = Path(input_folder)
    config = load_nativevl_folder(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise ConversionError(
            f"{folder} has no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model): a Qwen2-VL folder "
            "for serving carries the model's tokenizer; copy its files into the folder"
        )
    processor = NativeVLProcessor.from_pretrained(folder)
    reasons = unexpressible(config, processor)
    if reasons:
        raise ConversionError(f"{folder} cannot be written as a stock Qwen2-VL folder: " + "; ".join(reasons))
    target_config = qwen2_vl_config(config)
    checkpoint = SourceCheckpoint(folder, allow_pickle=allow_pickle)
    table = TO_QWEN2_VL_KEY_TABLE
    if config.tie_word_embeddings:  # a tied head may still be saved; Qwen2-VL re-ties it
        table = [(r"lm_head\.weight", None)] + table
    tensors = map_checkpoint(checkpoint, table, "input")
    out_dtype = dtype or checkpoint.main_dtype()

    def write_config(staging: Path, dtype: torch.dtype) -> None:
        target_config.architectures = [Qwen2VLForConditionalGeneration.__name__]
        target_config.dtype = dtype
        target_config.save_pretrained(staging)

    def write_extras(staging: Path) -> None:
        write_processor_files(staging, folder, processor)
        if (folder / "generation_config.json").exists():
            copy_files(folder, staging, ["generation_config.json"])
        else:
            GenerationConfig.from_model_config(target_config).save_pretrained(staging)

    return ConversionPlan(
        family="qwen2_vl_stock",
        config=config,
        tensors=tensors,
        dtype=out_dtype,
        sources={"input": folder},
        write_extras=write_extras,
        verify=lambda staging, atol: verify_to_qwen2_vl(staging, checkpoint, processor, out_dtype, atol),
        card={
            "source": folder.name,
            "min_pixels": processor.image_processor.min_pixels,
            "max_pixels": processor.image_processor.max_pixels,
            "license": source_license(folder) or "other",
            "base_model": [folder.name],
            "model_class": Qwen2VLForConditionalGeneration.__name__,
            "processor_class": "Qwen2VLProcessor",
        },
        checkpoints=[checkpoint],
        expected=saved_shapes(target_config),
        write_config=write_config,
    )
