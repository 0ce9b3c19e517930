"""Checks that a converted nativevl folder computes what its source computes.

Every check runs the written folder in float32 (its config.json through `NativeVLConfig.from_pretrained`, its weights
loaded strictly: any missing, unexpected or mismatched key fails) and compares it with an independent reference built
from the *source* files on the same small input (a random image grid with its placeholder tokens, and text).

Models are built on the meta device and run layer by layer (`nativevl.conversion.layerwise`): one unit's float32
weights (a decoder layer, a ViT block, the embedding) are read from disk before its forward and dropped after it, so
verifying a 7B conversion needs about one embedding table of memory, not a model in float32 (4x a bf16 checkpoint).

When the output dtype is narrower than the source's, the reference's weights are rounded to the output dtype too,
so the comparison measures the conversion (names, layouts, code) and not the rounding; the rounding's own effect is
reported separately for Qwen2-VL sources.

- Qwen2-VL: logits against transformers' `Qwen2VLForConditionalGeneration.from_pretrained(source)`.
- NativeRes-LLaVA and composed models (no published reference implementation is importable): every converted
  tensor equals its source tensor (so embedding rows are reproduced), a text-only forward equals transformers'
  `Qwen2ForCausalLM` built from the LLM part of the source, the vision tower's output equals transformers'
  `Qwen2VisionTransformerPretrainedModel` with the same weights, and an image + text forward is finite.
- nativevl -> stock Qwen2-VL (`to-qwen2-vl`), the other way round: the written folder, read through transformers'
  Auto classes without remote code, against the nativevl source: logits and greedy tokens on three images of different
  sizes and a video, and transformers' processor against nativevl's (`processor_parity`).
"""

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, rename_source_key
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from nativevl.conversion.checkpoint import ConversionError, SourceCheckpoint
from nativevl.conversion.layerwise import layerwise, on_meta
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


# name -> (shape, reader): the weights a layer-by-layer model reads (see `layerwise`).
WeightSource = dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]


def rounded(load: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """A reader of the same tensor rounded to `dtype` (floating tensors; others unchanged)."""
    return lambda: (lambda t: t.to(dtype) if t.is_floating_point() else t)(load())


def checkpoint_weights(checkpoint: SourceCheckpoint, names: dict[str, str]) -> WeightSource:
    """{name: (shape, reader)} for {name: checkpoint key}."""
    return {name: (checkpoint.shape(key), lambda key=key: checkpoint.get(key)) for name, key in names.items()}


def run_layerwise(model: torch.nn.Module, weights: WeightSource, label: str, call: Callable):
    """`call(model)` with `model` (built on meta) reading its float32 weights from `weights` unit by unit."""
    shapes = {name: shape for name, (shape, _) in weights.items()}
    with layerwise(model, shapes, lambda name: weights[name][1](), label):
        return call(model)


def tie(weights: WeightSource, model: torch.nn.Module) -> WeightSource:
    """Adds the tied names of `model` (`_tied_weights_keys`, e.g. lm_head.weight -> the embedding) to `weights`."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", False) and not getattr(
        model.config.get_text_config(), "tie_word_embeddings", False
    ):
        return weights
    return {**weights, **{target: weights[source] for target, source in tied.items() if source in weights}}


def converted_model(folder) -> tuple[NativeVLForConditionalGeneration, WeightSource]:
    """The converted folder as a meta model (config.json read by `NativeVLConfig.from_pretrained`) and its weights
    in float32, read from its safetensors files; the strict key and shape check happens when it runs."""
    config = NativeVLConfig.from_pretrained(folder)
    model = on_meta(lambda: NativeVLForConditionalGeneration(config))
    checkpoint = SourceCheckpoint(folder)
    weights = checkpoint_weights(checkpoint, {key: key for key in checkpoint.keys()})
    return model, tie(weights, model)


def check(measured: dict[str, float], atol: float) -> dict[str, float]:
    """Prints the measured max abs differences and raises ConversionError for any above atol."""
    for name, value in measured.items():
        print(f"verify: {name}: max abs diff {value:.3e} (atol {atol:g})")
    failed = {name: value for name, value in measured.items() if not value <= atol}  # NaN fails too
    if failed:
        raise ConversionError(f"verification failed, max abs diff above atol {atol:g}: {failed}")
    return measured


def transformers_names(model: torch.nn.Module, checkpoint: SourceCheckpoint) -> dict[str, str]:
    """{parameter name in `model`: checkpoint key}, renamed as `from_pretrained` renames them (transformers' own
    conversion mapping for the model, e.g. the Hub's `visual.*` -> `model.visual.*`), independent of nativevl's
    key tables; rotary buffers are dropped."""
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    names = {}
    for key in checkpoint.keys():
        if key.endswith(".inv_freq"):
            continue
        name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        names[name] = key
    return names


@torch.no_grad()
def verify_qwen2_vl(folder, source: SourceCheckpoint, dtype: torch.dtype, atol: float) -> dict[str, float]:
    """Logits of the converted model vs transformers' Qwen2-VL with the source's weights (as `from_pretrained`
    names them), one image + text; both run layer by layer in float32."""
    source_folder = source.folder
    config = Qwen2VLConfig.from_pretrained(source_folder)
    reference = on_meta(lambda: Qwen2VLForConditionalGeneration(config))
    weights = tie(checkpoint_weights(source, transformers_names(reference, source)), reference)
    batch = verification_batch(_nativevl_view(config))
    token_types = torch.zeros_like(batch["input_ids"])  # transformers wants the token types: 1 marks image tokens
    token_types[batch["input_ids"] == config.image_token_id] = 1

    def forward(model):
        return model(**batch, mm_token_type_ids=token_types).logits

    label = f"source folder {source_folder}"
    expected = unrounded = run_layerwise(reference, weights, label, forward)
    if dtype != torch.float32:
        in_dtype = {name: (shape, rounded(load, dtype)) for name, (shape, load) in weights.items()}
        expected = run_layerwise(reference, in_dtype, label, forward)
    del reference
    model, converted = converted_model(folder)
    got = run_layerwise(model, converted, "converted folder", lambda model: model(**batch).logits)
    measured = {"logits vs transformers Qwen2VLForConditionalGeneration": max_abs_diff(got, expected)}
    if dtype != torch.float32:
        print(f"verify: rounding the weights to {dtype} moves the logits by up to {max_abs_diff(got, unrounded):.3e}")
    return check(measured, atol)


def _nativevl_view(config) -> NativeVLConfig:
    """The fields `verification_batch` reads, from a transformers Qwen2VLConfig."""
    from nativevl.conversion.qwen2_vl import config_from_qwen2_vl

    return config_from_qwen2_vl(config)


def qwen2_reference(
    checkpoint: SourceCheckpoint, config_dict: dict, dtype: torch.dtype
) -> tuple[Qwen2ForCausalLM, WeightSource]:
    """transformers' `Qwen2ForCausalLM` (on meta) and, rounded to `dtype`, the LLM tensors of a source checkpoint
    (`model.embed_tokens|layers|norm.*`, `lm_head.weight`; other keys are not the LLM's) under their own names."""
    fields = {k: v for k, v in config_dict.items() if k not in CONFIG_KEYS_NOT_QWEN2}
    keys = {k: k for k in checkpoint.keys() if QWEN2_LLM_KEY.fullmatch(k) and not k.endswith(".inv_freq")}
    config = Qwen2Config(**fields)
    config.vocab_size = checkpoint.shape(keys["model.embed_tokens.weight"])[0]
    model = on_meta(lambda: Qwen2ForCausalLM(config))
    weights = {
        name: (shape, rounded(load, dtype)) for name, (shape, load) in checkpoint_weights(checkpoint, keys).items()
    }
    return model, tie(weights, model)


def vision_reference(
    tensors: dict, config: NativeVLConfig, dtype: torch.dtype
) -> tuple[Qwen2VisionTransformerPretrainedModel, WeightSource]:
    """transformers' Qwen2-VL ViT with merger (on meta) and, rounded to `dtype`, the converted model's
    `model.visual.*` source tensors under the ViT's names."""
    fields = config.vision_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "auto_map", "dtype"):
        fields.pop(key, None)
    vision_config = Qwen2VLVisionConfig(**fields)
    model = on_meta(lambda: Qwen2VisionTransformerPretrainedModel._from_config(vision_config))
    prefix = "model.visual."
    weights = {
        key[len(prefix) :]: (tuple(target.shape), rounded(target.load, dtype))
        for key, target in tensors.items()
        if key.startswith(prefix)
    }
    return model, weights


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
    target tensors (target key -> TargetTensor), re-read from the source to compare with what was written, one at a
    time. `text_id_limit`: the first token id whose embedding / head row the conversion set (compose's added tokens);
    the text-only check uses text ids and compares logit columns below it."""
    text_batch = verification_batch(config, image=False, text_id_limit=text_id_limit)
    image_batch = verification_batch(config)

    reference, weights = qwen2_reference(llm_checkpoint, llm_config, dtype)
    label = f"LLM of {llm_checkpoint.folder}"
    text_expected = run_layerwise(reference, weights, label, lambda m: m(**text_batch).logits)  # (1, 24, vocab)
    vit, weights = vision_reference(tensors, config, dtype)
    vision_expected = run_layerwise(
        vit,
        weights,
        "vision tower tensors",
        lambda m: m(image_batch["pixel_values"], grid_thw=image_batch["image_grid_thw"]).pooler_output,
    )
    del reference, vit, weights

    model, converted = converted_model(folder)
    differing, largest = [], 0.0
    for key, target in tensors.items():
        written, source = converted[key][1](), target.load().to(dtype)
        # torch.equal first: the expected difference is 0, and float32 temporaries of a 7B embedding cost 9 GB
        diff = 0.0 if written.numel() == 0 or torch.equal(written, source) else max_abs_diff(written, source)
        if diff != 0.0 or written.dtype != source.dtype:
            differing.append(f"{key} ({written.dtype} vs {source.dtype})" if written.dtype != source.dtype else key)
        largest = max(largest, diff)
        del written, source
    if differing:
        raise ConversionError(f"{len(differing)} converted tensor(s) differ from their source: {differing[:20]}")
    columns = min(text_expected.shape[-1], text_id_limit or text_expected.shape[-1])  # rows >= limit were changed
    text_expected = text_expected[..., :columns]

    def forwards(model):
        text_got = model(**text_batch).logits[..., :columns]
        vision_got = model.model.visual(image_batch["pixel_values"], image_batch["image_grid_thw"]).pooler_output
        return text_got, vision_got, model(**image_batch).logits

    text_got, vision_got, logits = run_layerwise(model, converted, "converted folder", forwards)
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


def parity_batch(config: NativeVLConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """One sample for `to-qwen2-vl`'s check: text, three images of different grids ((1, 2m, 2m), (1, 2m, 6m),
    (1, 4m, 2m)), text, a video of two temporal patches ((2, 2m, 4m)), text (m = spatial merge size); text ids as in
    `verification_batch`; random patch rows."""
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    m = vision.spatial_merge_size
    special = (config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id)
    high = min(config.text_config.vocab_size, *special)
    images, videos = [(1, 2 * m, 2 * m), (1, 2 * m, 6 * m), (1, 4 * m, 2 * m)], [(2, 2 * m, 4 * m)]

    def text(n: int) -> list[int]:
        return torch.randint(0, high, (n,), generator=generator).tolist()

    def wrapped(token: int, grid: tuple[int, int, int]) -> list[int]:
        t, h, w = grid
        return [config.vision_start_token_id] + [token] * (t * h * w // m**2) + [config.vision_end_token_id]

    ids = text(6) + sum((wrapped(config.image_token_id, g) + text(2) for g in images), [])
    ids += wrapped(config.video_token_id, videos[0]) + text(5)
    row = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2

    def pixels(grids) -> torch.Tensor:
        return torch.randn(sum(t * h * w for t, h, w in grids), row, generator=generator)  # (patches, C*T*P*P)

    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": pixels(images),
        "image_grid_thw": torch.tensor(images),
        "pixel_values_videos": pixels(videos),
        "video_grid_thw": torch.tensor(videos),
    }


def greedy(forward: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor, steps: int):
    """Logits of `input_ids` and the `steps` greedy tokens after it, each step a full forward (no cache)."""
    logits = forward(input_ids)
    tokens, ids = [], input_ids
    for step in range(steps):
        step_logits = logits if step == 0 else forward(ids)
        token = step_logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(token))
        ids = torch.cat([ids, token], dim=1)
    return logits, tokens


@torch.no_grad()
def verify_to_qwen2_vl(
    folder, source: SourceCheckpoint, processor, dtype: torch.dtype, atol: float, steps: int = 3
) -> dict[str, float]:
    """`to-qwen2-vl`'s check: the written folder, loaded through transformers' Auto classes without remote code
    (`AutoConfig` must give `Qwen2VLConfig`, the class is `AutoModelForImageTextToText`'s for it, weights named as
    `from_pretrained` names them), against the source nativevl model, both layer by layer in float32, on three images
    of different sizes and a video: logits, and `steps` greedy tokens that must be equal. Then transformers' processor
    for the folder against nativevl's `processor` (`processor_parity`)."""
    config = AutoConfig.from_pretrained(folder)  # no trust_remote_code: stock classes only
    if not isinstance(config, Qwen2VLConfig):
        raise ConversionError(f"AutoConfig reads {folder}/config.json as {type(config).__name__}, not Qwen2VLConfig")
    model_class = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    stock = on_meta(lambda: model_class(config))
    written = SourceCheckpoint(folder)
    stock_weights = tie(checkpoint_weights(written, transformers_names(stock, written)), stock)

    source_model = on_meta(lambda: NativeVLForConditionalGeneration(NativeVLConfig.from_pretrained(source.folder)))
    source_weights = tie(checkpoint_weights(source, {key: key for key in source.keys()}), source_model)
    if dtype != torch.float32:  # the output was rounded to dtype: compare with the source rounded the same way
        source_weights = {name: (shape, rounded(load, dtype)) for name, (shape, load) in source_weights.items()}
    batch = parity_batch(source_model.config)
    vision = {k: v for k, v in batch.items() if k != "input_ids"}

    def stock_forward(ids: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(ids)  # transformers wants the token types: 1 image, 2 video
        types[ids == config.image_token_id] = 1
        types[ids == config.video_token_id] = 2
        return stock(input_ids=ids, mm_token_type_ids=types, **vision).logits

    def run(model, weights, label, forward):
        return run_layerwise(model, weights, label, lambda _: greedy(forward, batch["input_ids"], steps))

    expected, expected_tokens = run(
        source_model, source_weights, f"source folder {source.folder}", lambda ids: source_model(ids, **vision).logits
    )
    got, got_tokens = run(stock, stock_weights, f"written folder as {model_class.__name__}", stock_forward)
    if got_tokens != expected_tokens:
        raise ConversionError(
            f"verification failed: greedy tokens of {model_class.__name__} {got_tokens} differ from the nativevl "
            f"model's {expected_tokens}"
        )
    print(f"verify: {steps} greedy tokens equal: {got_tokens}")
    measured = {f"logits vs nativevl (3 images, 1 video), {model_class.__name__}": max_abs_diff(got, expected)}
    measured.update(processor_parity(folder, processor))
    return check(measured, atol)


def parity_images(seed: int = 0) -> tuple[list, list]:
    """Three RGB images of different sizes and aspect ratios, and a 3-frame video, as PIL images (random pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def image(height: int, width: int):
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    return [image(45, 70), image(130, 61), image(37, 230)], [image(50, 90) for _ in range(3)]


def processor_parity(folder, ours) -> dict[str, float]:
    """transformers' processor for the written folder vs nativevl's `ours` on three images and a video: the chat
    template's rendering of a message with them, and the input_ids and grids of a ChatML text with the placeholders
    written out, must be equal; returns the max abs difference of the image pixel values against
    `AutoImageProcessor.from_pretrained(folder, backend="pil")` (nativevl's processor resizes with PIL).

    input_ids and grids come from `AutoProcessor.from_pretrained(folder)` (no remote code) where it loads. transformers'
    Qwen2-VL processor cannot be built without torchvision (its video processor needs it); then from its parts:
    `AutoTokenizer`, `AutoImageProcessor`, the placeholder expansion Qwen2VLProcessor does (`grid.prod() //
    merge_size**2` tokens per image or video) and the video grid of transformers' `smart_resize` at
    video_preprocessor_config.json's limits."""
    images, frames = parity_images()
    parts = [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}]
    messages = [{"role": "user", "content": [*parts, {"type": "video"}, {"type": "text", "text": "b"}]}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    # the processors' input: the placeholders written out (a folder's template need not place images)
    image, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    text = f"<|im_start|>user\n{image}a{image}{image}{video}b<|im_end|>\n"
    expected = ours(text=[text], images=images, videos=[frames], return_tensors="pt")
    image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    pixels = image_processor(images=images, return_tensors="pt")
    try:
        theirs = AutoProcessor.from_pretrained(folder)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        theirs = None
    if theirs is not None:
        their_prompt = theirs.apply_chat_template(messages, add_generation_prompt=True)
        got = theirs(text=[text], images=images, videos=[frames], return_tensors="pt")
        label = type(theirs).__name__
    else:
        print(
            "verify: transformers' Qwen2VLProcessor needs torchvision (its video processor), not installed: "
            "comparing its tokenizer, chat template, image processor and placeholder expansion"
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
        their_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        got = {"image_grid_thw": pixels["image_grid_thw"]}
        got["video_grid_thw"] = torch.tensor([video_grid(folder, len(frames), frames[0].height, frames[0].width)])
        merge = image_processor.merge_size**2
        expanded = text
        for kind, grids in (("<|image_pad|>", got["image_grid_thw"]), ("<|video_pad|>", got["video_grid_thw"])):
            pieces = expanded.split(kind)
            counts = [int(grid.prod()) // merge for grid in grids]
            expanded = pieces[0] + "".join(kind * n + piece for n, piece in zip(counts, pieces[1:], strict=True))
        got["input_ids"] = tokenizer([expanded], return_tensors="pt")["input_ids"]
        label = f"{type(tokenizer).__name__} + {type(image_processor).__name__}"
    if their_prompt != prompt:
        raise ConversionError(f"the chat template renders differently: {their_prompt!r} vs nativevl's {prompt!r}")
    for key in ("input_ids", "image_grid_thw", "video_grid_thw"):
        if not torch.equal(got[key].long(), expected[key].long()):
            raise ConversionError(
                f"{key} of {label} differ from nativevl's processor: {got[key].tolist()} vs {expected[key].tolist()}"
            )
    if not torch.equal(pixels["image_grid_thw"].long(), expected["image_grid_thw"].long()):
        raise ConversionError(f"image grids of {type(image_processor).__name__} differ from nativevl's processor")
    print(f"verify: chat template, input_ids, image and video grids of {label} equal nativevl's processor's")
    for key in ("pixel_values", "pixel_values_videos"):
        if theirs is not None:  # its torchvision backend resizes otherwise than PIL: reported, not checked
            print(f"verify: {key} vs {label}: max abs diff {max_abs_diff(got[key], expected[key]):.3e} (not checked)")
    name = f"image pixel values vs {type(image_processor).__name__}"
    return {name: max_abs_diff(pixels["pixel_values"], expected["pixel_values"])}


def video_grid(folder, num_frames: int, height: int, width: int) -> list[int]:
    """[t, h, w] patches of a video as transformers' Qwen2VLVideoProcessor grids it with the folder's
    video_preprocessor_config.json: every frame resized by `smart_resize` to the size limits, frames padded to a
    multiple of temporal_patch_size."""
    settings = json.loads((Path(folder) / "video_preprocessor_config.json").read_text())
    patch, merge, temporal = settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"]
    size = settings["size"]
    h, w = smart_resize(height, width, patch * merge, size["shortest_edge"], size["longest_edge"])
    return [-(-num_frames // temporal), h // patch, w // patch]
