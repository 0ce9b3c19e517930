"""nativevl.conversion: checkpoints of other formats to nativevl, checked by a strict key table.

`nativevl convert` (`nativevl.conversion.cli.main`) plans a conversion from configs and safetensors headers
(`plan_qwen2_vl`, `plan_nativeres_llava`, `plan_compose`, and `plan_to_qwen2_vl` for the way back to a stock
transformers Qwen2-VL folder), writes it with `run_conversion` (streamed shards, complete-or-absent folder,
verification against the source, model card) and `from_qwen2_vl` converts a model in memory.
"""

from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint, vision_token_ids
from nativevl.conversion.compose import plan_compose
from nativevl.conversion.convert import ConversionPlan, run_conversion
from nativevl.conversion.keymap import check_coverage, map_keys
from nativevl.conversion.model_card import render_model_card
from nativevl.conversion.nativeres_llava import NATIVERES_LLAVA_KEY_TABLE, plan_nativeres_llava
from nativevl.conversion.qwen2_vl import (
    QWEN2_VL_KEY_TABLE,
    config_from_qwen2_vl,
    convert_state_dict,
    from_qwen2_vl,
    plan_qwen2_vl,
)
from nativevl.conversion.to_qwen2_vl import TO_QWEN2_VL_KEY_TABLE, plan_to_qwen2_vl, qwen2_vl_config


__all__ = [
    "NATIVERES_LLAVA_KEY_TABLE",
    "QWEN2_VL_KEY_TABLE",
    "TO_QWEN2_VL_KEY_TABLE",
    "ConversionError",
    "ConversionPlan",
    "SourceCheckpoint",
    "check_coverage",
    "config_from_qwen2_vl",
    "convert_state_dict",
    "from_qwen2_vl",
    "map_keys",
    "plan_compose",
    "plan_nativeres_llava",
    "plan_qwen2_vl",
    "plan_to_qwen2_vl",
    "qwen2_vl_config",
    "render_model_card",
    "run_conversion",
    "vision_token_ids",
]
