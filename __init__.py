"""nativevl: native-resolution vision-language models on the Hugging Face stack.

`import nativevl` registers the configuration, model, image processor and processor classes with transformers'
Auto classes, so `AutoModelForImageTextToText.from_pretrained(folder)` works on a nativevl folder without
`trust_remote_code` when the package is installed.
"""

from nativevl.modeling import (
    NativeVLConfig,
    NativeVLForConditionalGeneration,
    NativeVLModel,
    NativeVLPreTrainedModel,
    NativeVLTextConfig,
    NativeVLVisionConfig,
    register_auto_classes,
)
from nativevl.processing import NativeVLImageProcessor, NativeVLProcessor
from nativevl.processing import register_auto_classes as register_processor_classes


__version__ = "0.1.0"

register_auto_classes()
register_processor_classes(NativeVLConfig)

__all__ = [
    "NativeVLConfig",
    "NativeVLForConditionalGeneration",
    "NativeVLImageProcessor",
    "NativeVLModel",
    "NativeVLPreTrainedModel",
    "NativeVLProcessor",
    "NativeVLTextConfig",
    "NativeVLVisionConfig",
    "__version__",
]
