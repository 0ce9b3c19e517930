"""NativeRes-LLaVA (`LlavaQwenForCausalLM`, arXiv 2506.12776) -> nativevl with plain 1-D positions.

Source structure, as released (github.com/Niujunbo2002/NativeRes-LLaVA, `llava/model/llava_arch.py` and
`llava/model/multimodal_encoder/qwen_encoder.py`): transformers' `Qwen2VisionTransformerPretrainedModel` (Qwen2-VL's
ViT with its 2x2 merger) wrapped twice as `model.vision_tower.vision_tower`, LLaVA's `mlp2x_gelu` projector
`model.mm_projector = Sequential(Linear, GELU, Linear)`, and a Qwen2 LLM (`model.embed_tokens|layers|norm`,
`lm_head`) that sees the image features in place of an `<image>` placeholder, with positions 0..L-1.

Two variants, told apart by their keys:

- `merger_mlp` (the released checkpoints): the tower keeps its merger (output `mm_hidden_size`, 1536 for
  Qwen2-VL-2B's ViT); `mm_projector.{0,2}` -> `model.multi_modal_projector.linear_{1,2}`.
- `merger`: the tower has no merger and Qwen2-VL's merger itself is the projector, `mm_projector.{ln_q,mlp.0,mlp.2}`
  -> `model.visual.merger.{ln_q,mlp.0,mlp.2}`, its output the LLM width.

The ViT's own config (depth, width, heads, merger width) is not in the LLaVA config.json; it comes from the Qwen2-VL
folder the ViT was taken from (`--vision`). Every embedding row is kept (152064 in the 7B release). nativevl needs
real token ids for its placeholders where LLaVA splices features at a -200 marker: `<|image_pad|>` and friends,
read from the checkpoint's tokenizer files, else Qwen2's ids (see `checkpoint.vision_token_ids`).
"""

from pathlib import Path

import torch

from nativevl.conversion.checkpoint import (
    VISION_TOKENS,
    ConversionError,
    SourceCheckpoint,
    added_tokens,
    read_json,
    source_license,
    vision_token_ids,
)
from nativevl.conversion.convert import ConversionPlan
from nativevl.conversion.keymap import ROTARY_BUFFER_RULES, KeyTable
from nativevl.conversion.qwen2 import text_config_from_qwen2
from nativevl.conversion.qwen2_vl import load_qwen2_vl_config, vision_config_dict
from nativevl.conversion.verify import verify_llava_style
from nativevl.conversion.writer import (
    copy_files,
    map_checkpoint,
    write_generation_config,
    write_processor_config,
)
from nativevl.modeling import NativeVLConfig


TOWER = r"model\.vision_tower\.vision_tower\."
NATIVERES_LLAVA_KEY_TABLE: KeyTable = ROTARY_BUFFER_RULES + [
    (TOWER + r"(patch_embed\.proj\.weight)", r"model.visual.\1"),
    (
        TOWER + r"(blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias))",
        r"model.visual.\1",
    ),
    (TOWER + r"(merger\.(?:ln_q|mlp\.0|mlp\.2)\.(?:weight|bias))", r"model.visual.\1"),
    (r"model\.mm_projector\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"model\.mm_projector\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"model\.mm_projector\.(ln_q|mlp\.0|mlp\.2)\.(weight|bias)", r"model.visual.merger.\1.\2"),
    (r"model\.(embed_tokens|layers|norm)\.(.+)", r"model.language_model.\1.\2"),
    (r"lm_head\.weight", r"lm_head.weight"),
]
# The prompt format NativeRes-LLaVA was trained with (LLaVA's `qwen_1_5` ChatML conversation, `<image>\n` before the
# text of the turn), with `<|image_pad|>` in place of `<image>`: the processor expands it to one token per image
# token. No vision start/end tokens: the release never saw them. The source's own template is text-only.
NATIVERES_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '<|image_pad|>\\n' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{ '<|video_pad|>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# The released vision tower's defaults for the image token budget (`mm_min_image_token`, `mm_max_image_token`).
DEFAULT_MIN_IMAGE_TOKENS = 4
DEFAULT_MAX_IMAGE_TOKENS = 2048


def projector_variant(keys: list[str]) -> str:
    """`"merger_mlp"` (mm_projector.{0,2}) or `"merger"` (mm_projector.{ln_q,mlp.0,mlp.2}), from the keys."""
    projector = sorted(k for k in keys if k.startswith("model.mm_projector."))
    mlp = any(k.startswith("model.mm_projector.0.") for k in projector)
    merger = any(k.startswith("model.mm_projector.ln_q.") for k in projector)
    if mlp == merger:
        raise ConversionError(
            f"cannot tell the projector variant from the mm_projector keys {projector[:10]}: expected "
            f"mm_projector.{{0,2}}.* (mlp2x_gelu) or mm_projector.{{ln_q,mlp.0,mlp.2}}.* (Qwen2-VL merger)"
        )
    return "merger_mlp" if mlp else "merger"


def config_from_nativeres_llava(
    source: dict, vision: dict, checkpoint: SourceCheckpoint, token_ids: dict[str, int]
) -> NativeVLConfig:
    """The NativeVLConfig of a NativeRes-LLaVA checkpoint: its config.json (`source`), the ViT's vision config
    (`vision`, from the Qwen2-VL folder), the stored embedding rows and the placeholder token ids."""
    variant = projector_variant(checkpoint.keys())
    vocab_size = checkpoint.shape("model.embed_tokens.weight")[0]
    text = text_config_from_qwen2(source, vocab_size)
    vision = dict(vision)
    projector_hidden_size = None
    if variant == "merger_mlp":
        if source.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ConversionError(
                f"mm_projector_type {source['mm_projector_type']!r} is not supported; nativevl has mlp2x_gelu"
            )
        mm_hidden = source.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != vision["hidden_size"]:
            raise ConversionError(
                f"mm_hidden_size {mm_hidden} of the checkpoint differs from the ViT merger width "
                f"vision_config.hidden_size {vision['hidden_size']} of the --vision folder"
            )
        hidden = checkpoint.shape("model.mm_projector.0.weight")[0]
        projector_hidden_size = None if hidden == text["hidden_size"] else hidden
    else:
        vision["hidden_size"] = text["hidden_size"]  # the merger is the projector: it maps to the LLM width
    return NativeVLConfig(
        text_config=text,
        vision_config=vision,
        projector_type=variant,
        projector_hidden_size=projector_hidden_size,
        position_scheme="1d",
        tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
        **token_ids,
    )


def plan_nativeres_llava(
    input_folder: str | Path,
    vision_folder: str | Path,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> ConversionPlan:
    """Plans `nativevl convert nativeres-llava`: an original NativeRes-LLaVA folder (+ the Qwen2-VL folder of its
    ViT, for the vision config) -> nativevl with `position_scheme="1d"`.

    Tokenizer files and generation_config.json are copied from the checkpoint, the chat template is LLaVA's
    `qwen_1_5` prompt format (`NATIVERES_CHAT_TEMPLATE`); the image processor gets the checkpoint's
    `mm_min_image_token` / `mm_max_image_token` (default 4 / 2048) times (patch * merge)^2 pixels.
    """
    folder, vision_folder = Path(input_folder), Path(vision_folder)
    source = read_json(folder / "config.json")
    vision = vision_config_dict(load_qwen2_vl_config(vision_folder))
    checkpoint = SourceCheckpoint(folder, allow_pickle=allow_pickle)
    token_ids = vision_token_ids(folder)
    config = config_from_nativeres_llava(source, vision, checkpoint, token_ids)
    table = NATIVERES_LLAVA_KEY_TABLE
    if config.tie_word_embeddings:
        table = [(r"lm_head\.weight", None)] + table
    tensors = map_checkpoint(checkpoint, table, "input")
    out_dtype = dtype or checkpoint.main_dtype()
    pixels_per_token = (config.vision_config.patch_size * config.vision_config.spatial_merge_size) ** 2
    min_pixels = int(source.get("mm_min_image_token", DEFAULT_MIN_IMAGE_TOKENS)) * pixels_per_token
    max_pixels = int(source.get("mm_max_image_token", DEFAULT_MAX_IMAGE_TOKENS)) * pixels_per_token

    def write_extras(staging: Path) -> None:
        copy_files(folder, staging)
        (staging / "chat_template.jinja").write_text(NATIVERES_CHAT_TEMPLATE, encoding="utf-8")
        write_generation_config(staging, config, folder)
        write_processor_config(staging, config, min_pixels, max_pixels)

    def verify(staging: Path, atol: float) -> dict[str, float]:
        return verify_llava_style(staging, tensors, config, out_dtype, checkpoint, source, atol)

    in_tokenizer = sum(text in added_tokens(folder) for text in VISION_TOKENS.values())
    found = f"{in_tokenizer} of 4 read from the checkpoint's tokenizer files, the others Qwen2's ids"
    variant = (
        "its merger, the `mlp2x_gelu` projector (Linear-GELU-Linear)"
        if config.projector_type == "merger_mlp"
        else "Qwen2-VL's merger serving as the projector"
    )
    return ConversionPlan(
        family="nativeres_llava",
        config=config,
        tensors=tensors,
        dtype=out_dtype,
        sources={"input": folder, "vision": vision_folder},
        write_extras=write_extras,
        verify=verify,
        card={
            "source": folder.name,
            "vision_source": vision_folder.name,
            "variant": variant,
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "token_note": f"`<|image_pad|>` = {config.image_token_id}, `<|video_pad|>` = {config.video_token_id}, "
            f"`<|vision_start|>` = {config.vision_start_token_id}, `<|vision_end|>` = {config.vision_end_token_id} "
            f"({found}); the release's prompts have no vision start/end tokens.",
            "license": source_license(folder) or "other",
            "base_model": [folder.name],
        },
        checkpoints=[checkpoint],
    )
