"""nativevl.modeling: configurations and models (remote-code files, copied flat into exported folders)."""

from .attention_nativevl import register_attention
from .configuration_nativevl import NativeVLConfig, NativeVLTextConfig, NativeVLVisionConfig
from .generation_nativevl import NativeVLGenerateOutput
from .granularity_nativevl import NativeVLGranularityRouter, compact_image_placeholders, pool_grid
from .modeling_nativevl import (
    NativeVLForConditionalGeneration,
    NativeVLModel,
    NativeVLPreTrainedModel,
    NativeVLTextModel,
)
from .positions_nativevl import level_grid, rope_index
from .vision_nativevl import NativeVLVisionModel


def register_auto_classes() -> None:
    """Registers the configs with `AutoConfig` and the models with `AutoModel` / `AutoModelForImageTextToText`,
    and marks the classes for export so `save_pretrained` writes `auto_map` and the remote-code files."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    register_attention()

    for config_class in (NativeVLConfig, NativeVLTextConfig, NativeVLVisionConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(NativeVLConfig, NativeVLModel, exist_ok=True)
    AutoModelForImageTextToText.register(NativeVLConfig, NativeVLForConditionalGeneration, exist_ok=True)
    NativeVLConfig.register_for_auto_class("AutoConfig")
    NativeVLModel.register_for_auto_class("AutoModel")
    NativeVLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


__all__ = [
    "NativeVLConfig",
    "NativeVLForConditionalGeneration",
    "NativeVLGenerateOutput",
    "NativeVLGranularityRouter",
    "NativeVLModel",
    "NativeVLPreTrainedModel",
    "NativeVLTextConfig",
    "NativeVLTextModel",
    "NativeVLVisionConfig",
    "NativeVLVisionModel",
    "compact_image_placeholders",
    "level_grid",
    "pool_grid",
    "register_attention",
    "register_auto_classes",
    "rope_index",
]
