"""Processors for nativevl: remote-code files, each importable on its own from a flat model folder."""

from .image_processing_nativevl import NativeVLImageProcessor
from .processing_nativevl import CHAT_TEMPLATE, NativeVLProcessor, mrope_position_ids
from .resize_nativevl import smart_resize


def register_auto_classes(config_class) -> None:
    """Registers the image processor and processor with `AutoImageProcessor` / `AutoProcessor` for `config_class`
    and marks them for export, so `save_pretrained` writes `auto_map` and copies their remote-code files."""
    from transformers import AutoImageProcessor, AutoProcessor

    AutoImageProcessor.register(config_class, slow_image_processor_class=NativeVLImageProcessor, exist_ok=True)
    AutoProcessor.register(config_class, NativeVLProcessor, exist_ok=True)
    NativeVLImageProcessor.register_for_auto_class("AutoImageProcessor")
    NativeVLProcessor.register_for_auto_class("AutoProcessor")


__all__ = [
    "CHAT_TEMPLATE",
    "NativeVLImageProcessor",
    "NativeVLProcessor",
    "mrope_position_ids",
    "register_auto_classes",
    "smart_resize",
]
