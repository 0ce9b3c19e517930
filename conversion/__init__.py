"""nativevl.conversion: checkpoints of other formats to nativevl, checked by a strict key table."""

from nativevl.conversion.keymap import check_coverage, map_keys
from nativevl.conversion.qwen2_vl import QWEN2_VL_KEY_TABLE, config_from_qwen2_vl, convert_state_dict, from_qwen2_vl


__all__ = [
    "QWEN2_VL_KEY_TABLE",
    "check_coverage",
    "config_from_qwen2_vl",
    "convert_state_dict",
    "from_qwen2_vl",
    "map_keys",
]
