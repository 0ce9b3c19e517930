"""Qwen2-VL (transformers' `Qwen2VLForConditionalGeneration`) -> nativevl, `projector_type="merger"`, M-RoPE.

nativevl keeps Qwen2-VL's parameter names, so the key table is an identity over the three parts; it still runs
strictly so that a renamed or extra parameter in a future transformers release fails loudly.
"""

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from nativevl.conversion.keymap import KeyTable, check_coverage, map_keys
from nativevl.modeling import NativeVLConfig, NativeVLForConditionalGeneration


# transformers >= 4.52 layout (model.visual / model.language_model / lm_head), and the older flat layout.
QWEN2_VL_KEY_TABLE: KeyTable = [
    (r"model\.visual\.(.+)", r"model.visual.\1"),
    (r"model\.language_model\.(.+)", r"model.language_model.\1"),
    (r"visual\.(.+)", r"model.visual.\1"),
    (r"model\.(embed_tokens|layers|norm)(.*)", r"model.language_model.\1\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
]


def config_from_qwen2_vl(config: Qwen2VLConfig) -> NativeVLConfig:
    """The equivalent NativeVLConfig: same vision and text hyper-parameters and special token ids."""
    text = config.text_config.to_dict()
    vision = config.vision_config.to_dict()
    for sub in (text, vision):
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            sub.pop(key, None)
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
