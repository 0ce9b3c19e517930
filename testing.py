"""Tiny models for tests, demos and `nativevl export --tiny`: a byte-level tokenizer built in code (no download)
with Qwen2-VL's special tokens, a ~1M-parameter architecture over it, and a randomly initialised model + processor.

The tokenizer: every UTF-8 byte is one token, so any text round-trips, and the special tokens carry the same
strings as Qwen2-VL's so prompts and chat templates are the same. It needs the `tokenizers` package, which is why
this module lives outside the remote-code folders.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nativevl.modeling import NativeVLConfig, NativeVLForConditionalGeneration
from nativevl.processing import NativeVLImageProcessor, NativeVLProcessor
from nativevl.processing.processing_nativevl import QWEN2_VL_SPECIAL_TOKENS


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (vocab 270): ids 0-255 are bytes, then `QWEN2_VL_SPECIAL_TOKENS`.

    `<|endoftext|>` pads, on the left (a batch of prompts then generates as each prompt alone: `pipeline`'s
    batching pads on the tokenizer's side), `<|im_end|>` ends a turn (eos). Its `image_token_id` etc. are found by
    `convert_tokens_to_ids`.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(QWEN2_VL_SPECIAL_TOKENS)  # ids 256.. in Qwen2-VL's order
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=[t for t in QWEN2_VL_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )


def tiny_config(
    tokenizer,
    position_scheme: str = "mrope",
    projector_type: str = "merger",
    vision: dict | None = None,
    granularity: int | None = None,
    **text,
) -> NativeVLConfig:
    """A tiny architecture (~1M parameters) over `tokenizer`'s vocabulary and vision token ids; `vision` and
    `text` override fields of the vision and text configs (a `merger` projector follows the text width);
    `granularity` levels add a small AVG-LLaVA router (4 heads, FFN 128, 8 instruction tokens)."""
    ids = dict(
        zip(
            ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"),
            tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]),
            strict=True,
        )
    )
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_config.update(text)
    vision_hidden = text_config["hidden_size"] if projector_type == "merger" else 96
    vision_config = dict(depth=2, embed_dim=64, hidden_size=vision_hidden, num_heads=4, mlp_ratio=2)
    vision_config.update(vision or {})
    return NativeVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        projector_type=projector_type,
        position_scheme=position_scheme,
        **ids,
        **(
            dict(granularity=granularity, router_top_k=8, router_num_heads=4, router_intermediate_size=128)
            if granularity is not None
            else {}
        ),
    )


def build_tiny(
    seed: int = 0,
    position_scheme: str = "mrope",
    projector_type: str = "merger",
    max_pixels: int = 448 * 448,
    granularity: int | None = None,
    vision: dict | None = None,
    **text,
) -> tuple[NativeVLForConditionalGeneration, NativeVLProcessor]:
    """A randomly initialised tiny model and its processor (byte-level tokenizer with Qwen2-VL's special tokens);
    `granularity` levels add the AVG-LLaVA router; `vision` and `text` override config fields (`tiny_config`)."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(tokenizer, position_scheme, projector_type, vision=vision, granularity=granularity, **text)
    model = NativeVLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = NativeVLImageProcessor(max_pixels=max_pixels)
    return model, NativeVLProcessor(image_processor, tokenizer, position_scheme=position_scheme)
