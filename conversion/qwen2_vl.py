"""Qwen2-VL (transformers' `Qwen2VLForConditionalGeneration`) -> nativevl, `projector_type="merger"`, M-RoPE.

nativevl keeps Qwen2-VL's parameter names, so the key table is an identity over the three parts; it still runs
strictly so that a renamed or extra parameter in a future transformers release fails loudly.

`from_qwen2_vl` converts a model in memory; `plan_qwen2_vl` plans the conversion of a checkpoint folder for
`nativevl convert qwen2-vl` (see `nativevl.conversion.cli`).
"""

from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint, read_json, source_license
from nativevl.conversion.convert import ConversionPlan
from nativevl.conversion.keymap import ROTARY_BUFFER_RULES, KeyTable, check_coverage, map_keys
from nativevl.conversion.verify import verify_qwen2_vl
from nativevl.conversion.writer import (
    copy_files,
    map_checkpoint,
    processor_settings,
    write_generation_config,
    write_processor_config,
)
from nativevl.modeling import NativeVLConfig, NativeVLForConditionalGeneration


# transformers >= 4.52 layout (model.visual / model.language_model / lm_head), and the older flat layout of the
# released Hub checkpoints (visual / model.layers / model.embed_tokens / model.norm / lm_head).
QWEN2_VL_KEY_TABLE: KeyTable = ROTARY_BUFFER_RULES + [
    (r"model\.visual\.(.+)", r"model.visual.\1"),
    (r"model\.language_model\.(.+)", r"model.language_model.\1"),
    (r"visual\.(.+)", r"model.visual.\1"),
    (r"model\.(embed_tokens|layers|norm)(.*)", r"model.language_model.\1\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
]


def vision_config_dict(config: Qwen2VLConfig) -> dict:
    """The vision config of a transformers Qwen2VLConfig as a dict NativeVLVisionConfig accepts."""
    vision = config.vision_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        vision.pop(key, None)
    return vision


def config_from_qwen2_vl(config: Qwen2VLConfig) -> NativeVLConfig:
    """The equivalent NativeVLConfig: same vision and text hyper-parameters and special token ids."""
    text = config.text_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        text.pop(key, None)
    vision = vision_config_dict(config)
    return NativeVLConfig(
        text_config=text,
        vision_config=vision,
        projector_type="merger",
        position_scheme="mrope",
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor], table: KeyTable = QWEN2_VL_KEY_TABLE) -> dict:
    """Renames a Qwen2-VL state dict to nativevl's names (strict: unknown keys raise)."""
    mapping = map_keys(state_dict.keys(), table)
    return {target: state_dict[source] for source, target in mapping.items()}


def from_qwen2_vl(model: Qwen2VLForConditionalGeneration) -> NativeVLForConditionalGeneration:
    """An equivalent `NativeVLForConditionalGeneration` of an in-memory transformers Qwen2-VL model.

    Same dtype and device as the source; weights are copied, every key mapped, every target key produced.
    """
    config = config_from_qwen2_vl(model.config)
    config._attn_implementation = model.config._attn_implementation
    source = model.state_dict()
    if config.tie_word_embeddings:
        source.pop("lm_head.weight", None)
    weights = convert_state_dict(source)
    target = NativeVLForConditionalGeneration(config).to(device=model.device, dtype=model.dtype)
    expected = set(target.state_dict().keys())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    check_coverage(weights.keys(), expected)
    target.load_state_dict(weights, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        target.tie_weights()
    return target.train(model.training)


def load_qwen2_vl_config(folder: str | Path) -> Qwen2VLConfig:
    """The transformers Qwen2VLConfig of a Qwen2-VL folder; fails when config.json is not a Qwen2-VL config."""
    model_type = read_json(Path(folder) / "config.json").get("model_type")
    if model_type != "qwen2_vl":
        raise ConversionError(f"{folder}/config.json has model_type {model_type!r}; a Qwen2-VL folder has 'qwen2_vl'")
    return Qwen2VLConfig.from_pretrained(folder)


def plan_qwen2_vl(
    input_folder: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False
) -> ConversionPlan:
    """Plans `nativevl convert qwen2-vl`: a transformers Qwen2-VL folder -> nativevl (merger, M-RoPE).

    Weights are renamed by `QWEN2_VL_KEY_TABLE` (both layouts); tokenizer files, chat template and
    generation_config.json are copied; the source's min/max pixels go into nativevl's preprocessor_config.json.
    Verification compares logits with transformers' `Qwen2VLForConditionalGeneration.from_pretrained(input)`.
    """
    folder = Path(input_folder)
    config = config_from_qwen2_vl(load_qwen2_vl_config(folder))
    checkpoint = SourceCheckpoint(folder, allow_pickle=allow_pickle)
    table = QWEN2_VL_KEY_TABLE
    if config.tie_word_embeddings:  # a tied head may still be saved; nativevl re-ties it
        table = [(r"lm_head\.weight", None)] + table
    tensors = map_checkpoint(checkpoint, table, "input")
    out_dtype = dtype or checkpoint.main_dtype()
    settings = processor_settings(folder)

    def write_extras(staging: Path) -> None:
        copy_files(folder, staging)
        write_generation_config(staging, config, folder)
        write_processor_config(staging, config, **settings)

    return ConversionPlan(
        family="qwen2_vl",
        config=config,
        tensors=tensors,
        dtype=out_dtype,
        sources={"input": folder},
        write_extras=write_extras,
        verify=lambda staging, atol: verify_qwen2_vl(staging, checkpoint, out_dtype, atol),
        card={
            "source": folder.name,
            "min_pixels": settings["min_pixels"],
            "max_pixels": settings["max_pixels"],
            "license": source_license(folder) or "other",
            "base_model": [folder.name],
        },
        checkpoints=[checkpoint],
    )
