"""Qwen2-family LLMs (transformers' `Qwen2ForCausalLM`: `model.*`, `lm_head.*`) as nativevl's text decoder.

nativevl's decoder is transformers' Qwen2-VL text model, which is Qwen2 with M-RoPE. With all three M-RoPE sections
given the same position (nativevl's `position_scheme="1d"`) it is exactly Qwen2's plain RoPE, so a Qwen2 config
maps to `NativeVLTextConfig` field by field, plus an `mrope_section` split of the rotary channels.
"""

import dataclasses

from transformers import PreTrainedConfig, Qwen2Config

from nativevl.conversion.keymap import ROTARY_BUFFER_RULES, KeyTable
from nativevl.modeling import NativeVLTextConfig


# Qwen2ForCausalLM checkpoint -> nativevl.
QWEN2_LLM_KEY_TABLE: KeyTable = ROTARY_BUFFER_RULES + [
    (r"model\.(embed_tokens|layers|norm)\.(.+)", r"model.language_model.\1.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
# Architecture fields of NativeVLTextConfig (those it adds to PreTrainedConfig's generic ones).
TEXT_FIELDS = tuple(
    sorted(
        {f.name for f in dataclasses.fields(NativeVLTextConfig)}
        - {f.name for f in dataclasses.fields(PreTrainedConfig)}
    )
)
CONFIG_KEYS_NOT_QWEN2 = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


def plain_mrope_section(head_dim: int) -> list[int]:
    """An M-RoPE split (temporal, height, width) of head_dim / 2 rotary pairs, in Qwen2-VL's proportions
    ([16, 24, 24] for head dim 128). With 1-D positions any split gives plain RoPE; this one keeps the folder usable
    with M-RoPE too."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def text_config_from_qwen2(config_dict: dict, vocab_size: int | None = None) -> dict:
    """A `NativeVLTextConfig` dict from a Qwen2 config.json dict (extra fields, e.g. LLaVA's `mm_*`, are dropped).

    `vocab_size` overrides the config's (the number of embedding rows actually stored)."""
    qwen2 = Qwen2Config(**{k: v for k, v in config_dict.items() if k not in CONFIG_KEYS_NOT_QWEN2})
    source = qwen2.to_dict()
    text = {name: source[name] for name in TEXT_FIELDS if name in source}
    head_dim = getattr(qwen2, "head_dim", None) or qwen2.hidden_size // qwen2.num_attention_heads
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})
    rope.setdefault("mrope_section", plain_mrope_section(head_dim))
    text["rope_parameters"] = rope
    if vocab_size is not None:
        text["vocab_size"] = int(vocab_size)
    return text
