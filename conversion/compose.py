"""A new nativevl model from parts: Qwen2-VL's ViT (with merger) + a projector + any Qwen2-family LLM.

This is NativeRes-LLaVA's recipe (arXiv 2506.12776) before training: the ViT and its merger come from a
Qwen2-VL folder (its LLM keys are dropped), the LLM and its tokenizer from a `Qwen2ForCausalLM` folder, and the
projector is new:

- `merger_mlp` (default): Linear(merger width -> LLM width) - GELU - Linear, initialised by nativevl's own
  `_init_weights` (normal(0, initializer_range) weights, zero biases) under a fixed `seed`.
- `merger`: no projector; the ViT's merger output must already be the LLM width.

The tokenizer gets Qwen2-VL's vision and grounding tokens when it lacks them (`<|vision_start|>`,
`<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`, `<|vision_pad|>`, box, quad and object-ref tokens); the embedding
(and an untied LM head) grows to the new vocabulary when needed, and the rows of the added tokens are set to the
mean of the existing rows. Positions default to plain 1-D, as NativeRes-LLaVA trains them.
"""

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer

from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint, read_json, source_license
from nativevl.conversion.convert import ConversionPlan
from nativevl.conversion.keymap import ROTARY_BUFFER_RULES, KeyTable
from nativevl.conversion.qwen2 import QWEN2_LLM_KEY_TABLE, text_config_from_qwen2
from nativevl.conversion.qwen2_vl import load_qwen2_vl_config, vision_config_dict
from nativevl.conversion.verify import verify_llava_style
from nativevl.conversion.writer import (
    TargetTensor,
    map_checkpoint,
    processor_settings,
    write_generation_config,
    write_processor_config,
)
from nativevl.modeling import NativeVLConfig, NativeVLForConditionalGeneration
from nativevl.modeling.modeling_nativevl import NativeVLProjector
from nativevl.processing.processing_nativevl import CHAT_TEMPLATE, QWEN2_VL_VISION_TOKENS


# Qwen2-VL's special tokens beyond Qwen2's ChatML ones, in Qwen2-VL's id order (151646..151656).
QWEN2_VL_SPECIAL_TOKENS = tuple(QWEN2_VL_VISION_TOKENS)
# A Qwen2-VL checkpoint, of which only the vision tower is kept.
COMPOSE_VISION_KEY_TABLE: KeyTable = ROTARY_BUFFER_RULES + [
    (r"(?:model\.)?visual\.(.+)", r"model.visual.\1"),
    (r"model\.language_model\..+", None),
    (r"model\.(?:embed_tokens|layers|norm)\..+", None),
    (r"lm_head\.weight", None),
]
TOKEN_ID_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def composed_tokenizer(llm_folder: str | Path):
    """The LLM's tokenizer with the missing Qwen2-VL special tokens added; returns (tokenizer, added tokens)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm_folder))
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load the LLM's tokenizer from {llm_folder}: {error}") from error
    vocab = tokenizer.get_vocab()
    missing = [token for token in QWEN2_VL_SPECIAL_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tokenizer, missing


def mean_filled_rows(table: torch.Tensor, rows: int, new_ids: list[int]) -> torch.Tensor:
    """`table` (old_rows, D) grown to (rows, D); appended rows and rows `new_ids` hold the mean of the old rows."""
    mean = table.float().mean(0).to(table.dtype)  # (D,)
    out = torch.empty((rows, *table.shape[1:]), dtype=table.dtype)
    out[: table.shape[0]] = table
    out[table.shape[0] :] = mean
    out[new_ids] = mean
    return out


def fresh_projector(config: NativeVLConfig, seed: int) -> dict[str, torch.Tensor]:
    """A new `merger_mlp` projector's tensors (float32), initialised by nativevl's `_init_weights` from `seed`."""
    with torch.device("meta"):
        model = NativeVLForConditionalGeneration(config)  # only for its _init_weights (reads config, no memory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = NativeVLProjector(config)
        projector.apply(model._init_weights)
    return {f"model.multi_modal_projector.{k}": v.detach() for k, v in projector.state_dict().items()}


def plan_compose(
    vision_folder: str | Path,
    llm_folder: str | Path,
    projector: str = "merger_mlp",
    position_scheme: str = "1d",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> ConversionPlan:
    """Plans `nativevl convert compose`: Qwen2-VL ViT + new projector + Qwen2-family LLM. The output dtype defaults
    to the LLM's."""
    vision_folder, llm_folder = Path(vision_folder), Path(llm_folder)
    vision = vision_config_dict(load_qwen2_vl_config(vision_folder))
    llm_config = read_json(llm_folder / "config.json")
    if llm_config.get("model_type") != "qwen2":
        raise ConversionError(
            f"{llm_folder}/config.json has model_type {llm_config.get('model_type')!r}; compose takes a Qwen2-family "
            f"LLM (model_type 'qwen2', Qwen2ForCausalLM)"
        )
    vision_checkpoint = SourceCheckpoint(vision_folder, allow_pickle=allow_pickle)
    llm_checkpoint = SourceCheckpoint(llm_folder, allow_pickle=allow_pickle)
    tokenizer, added = composed_tokenizer(llm_folder)
    old_rows = llm_checkpoint.shape("model.embed_tokens.weight")[0]
    rows = max(old_rows, len(tokenizer))
    new_ids = sorted(tokenizer.convert_tokens_to_ids(added))
    text = text_config_from_qwen2(llm_config, rows)
    if projector == "merger" and vision["hidden_size"] != text["hidden_size"]:
        raise ConversionError(
            f"--projector merger feeds the ViT merger straight into the LLM, but the merger's output width "
            f"(vision_config.hidden_size) is {vision['hidden_size']} and the LLM's hidden_size is "
            f"{text['hidden_size']}; use --projector merger_mlp"
        )
    config = NativeVLConfig(
        text_config=text,
        vision_config=vision,
        projector_type=projector,
        position_scheme=position_scheme,
        tie_word_embeddings=bool(llm_config.get("tie_word_embeddings", False)),
        **{name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKEN_ID_FIELDS.items()},
    )

    tensors = composed_tensors(vision_checkpoint, llm_checkpoint, config, rows, old_rows, new_ids, seed)
    out_dtype = dtype or llm_checkpoint.main_dtype()
    settings = processor_settings(vision_folder)

    def write_extras(staging: Path) -> None:
        # a text-only LLM's template cannot place images: the composed VLM gets nativevl's ChatML, which renders
        # image / video parts as Qwen2-VL does and marks assistant turns for assistant-only training
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)
        write_generation_config(staging, config, llm_folder)
        write_processor_config(staging, config, **settings)

    def verify(staging: Path, atol: float) -> dict[str, float]:
        limit = new_ids[0] if new_ids else None
        return verify_llava_style(staging, tensors, config, out_dtype, llm_checkpoint, llm_config, atol, limit)

    return ConversionPlan(
        family="composed",
        config=config,
        tensors=tensors,
        dtype=out_dtype,
        sources={"vision": vision_folder, "llm": llm_folder},
        write_extras=write_extras,
        verify=verify,
        card=composed_card(vision_folder, llm_folder, projector, seed, added, rows, old_rows, settings),
        checkpoints=[vision_checkpoint, llm_checkpoint],
    )


def composed_tensors(vision_checkpoint, llm_checkpoint, config, rows: int, old_rows: int, new_ids, seed: int):
    """The composed model's tensors: the ViT's and the LLM's through their key tables (the LM head dropped when
    tied), embedding rows grown to `rows` with the mean row at `new_ids`, and a fresh projector (`seed`)."""
    tensors = map_checkpoint(vision_checkpoint, COMPOSE_VISION_KEY_TABLE, "vision")
    llm_table = QWEN2_LLM_KEY_TABLE
    if config.tie_word_embeddings:
        llm_table = [(r"lm_head\.weight", None)] + llm_table
    tensors.update(map_checkpoint(llm_checkpoint, llm_table, "llm"))
    if new_ids or rows != old_rows:
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in tensors:
                source = tensors[key]
                tensors[key] = TargetTensor(
                    (rows, *source.shape[1:]),
                    lambda source=source: mean_filled_rows(source.load(), rows, new_ids),
                    f"{source.origin} (+{len(new_ids)} mean rows)",
                )
    if config.projector_type == "merger_mlp":
        for key, tensor in fresh_projector(config, seed).items():
            tensors[key] = TargetTensor(tuple(tensor.shape), lambda tensor=tensor: tensor, f"new (seed {seed})")
    return tensors


def composed_card(vision_folder: Path, llm_folder: Path, projector: str, seed: int, added, rows, old_rows, settings):
    """The model card fields of a composed folder (sources, projector, added tokens, pixel limits, licences)."""
    vision_license, llm_license = source_license(vision_folder), source_license(llm_folder)
    if vision_license is None or vision_license == llm_license:
        license_name = llm_license or "other"
    else:
        license_name = vision_license if llm_license is None else "other"
    return {
        "vision_source": vision_folder.name,
        "llm_source": llm_folder.name,
        "projector_note": (
            f"a new `mlp2x_gelu` projector (Linear-GELU-Linear, initialised with seed {seed})"
            if projector == "merger_mlp"
            else "no projector (the merger's output is the LLM width)"
        ),
        "new_tokens": (
            f"the LLM's, with {len(added)} token(s) added ({', '.join(f'`{t}`' for t in added)}); their embedding"
            f" rows are the mean of the existing rows, the vocabulary is {rows} rows (was {old_rows})"
            if added
            else "the LLM's, which already has Qwen2-VL's vision tokens"
        ),
        "min_pixels": settings["min_pixels"],
        "max_pixels": settings["max_pixels"],
        "licenses": f"vision tower {vision_license or 'unknown'}, LLM {llm_license or 'unknown'}",
        "license": license_name,
        "base_model": [vision_folder.name, llm_folder.name],
    }
