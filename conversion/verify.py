"""Checks that a converted nativevl folder computes what its source computes.

Every check loads the written folder back with `NativeVLForConditionalGeneration.from_pretrained` in float32 (a
strict load: any missing, unexpected or mismatched key fails) and compares it with an independent reference built
from the *source* files on the same small input (a random image grid with its placeholder tokens, and text).
References are run first and freed before the converted model is loaded, so at most one model is in memory.

When the output dtype is narrower than the source's, the reference's weights are rounded to the output dtype too,
so the comparison measures the conversion (names, layouts, code) and not the rounding; the rounding's own effect is
reported separately for Qwen2-VL sources.

- Qwen2-VL: logits against transformers' `Qwen2VLForConditionalGeneration.from_pretrained(source)`.
- NativeRes-LLaVA and composed models (no published reference implementation is importable): every converted
  tensor equals its source tensor (so embedding rows are reproduced), a text-only forward equals transformers'
  `Qwen2ForCausalLM` built from the LLM part of the source, the vision tower's output equals transformers'
  `Qwen2VisionTransformerPretrainedModel` with the same weights, and an image + text forward is finite.
"""

import re

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration
from transformers.initialization import no_init_weights
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint
from nativevl.conversion.qwen2 import CONFIG_KEYS_NOT_QWEN2
from nativevl.modeling import NativeVLConfig, NativeVLForConditionalGeneration


DEFAULT_ATOL = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# Keys of a Qwen2ForCausalLM checkpoint: the decoder and the head.
QWEN2_LLM_KEY = re.compile(r"(model\.(?:embed_tokens|layers|norm)\..+|lm_head\.weight)")


def default_atol(dtype: torch.dtype) -> float:
    return DEFAULT_ATOL.get(dtype, 1e-3)


def verification_batch(
    config: NativeVLConfig, image: bool = True, seed: int = 0, text_id_limit: int | None = None
) -> dict[str, torch.Tensor]:
    """A one-sample batch: 8 text tokens, vision_start, the placeholders of one (1, 2m, 2m) image grid, vision_end,
    8 text tokens (m = spatial merge size); with `image=False`, 24 text tokens only. Text ids are drawn below the
    smallest vision token id, the vocabulary size and `text_id_limit`, so they are ordinary tokens."""
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    special = (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    high = min(config.text_config.vocab_size, *special, text_id_limit or config.text_config.vocab_size)
    if not image:
        return {"input_ids": torch.randint(0, high, (1, 24), generator=generator)}
    side = 2 * vision.spatial_merge_size
    grid = torch.tensor([[1, side, side]])
    n_tokens = side * side // vision.spatial_merge_size**2
    text = torch.randint(0, high, (16,), generator=generator).tolist()
    ids = text[:8] + [config.vision_start_token_id] + [config.image_token_id] * n_tokens
    ids += [config.vision_end_token_id] + text[8:]
    row = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(side * side, row, generator=generator)  # (patches, C*T*P*P)
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixel_values, "image_grid_thw": grid}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def round_weights_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Rounds every floating parameter to `dtype` and back to float32, in place."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(parameter.to(dtype).float())


def load_converted(folder) -> NativeVLForConditionalGeneration:
    """The converted folder loaded in float32 for checking; fails on any loading irregularity."""
    model, info = NativeVLForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    problems = {name: sorted(keys)[:20] for name, keys in info.items() if keys and name != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"the converted folder does not load cleanly: {problems} {info.get('error_msgs')}")
    return model.eval()


def check(measured: dict[str, float], atol: float) -> dict[str, float]:
    """Prints the measured max abs differences and raises ConversionError for any above atol."""
    for name, value in measured.items():
        print(f"verify: {name}: max abs diff {value:.3e} (atol {atol:g})")
    failed = {name: value for name, value in measured.items() if not value <= atol}  # NaN fails too
    if failed:
        raise ConversionError(f"verification failed, max abs diff above atol {atol:g}: {failed}")
    return measured


@torch.no_grad()
def verify_qwen2_vl(folder, source_folder, dtype: torch.dtype, atol: float) -> dict[str, float]:
    """Logits of the converted model vs transformers' Qwen2-VL loaded from the source folder, one image + text."""
    reference = Qwen2VLForConditionalGeneration.from_pretrained(source_folder, dtype=torch.float32).eval()
    config = reference.config
    batch = verification_batch(_nativevl_view(config))
    token_types = torch.zeros_like(batch["input_ids"])  # transformers wants the token types: 1 marks image tokens
    token_types[batch["input_ids"] == config.image_token_id] = 1
    expected = unrounded = reference(**batch, mm_token_type_ids=token_types).logits
    if dtype != torch.float32:
        round_weights_(reference, dtype)
        expected = reference(**batch, mm_token_type_ids=token_types).logits
    del reference
    got = load_converted(folder)(**batch).logits
    measured = {"logits vs transformers Qwen2VLForConditionalGeneration": max_abs_diff(got, expected)}
    if dtype != torch.float32:
        print(f"verify: rounding the weights to {dtype} moves the logits by up to {max_abs_diff(got, unrounded):.3e}")
    return check(measured, atol)


def _nativevl_view(config) -> NativeVLConfig:
    """The fields `verification_batch` reads, from a transformers Qwen2VLConfig."""
    from nativevl.conversion.qwen2_vl import config_from_qwen2_vl

    return config_from_qwen2_vl(config)


def qwen2_reference(checkpoint: SourceCheckpoint, config_dict: dict, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """transformers' `Qwen2ForCausalLM` (float32, weights rounded to `dtype`) holding the LLM tensors of a source
    checkpoint (`model.embed_tokens|layers|norm.*`, `lm_head.weight`; other keys are not the LLM's)."""
    fields = {k: v for k, v in config_dict.items() if k not in CONFIG_KEYS_NOT_QWEN2}
    keys = {k: k for k in checkpoint.keys() if QWEN2_LLM_KEY.fullmatch(k) and not k.endswith(".inv_freq")}
    config = Qwen2Config(**fields)
    config.vocab_size = checkpoint.shape(keys["model.embed_tokens.weight"])[0]
    with no_init_weights():
        model = Qwen2ForCausalLM(config)
    state = {k: checkpoint.get(source).to(dtype).float() for k, source in keys.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ConversionError(
            f"the source LLM does not fit Qwen2ForCausalLM: missing {missing}, unexpected {unexpected}"
        )
    return model.eval()


def vision_reference(
    tensors: dict, config: NativeVLConfig, dtype: torch.dtype
) -> Qwen2VisionTransformerPretrainedModel:
    """transformers' Qwen2-VL ViT (with merger) holding the converted model's `model.visual.*` source tensors."""
    fields = config.vision_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "dtype"):
        fields.pop(key, None)
    with no_init_weights():
        model = Qwen2VisionTransformerPretrainedModel._from_config(Qwen2VLVisionConfig(**fields))
    prefix = "model.visual."
    state = {k[len(prefix) :]: t.load().to(dtype).float() for k, t in tensors.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@torch.no_grad()
def verify_llava_style(
    folder,
    tensors: dict,
    config: NativeVLConfig,
    dtype: torch.dtype,
    llm_checkpoint: SourceCheckpoint,
    llm_config: dict,
    atol: float,
    text_id_limit: int | None = None,
) -> dict[str, float]:
    """The checks for NativeRes-LLaVA and composed models (see the module docstring). `tensors` are the plan's
    target tensors (target key -> TargetTensor), re-read from the source to compare with what was written.
    `text_id_limit`: the first token id whose embedding / head row the conversion set (compose's added tokens);
    the text-only check uses text ids and compares logit columns below it."""
    text_batch = verification_batch(config, image=False, text_id_limit=text_id_limit)
    image_batch = verification_batch(config)

    reference = qwen2_reference(llm_checkpoint, llm_config, dtype)
    text_expected = reference(**text_batch).logits  # (1, 24, source vocab)
    del reference
    vit = vision_reference(tensors, config, dtype)
    vision_expected = vit(image_batch["pixel_values"], grid_thw=image_batch["image_grid_thw"]).pooler_output
    del vit

    model = load_converted(folder)
    state = model.state_dict()
    differing, largest = [], 0.0
    for key, target in tensors.items():
        diff = max_abs_diff(state[key], target.load().to(dtype).float()) if state[key].numel() else 0.0
        if diff != 0.0:
            differing.append(key)
        largest = max(largest, diff)
    if differing:
        raise ConversionError(f"{len(differing)} converted tensor(s) differ from their source: {differing[:20]}")
    columns = min(text_expected.shape[-1], text_id_limit or text_expected.shape[-1])  # rows >= limit were changed
    text_got, text_expected = model(**text_batch).logits[..., :columns], text_expected[..., :columns]
    vision_got = model.model.visual(image_batch["pixel_values"], image_batch["image_grid_thw"]).pooler_output
    logits = model(**image_batch).logits
    if not bool(torch.isfinite(logits).all()):
        raise ConversionError("the image + text forward of the converted model gives non-finite logits")
    return check(
        {
            f"all {len(tensors)} tensors vs their source tensors (embedding rows included)": largest,
            "text-only logits vs transformers Qwen2ForCausalLM": max_abs_diff(text_got, text_expected),
            "vision features vs transformers Qwen2VisionTransformerPretrainedModel": max_abs_diff(
                vision_got, vision_expected
            ),
        },
        atol,
    )
