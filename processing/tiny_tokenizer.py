"""A byte-level tokenizer built in code, with Qwen2-VL's special tokens: no download, 256 byte tokens + specials.

Used for tiny test and demo models (`nativevl export --tiny`): every UTF-8 byte is one token, so any text
round-trips, and the special tokens carry the same strings as Qwen2-VL's so prompts and chat templates are the same.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


# Qwen2's ChatML tokens, then the ones Qwen2-VL adds (ids 151646..151656 in Qwen2-VL), in Qwen2-VL's order.
QWEN2_CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_VL_VISION_TOKENS = [
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN2_VL_SPECIAL_TOKENS = QWEN2_CHATML_TOKENS + QWEN2_VL_VISION_TOKENS


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
