"""transformers' model contract, as its common tests for Qwen2-VL check it, on nativevl's classes.

One battery (`NativeVLModelTester`) over four configs: Qwen2-VL's merger + M-RoPE, NativeRes-LLaVA's merger_mlp +
1-D positions, AVG-LLaVA granularity levels, and videos. Written for nativevl (not copied from transformers): each
test names the contract it holds.
"""

import importlib
import inspect
import typing

import pytest
import torch
from conftest import TinyVLTester, mm_token_type_ids
from transformers import (
    AutoConfig,
    DynamicCache,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

import nativevl
from nativevl import NativeVLConfig, NativeVLForConditionalGeneration, NativeVLModel
from nativevl.conversion.qwen2_vl import from_qwen2_vl
from nativevl.modeling import configuration_nativevl, modeling_nativevl


CONFIGS = ["merger_mrope", "mlp_1d", "granularity", "video"]


class NativeVLModelTester(TinyVLTester):
    """Builds one of the four tiny configs and inputs that exercise it (left or right padded, two samples)."""

    def __init__(self, kind: str):
        self.kind = kind

    def config(self, **overrides) -> NativeVLConfig:
        extra = {}
        if self.kind == "mlp_1d":
            extra = dict(projector_type="merger_mlp", position_scheme="1d", projector_hidden_size=48)
            extra["vision_config"] = self.vision_config(hidden_size=24)
        elif self.kind == "granularity":
            extra = dict(granularity=3, router_num_heads=4, router_intermediate_size=64, router_top_k=4)
        extra.update(overrides)
        return self.nativevl_config(**extra)

    def samples(self) -> list[list]:
        if self.kind == "video":
            return [[3, ("video", (2, 4, 6)), 5], [2, ("image", (1, 4, 4)), 4, ("video", (4, 2, 4)), 2]]
        return [[4, ("image", (1, 6, 4)), 3, ("image", (1, 2, 8)), 2], [6, ("image", (1, 4, 4)), 5]]

    def inputs(self, padding_side: str = "left") -> dict:
        return self.batch(self.samples(), padding_side=padding_side)

    def model(self, seed: int = 0, **overrides) -> NativeVLForConditionalGeneration:
        torch.manual_seed(seed)
        return NativeVLForConditionalGeneration(self.config(**overrides)).eval()


@pytest.fixture(params=CONFIGS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def built(kind):
    tester = NativeVLModelTester(kind)
    return tester, tester.model()


def test_tuple_outputs_equal_dict_outputs(built):
    tester, model = built
    inputs = tester.inputs()
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        base_tuple = model.model(**inputs, return_dict=False)
        base_dict = model.model(**inputs)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.logits)
    assert torch.equal(base_tuple[0], base_dict.last_hidden_state)


def test_hidden_states_and_attentions_from_every_part(built):
    tester, model = built
    model.set_attn_implementation("eager")
    inputs = tester.inputs()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    text, vision = model.config.text_config, model.config.vision_config
    batch, seq = inputs["input_ids"].shape
    assert len(out.hidden_states) == text.num_hidden_layers + 1
    assert len(out.attentions) == text.num_hidden_layers
    assert out.attentions[0].shape == (batch, text.num_attention_heads, seq, seq)
    for name, pixels, grids in (
        ("image_outputs", "pixel_values", "image_grid_thw"),
        ("video_outputs", "pixel_values_videos", "video_grid_thw"),
    ):
        part = getattr(out, name)
        if pixels not in inputs:
            assert part is None
            continue
        n_patches = inputs[pixels].shape[0]
        assert len(part.hidden_states) == vision.depth + 1
        assert all(h.shape == (n_patches, vision.embed_dim) for h in part.hidden_states)
        assert len(part.attentions) == vision.depth
        lengths = [h * w for t, h, w in inputs[grids].tolist() for _ in range(t)]
        per_segment = [w for run in part.attentions[0] for w in run]  # (H, L, L) per segment
        assert [w.shape[-1] for w in per_segment] == lengths
        torch.testing.assert_close(per_segment[0].sum(-1), torch.ones_like(per_segment[0].sum(-1)))


def test_attentions_under_sdpa_are_empty_as_in_transformers(built):
    """transformers' Qwen2-VL under sdpa: `output_attentions=True` warns once and returns no text attention
    weights (an empty tuple); nativevl does the same in the decoder and in the vision tower, with the logits and
    the tuple / dict outputs unchanged (transformers' `test_model_outputs_equivalence`)."""
    tester, model = built
    inputs = tester.inputs()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_attentions=True)
        as_tuple = model(**inputs, output_attentions=True, return_dict=False)
    assert out.attentions == ()
    for part in (out.image_outputs, out.video_outputs):
        assert part is None or not part.attentions
    torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple[0], out.logits, atol=0, rtol=0)
    if model.config.position_scheme == "mrope":
        reference = Qwen2VLForConditionalGeneration(tester.qwen2_vl_config()).eval()
        with torch.no_grad():
            expected = reference(
                **inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"], tester), output_attentions=True
            )
        assert expected.attentions == out.attentions == ()


@pytest.mark.parametrize("owner", ["base", "generation"])
def test_get_image_and_video_features_follow_transformers(built, owner):
    tester, model = built
    inputs = tester.inputs()
    target = model.model if owner == "base" else model
    merge = model.config.vision_config.spatial_merge_size
    width = model.config.text_config.hidden_size
    for method, pixels, grids in (
        ("get_image_features", "pixel_values", "image_grid_thw"),
        ("get_video_features", "pixel_values_videos", "video_grid_thw"),
    ):
        if pixels not in inputs:
            continue
        params = list(inspect.signature(getattr(target, method)).parameters)
        assert params[:2] == [pixels, grids]
        out = getattr(target, method)(**{pixels: inputs[pixels], grids: inputs[grids]}, output_hidden_states=True)
        assert isinstance(out, BaseModelOutputWithPooling)
        counts = [t * h * w // merge**2 for t, h, w in inputs[grids].tolist()]
        assert [p.shape for p in out.pooler_output] == [(n, width) for n in counts]
        assert len(out.hidden_states) == model.config.vision_config.depth + 1
        as_tuple = getattr(target, method)(inputs[pixels], inputs[grids], return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)


def test_get_rope_index_matches_qwen2_vl_signature_and_results():
    tester = NativeVLModelTester("merger_mrope")
    ours = tester.model()
    theirs = Qwen2VLModel(tester.qwen2_vl_config())
    expected = list(inspect.signature(theirs.get_rope_index).parameters)[:5]
    assert list(inspect.signature(ours.model.get_rope_index).parameters)[:5] == expected
    for padding_side in ("left", "right"):
        inputs = tester.inputs(padding_side)
        args = (inputs["input_ids"], mm_token_type_ids(inputs["input_ids"], tester), inputs["image_grid_thw"])
        kwargs = dict(video_grid_thw=None, attention_mask=inputs["attention_mask"])
        ours_ids, ours_deltas = ours.get_rope_index(*args, **kwargs)
        their_ids, their_deltas = theirs.get_rope_index(*args, **kwargs)
        assert torch.equal(ours_ids, their_ids) and torch.equal(ours_deltas, their_deltas.view(-1, 1))
        # without token types the placeholders are found by id
        no_types, _ = ours.model.get_rope_index(inputs["input_ids"], None, inputs["image_grid_thw"], **kwargs)
        assert torch.equal(no_types, their_ids)


def test_text_only_inputs_holding_vision_token_ids_are_text():
    tester = NativeVLModelTester("merger_mrope")
    torch.manual_seed(0)
    reference = Qwen2VLForConditionalGeneration(tester.qwen2_vl_config()).eval()
    ours = from_qwen2_vl(reference).eval()
    input_ids = torch.tensor([[5, tester.image_token_id, 7, tester.video_token_id, 9, 11]])
    with torch.no_grad():
        theirs_logits = reference(input_ids=input_ids).logits
        ours_logits = ours(input_ids=input_ids).logits
        generated = ours.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False)
        expected = reference.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(ours_logits, theirs_logits, atol=1e-5, rtol=0)
    assert torch.equal(generated, expected)


def test_configs_are_default_constructible_and_auto():
    config = NativeVLConfig()
    assert config.vision_config.hidden_size == config.text_config.hidden_size
    assert type(AutoConfig.for_model("nativevl")) is NativeVLConfig
    assert type(AutoConfig.for_model("nativevl", projector_type="merger_mlp")).__name__ == "NativeVLConfig"
    # pre-v5 style: tie_word_embeddings inside text_config reaches the outer config, as Qwen2VLConfig does
    tied = NativeVLConfig(text_config={**TinyVLTester().text_config(), "tie_word_embeddings": True})
    assert tied.tie_word_embeddings


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads_survive_save_and_load(tmp_path, tie):
    tester = NativeVLModelTester("merger_mrope")
    model = tester.model(tie_word_embeddings=tie)
    embeddings = model.get_input_embeddings().weight
    assert (model.lm_head.weight.data_ptr() == embeddings.data_ptr()) == tie
    model.save_pretrained(tmp_path)
    loaded = NativeVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()) == tie
    inputs = tester.inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_save_and_load_give_the_same_outputs(built, tmp_path):
    tester, model = built
    model.save_pretrained(tmp_path)
    loaded = NativeVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = tester.inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    for field in ("projector_type", "position_scheme", "granularity", "image_token_id", "tie_word_embeddings"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field


def test_tp_plan():
    assert NativeVLForConditionalGeneration._tp_plan == {"lm_head": "colwise_gather_output"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_eager_equals_sdpa(kind, dtype, padding_side):
    tester = NativeVLModelTester(kind)
    model = tester.model().to(dtype)
    inputs = tester.inputs(padding_side)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    logits = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(**inputs).logits.float()
    keep = inputs["attention_mask"].bool()
    tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(logits["eager"][keep], logits["sdpa"][keep], atol=tolerance, rtol=tolerance)


def test_inputs_embeds_equal_input_ids(built):
    tester, model = built
    inputs = tester.inputs()
    with torch.no_grad():
        by_ids = model(**inputs)
        position_ids = inputs.get("position_ids")
        if position_ids is None and model.config.position_scheme == "mrope":
            position_ids, _ = model.get_rope_index(
                inputs["input_ids"], None, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                inputs["attention_mask"],
            )  # fmt: skip
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        by_embeds = model(inputs_embeds=embeds, position_ids=position_ids, **rest)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, atol=1e-5, rtol=0)


def test_resize_token_embeddings(built):
    tester, model = built
    old = model.config.text_config.vocab_size
    model.resize_token_embeddings(old + 8)
    assert model.get_input_embeddings().weight.shape[0] == old + 8
    assert model.get_output_embeddings().weight.shape[0] == old + 8
    assert model.config.text_config.vocab_size == old + 8
    with torch.no_grad():
        assert model(**tester.inputs()).logits.shape[-1] == old + 8


def test_forward_annotations_let_transformers_see_kwargs():
    from transformers.processing_utils import Unpack
    from transformers.utils import TransformersKwargs

    for cls in (NativeVLModel, NativeVLForConditionalGeneration):
        annotation = inspect.signature(cls.forward).parameters["kwargs"].annotation
        assert typing.get_origin(annotation) is Unpack and typing.get_args(annotation) == (TransformersKwargs,)


def test_static_cache_generation_equals_dynamic(kind):
    tester = NativeVLModelTester(kind)
    model = tester.model()
    inputs = tester.inputs("left")
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_decoder_compiles_full_graph_and_the_vision_part_does_not():
    """`_can_compile_fullgraph` is False: the decoder compiles with fullgraph=True, the image path (placeholder
    counts, per-grid splits, host-side M-RoPE ids) breaks the graph, as shown here."""
    tester = NativeVLModelTester("merger_mrope")
    model = tester.model()
    inputs = tester.inputs()
    text = model.model.language_model
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        eager = text(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(text, fullgraph=True, backend="eager")
        graph = compiled(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
        torch.testing.assert_close(graph, eager, atol=1e-5, rtol=0)
        torch._dynamo.reset()
        with pytest.raises(Exception):  # noqa: B017 - dynamo's graph-break error type differs between releases
            torch.compile(model, fullgraph=True, backend="eager")(**inputs)
    assert NativeVLForConditionalGeneration._can_compile_fullgraph is False


def test_rope_deltas_come_from_the_given_position_ids():
    tester = NativeVLModelTester("merger_mrope")
    model = tester.model()
    inputs = tester.inputs("left")
    position_ids, deltas = model.get_rope_index(
        inputs["input_ids"], None, inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    next_token = torch.tensor([[17], [23]])
    with torch.no_grad():
        model.model.rope_deltas = None
        cache = DynamicCache(config=model.config.text_config)
        model(**inputs, position_ids=position_ids.permute(1, 2, 0), use_cache=True, cache=cache)  # (batch, seq, 3)
        assert torch.equal(model.model.rope_deltas, deltas)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(input_ids=next_token, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
        full_ids = torch.cat([inputs["input_ids"], next_token], dim=1)
        full = model(**{**inputs, "input_ids": full_ids, "attention_mask": mask}).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_position_scheme_mismatch_raises_naming_both():
    mrope = NativeVLModelTester("merger_mrope")
    inputs = mrope.inputs()
    plain = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with pytest.raises(ValueError, match=r"position_ids are plain .* config.position_scheme is 'mrope'"):
        mrope.model()(**inputs, position_ids=plain)
    one_d = NativeVLModelTester("mlp_1d")
    rows, _ = mrope.model().get_rope_index(
        inputs["input_ids"], None, inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
    )
    with pytest.raises(ValueError, match=r"distinct M-RoPE rows .* config.position_scheme is '1d'"):
        one_d.model()(**inputs, position_ids=rows)


def test_model_level_bad_input_names_the_values():
    tester = NativeVLModelTester("merger_mrope")
    model = tester.model()
    inputs = tester.inputs()
    with pytest.raises(ValueError, match="need image_grid_thw"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    bad = inputs["image_grid_thw"].clone()
    bad[0] = torch.tensor([1, 3, 8])  # 24 patches as before, odd height
    with pytest.raises(ValueError, match=r"divisible by the merge size 2"):
        model(**{**inputs, "image_grid_thw": bad})
    with pytest.raises(ValueError, match=r"empty batch: the inputs have shape \(0, 5\)"):
        model(input_ids=torch.zeros(0, 5, dtype=torch.long))


def test_cache_under_either_name_and_output_field_of_the_release():
    tester = NativeVLModelTester("merger_mrope")
    model = tester.model()
    inputs = tester.inputs()
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = getattr(out, modeling_nativevl.CACHE_NAME)
    assert cache is not None and cache.get_seq_length() == inputs["input_ids"].shape[1]
    for name in ("cache", "past_key_values"):
        fresh = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            model(**inputs, use_cache=True, **{name: fresh})
        assert fresh.get_seq_length() == inputs["input_ids"].shape[1], name


def test_transformers_internals_are_where_the_remote_code_expects_them():
    """Every transformers internal the remote-code files use (listed in modeling_nativevl's docstring), by name."""
    import transformers
    from transformers import AttentionInterface, GenerationMixin, PreTrainedModel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel
    from transformers.utils.output_capturing import capture_outputs

    for module, names in {
        "transformers.processing_utils": ("ProcessorMixin", "TextKwargs", "ImagesKwargs", "Unpack"),
        "transformers.image_processing_utils": ("BaseImageProcessor",),
        "transformers.utils": ("TransformersKwargs", "can_return_tuple"),
        "transformers.modeling_layers": ("GradientCheckpointingLayer",),
        "transformers.modeling_utils": ("slice_logits_to_keep",),
        "transformers.models.qwen2_vl.configuration_qwen2_vl": ("Qwen2VLTextConfig", "Qwen2VLVisionConfig"),
    }.items():
        imported = importlib.import_module(module)
        assert all(hasattr(imported, name) for name in names), (module, names)
    assert callable(sdpa_attention_forward) and callable(sdpa_mask) and callable(capture_outputs)
    assert hasattr(AttentionInterface, "register") and hasattr(ALL_MASK_ATTENTION_FUNCTIONS, "register")
    assert hasattr(GenerationMixin, "_prepare_position_ids_for_generation")
    expand = inspect.signature(GenerationMixin._expand_inputs_for_generation).parameters
    assert list(expand)[1:4] == ["expand_size", "is_encoder_decoder", "input_ids"], list(expand)
    assert hasattr(PreTrainedModel, "_can_set_attn_implementation")
    assert "mm_encoder_outputs" in inspect.signature(Qwen2VLForConditionalGeneration.forward).parameters
    assert modeling_nativevl.CACHE_NAME in inspect.signature(Qwen2VLTextModel.forward).parameters
    assert modeling_nativevl.CACHE_NAME in transformers.modeling_outputs.BaseModelOutputWithPast.__dataclass_fields__
    listed = modeling_nativevl.__doc__
    names = ("capture_outputs", "_prepare_position_ids_for_generation", "_expand_inputs_for_generation")
    for name in (*names, "mm_encoder_outputs", "Qwen2VLTextModel"):
        assert name in listed, f"{name} is used but not listed in modeling_nativevl's docstring"


def test_supported_range_is_what_ci_tests(monkeypatch):
    from pathlib import Path

    low, high = configuration_nativevl.TESTED_TRANSFORMERS
    setup = (Path(nativevl.__file__).parent / "setup.cfg").read_text()
    major, minor = (int(x) for x in high.split(".")[:2])
    assert f"transformers>={'.'.join(low.split('.')[:2])},<{major}.{minor + 1}" in setup
    # the module object the check reads: `from transformers import AutoProcessor` (run by other tests) puts a new
    # lazy `transformers` module into sys.modules, so a fresh `import transformers` here may be another object
    running = configuration_nativevl.transformers
    monkeypatch.setattr(running, "__version__", high)
    assert not configuration_nativevl.warn_if_untested_transformers()
    monkeypatch.setattr(running, "__version__", f"{major}.{minor + 1}.0")
    assert configuration_nativevl.warn_if_untested_transformers("5.23.0")
