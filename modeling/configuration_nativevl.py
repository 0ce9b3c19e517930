"""Configurations of nativevl's native-resolution vision-language model.

Three configs, composed as transformers composes Qwen2-VL's (`models/qwen2_vl/configuration_qwen2_vl.py`):
`NativeVLVisionConfig` (the NaViT-style ViT with its 2x2 merger), `NativeVLTextConfig` (the Qwen2-family decoder)
and `NativeVLConfig`, which picks the projector and the LLM's position scheme:

- Qwen2-VL (arXiv 2409.12191): `projector_type="merger"`, `position_scheme="mrope"`.
- NativeRes-LLaVA (arXiv 2506.12776): `projector_type="merger_mlp"` (merger to its own width, then LLaVA's
  `mlp2x_gelu`), `position_scheme="1d"`.

Configs describe architecture only: no paths, hub ids, tokenizer names or learning rates.

This file is remote code: it is copied flat into a model folder and imports only transformers and the standard
library.
"""

import transformers
from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention): prompts, vision tokens, padding

# The transformers releases CI runs the test suite on (lowest and newest): the package's install range is
# >= TESTED_TRANSFORMERS[0] and below the next minor release after TESTED_TRANSFORMERS[1] (setup.cfg, checked by a
# test). A folder loaded under another release still loads, with one warning naming both.
TESTED_TRANSFORMERS = ("5.23.0", "5.25.0")


def _minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "5.24.0" or "5.25.0.dev0"."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def warn_if_untested_transformers(written_with: str | None = None) -> bool:
    """Warns once when the running transformers is outside the tested range; returns whether it is."""
    running = transformers.__version__
    low, high = (_minor(v) for v in TESTED_TRANSFORMERS)
    if low <= _minor(running) <= high:
        return False
    logger.warning_once(
        f"nativevl was tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}; this is "
        f"transformers {running}"
        + (f" (the folder was written with {written_with})" if written_with else "")
        + ": outputs may differ or fail"
    )
    return True


PROJECTOR_TYPES = ("merger", "merger_mlp")
POSITION_SCHEMES = ("mrope", "1d")


@strict
class NativeVLVisionConfig(Qwen2VLVisionConfig):
    """The vision tower: Conv3d patch embedding, pre-norm ViT blocks with 2D RoPE, 2x2 patch merger.

    Fields are Qwen2-VL's, so a Qwen2-VL `vision_config` loads as is:
    - `embed_dim`: ViT width (1280 in Qwen2-VL).
    - `hidden_size`: output width of the 2x2 merger. With `projector_type="merger"` it must equal the LLM width;
      with `"merger_mlp"` it is the merger's own width (1536 in NativeRes-LLaVA's ViT).
    - `patch_size` (pixels, 14), `temporal_patch_size` (frames per patch, 2; a still image is repeated),
      `spatial_merge_size` (2: 2x2 patches become one LLM token).
    - `rope_parameters["rope_theta"]`: base of the 2D RoPE (10000).
    """

    model_type = "nativevl_vision"
    base_config_key = "vision_config"


@strict
class NativeVLTextConfig(Qwen2VLTextConfig):
    """The Qwen2-family decoder (transformers' Qwen2-VL text model, reused as is).

    `rope_parameters["mrope_section"]` splits the rotary channels into (temporal, height, width) sections summing to
    head_dim / 2 ([16, 24, 24] for head dim 128). With the 1-D position scheme all three sections receive the same
    position, which is exactly plain RoPE, so one decoder serves both schemes.
    """

    model_type = "nativevl_text"
    base_config_key = "text_config"


@strict
class NativeVLConfig(PreTrainedConfig):
    """A native-resolution VLM: `vision_config` + projector + `text_config`.

    - `projector_type`: `"merger"` (Qwen2-VL: the merger maps straight to the LLM width) or `"merger_mlp"`
      (NativeRes-LLaVA: merger output -> Linear -> GELU -> Linear to the LLM width).
    - `projector_hidden_size`: hidden width of the `"merger_mlp"` projector; None means the LLM width (as in
      LLaVA's `mlp2x_gelu`).
    - `position_scheme`: `"mrope"` (temporal/height/width positions for vision tokens) or `"1d"` (positions
      0..L-1 for every token, as the released NativeRes-LLaVA checkpoints use).
    - `image_token_id`, `video_token_id`: placeholder tokens, one per LLM token of an image or video;
      `vision_start_token_id`, `vision_end_token_id`: the tokens around each image or video.
    - `granularity`: adaptive visual granularity (AVG-LLaVA, arXiv 2410.02745): the number of levels L, or None
      (off: no router). Level 0 is the full merged grid; each further level halves the tokens by average pooling,
      1x2 (width) then 2x1 (height) alternately, ceil mode. Images only; videos always use the full grid.
    - `router_top_k`: instruction tokens the router sees (the k LLM input embeddings of the prompt most
      cosine-similar to the mean image token; 32 in AVG-LLaVA).
    - `router_num_heads`, `router_intermediate_size`, `router_dropout`: the router's one Transformer encoder layer
      (width = LLM width, so heads must divide it); 8 heads and torch's default 2048-wide FFN as in the release.
    - `cascade_threshold` (nativevl's addition): `generate(granularity="cascade")` answers again on the full grid
      where the coarse answer has a token below this probability, unless a threshold is given; 0.9 by default
      (experiments/granularity/README.md), or chosen on a model's own items by
      `python -m nativevl.evaluation.calibrate`.
    """

    model_type = "nativevl"
    sub_configs_defaults = {"vision_config": NativeVLVisionConfig, "text_config": NativeVLTextConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    projector_type: str = "merger"
    projector_hidden_size: int | None = None
    projector_hidden_act: str = "gelu"
    position_scheme: str = "mrope"
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    granularity: int | None = None  # number of granularity levels L (router over levels 0..L-1); None: off
    router_top_k: int = 32  # instruction tokens per image fed to the router
    router_num_heads: int = 8  # heads of the router's encoder layer; must divide text_config.hidden_size
    router_intermediate_size: int = 2048  # FFN width of the router's encoder layer
    router_dropout: float = 0.0  # dropout inside the router's encoder layer
    cascade_threshold: float = 0.9  # generate(granularity="cascade")'s default fallback threshold

    def __post_init__(self, **kwargs):
        # Defaults give a consistent model: without a vision_config the merger maps straight to the LLM width.
        if self.vision_config is None:
            text = self.text_config
            width = text.get("hidden_size") if isinstance(text, dict) else getattr(text, "hidden_size", None)
            self.vision_config = {"hidden_size": width or NativeVLTextConfig().hidden_size}
        super().__post_init__(**kwargs)
        # As Qwen2VLConfig: configs saved before transformers 5 kept `tie_word_embeddings` inside text_config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        warn_if_untested_transformers(getattr(self, "transformers_version", None))

    def validate_architecture(self):
        """Checks the choices that shape the model; called by `__post_init__` through strict validation."""
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"position_scheme must be one of {POSITION_SCHEMES}, got {self.position_scheme!r}")
        if self.projector_type == "merger" and self.vision_config.hidden_size != self.text_config.hidden_size:
            raise ValueError(
                f"projector_type='merger' maps the merger straight to the LLM, so vision_config.hidden_size "
                f"({self.vision_config.hidden_size}) must equal text_config.hidden_size "
                f"({self.text_config.hidden_size}); use projector_type='merger_mlp' for different widths"
            )
        if self.granularity is not None:
            if self.granularity < 1:
                raise ValueError(f"granularity must be None or a number of levels >= 1, got {self.granularity}")
            if self.text_config.hidden_size % self.router_num_heads:
                raise ValueError(
                    f"router_num_heads ({self.router_num_heads}) must divide text_config.hidden_size "
                    f"({self.text_config.hidden_size})"
                )
            if self.router_top_k < 0:
                raise ValueError(f"router_top_k must be >= 0, got {self.router_top_k}")
        if not 0.0 <= self.cascade_threshold <= 1.0:
            raise ValueError(f"cascade_threshold is a probability in [0, 1], got {self.cascade_threshold}")


__all__ = ["NativeVLConfig", "NativeVLTextConfig", "NativeVLVisionConfig"]
