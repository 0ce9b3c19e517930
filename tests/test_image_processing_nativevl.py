"""NativeVLImageProcessor: golden values, parity with transformers' Qwen2-VL (PIL backend) and LLaVA-NeXT processors,
fixed and crop modes, videos, bad inputs, and a property test of grid / token bookkeeping."""

import ast
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from nativevl.processing import NativeVLImageProcessor, smart_resize
from nativevl.processing import image_processing_nativevl as module
from nativevl.processing.image_io_nativevl import image_size, load_image


MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)  # keeps parity cases fast


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def rgb(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise(height, width, seed=seed))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def reference(images, **limits):
    """transformers' Qwen2VLImageProcessorPil at the same min/max pixels."""
    processor = Qwen2VLImageProcessorPil(**limits) if limits else Qwen2VLImageProcessorPil()
    return processor(images, return_tensors="np")


def assert_same(ours, ref):
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert ours["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ golden values
def test_smart_resize_golden():
    assert smart_resize(561, 278) == (560, 280)
    assert smart_resize(1, 1) == (56, 56)  # grown to min_pixels
    assert smart_resize(3000, 4000) == (840, 1148)  # shrunk under max_pixels
    with pytest.raises(ValueError, match=r"1x201 .*aspect ratio 201"):
        smart_resize(1, 201)
    assert smart_resize(1, 200)[0] == 28


def test_980_image_gives_4900_patches():
    out = NativeVLImageProcessor()(rgb(980, 980), return_tensors="pt")
    assert out["pixel_values"].shape == (4900, 1176)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_grid_thw"].tolist() == [[1, 70, 70]]
    assert out["image_grid_thw"].dtype == torch.int64
    assert out["image_num_grids"].tolist() == [1]


def test_row_layout_is_block_major_c_t_ph_pw():
    """Rebuild the image from the rows by hand: rows are 2x2 blocks in raster order, each row (C, T, 14, 14)."""
    image = noise(56, 84)
    rows = NativeVLImageProcessor(min_pixels=56 * 84, max_pixels=56 * 84)(image, return_tensors="np")["pixel_values"]
    expected = ((image.astype(np.float64) / 255).astype(np.float32) - MEAN) / STD  # (H, W, C)
    r = 0
    for by in range(2):
        for bx in range(3):
            for iy in range(2):
                for ix in range(2):
                    y, x = (2 * by + iy) * 14, (2 * bx + ix) * 14
                    patch = rows[r].reshape(3, 2, 14, 14)  # (C, T, ph, pw)
                    for t in range(2):
                        np.testing.assert_array_equal(patch[:, t], expected[y : y + 14, x : x + 14].transpose(2, 0, 1))
                    r += 1


# ------------------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize(
    "height, width",
    [(1, 1), (1, 200), (200, 1), (3, 599), (13, 17), (27, 29), (28, 28), (55, 57), (97, 301), (301, 97), (561, 278)],
)
def test_native_matches_qwen2_vl_default_limits(height, width):
    image = rgb(height, width, seed=height * 1000 + width)
    assert_same(NativeVLImageProcessor()(image, return_tensors="np"), reference(image))


@pytest.mark.parametrize("height, width", [(1, 150), (57, 311), (311, 57), (199, 233), (400, 300), (5, 600)])
def test_native_matches_qwen2_vl_small_limits(height, width):
    """Limits that make every case shrink or grow, several images in one call."""
    images = [rgb(height, width, seed=1), rgb(width, height, seed=2), rgb(33, 47, seed=3)]
    assert_same(NativeVLImageProcessor(**SMALL)(images, return_tensors="np"), reference(images, **SMALL))


def _mode_image(mode: str) -> Image.Image:
    base = noise(45, 70, channels=4, seed=7)
    if mode == "I;16":
        return Image.fromarray(np.random.default_rng(1).integers(0, 65536, (45, 70)).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(np.random.default_rng(2).integers(0, 300, (45, 70)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(np.random.default_rng(3).uniform(0, 255, (45, 70)).astype(np.float32))
    if mode == "P+transparency":
        image = Image.fromarray(base[..., :3]).convert("P")
        image.info["transparency"] = 0
        return image
    return Image.fromarray(base, "RGBA").convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I", "F", "1", "RGBX", "YCbCr"])
def test_pil_modes_match_qwen2_vl(mode):
    image = _mode_image(mode)
    assert_same(NativeVLImageProcessor(**SMALL)(image, return_tensors="np"), reference(image, **SMALL))


def test_16bit_is_scaled_to_what_the_user_sees():
    """transformers clips I;16 at 255 (PIL convert): mostly white. We scale v/257 as viewers do, unless told not to."""
    values = np.random.default_rng(1).integers(0, 65536, (45, 70)).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    seen = Image.fromarray(((values.astype(np.uint32) + 128) // 257).astype(np.uint8))
    assert_same(NativeVLImageProcessor(**SMALL)(image, return_tensors="np"), reference(seen, **SMALL))
    assert_same(NativeVLImageProcessor(**SMALL)(values, return_tensors="np"), reference(seen, **SMALL))
    strict = NativeVLImageProcessor(**SMALL, scale_16bit=False)
    assert_same(strict(image, return_tensors="np"), reference(image, **SMALL))
    big_endian = Image.frombytes("I;16B", (70, 45), values.astype(">u2").tobytes())
    assert_same(NativeVLImageProcessor(**SMALL)(big_endian, return_tensors="np"), reference(seen, **SMALL))


def test_arrays_and_tensors_match_qwen2_vl():
    hwc, gray, rgba = noise(40, 66), noise(40, 66, channels=1), noise(40, 66, channels=4)
    ours = NativeVLImageProcessor(**SMALL)
    assert_same(ours(hwc, return_tensors="np"), reference(hwc, **SMALL))
    assert_same(ours(gray, return_tensors="np"), reference(gray[..., None], **SMALL))  # it needs a channel axis
    assert_same(ours(rgba, return_tensors="np"), reference(rgba, **SMALL))
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    assert_same(ours(chw, return_tensors="np"), reference(Image.fromarray(hwc), **SMALL))
    # floats in [0, 1] are quantised to uint8, so they give exactly the uint8 result
    assert_same(ours(hwc / 255, return_tensors="np"), reference(hwc, **SMALL))
    assert_same(ours(chw.float() / 255, return_tensors="np"), reference(hwc, **SMALL))
    # a 4-D batch and a nested list (images per sample) are flattened in order
    batch = np.stack([hwc, noise(40, 66, seed=9)])
    assert_same(ours(batch, return_tensors="np"), reference(list(batch), **SMALL))
    nested = ours([[Image.fromarray(hwc)], [], [batch[1]]], return_tensors="np")
    assert_same(nested, reference(list(batch), **SMALL))


def test_exif_orientation_applied(tmp_path):
    """transformers leaves in-memory PIL images unrotated; we match it on the image as the user sees it."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(rgb(40, 90), "JPEG", exif=exif.tobytes(), quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    seen = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert seen.size == (40, 90)  # (w, h): displayed portrait
    expected = reference(seen, **SMALL)
    ours = NativeVLImageProcessor(**SMALL)
    for source in (Image.open(io.BytesIO(data)), data, str(path), path):
        assert_same(ours(source, return_tensors="np"), expected)
    # the reference on the raw in-memory image sees it sideways: a different grid
    raw = reference(Image.open(io.BytesIO(data)), **SMALL)
    assert raw["image_grid_thw"].tolist() != expected["image_grid_thw"].tolist()
    # the one reader evaluation and packing decode with: the same displayed image, the same size and pixels
    for source in (data, str(path), path, Image.open(io.BytesIO(data))):
        loaded = load_image(source)
        assert image_size(source) == (90, 40) and loaded.size == (40, 90)
        assert np.array_equal(np.asarray(loaded), np.asarray(seen))
        assert_same(ours(loaded, return_tensors="np"), expected)


def test_load_image_refuses_what_the_processor_refuses(tmp_path):
    with pytest.raises(ValueError, match=r"broken: cannot identify an image in 9 bytes"):
        load_image(b"not a png", "broken")
    with pytest.raises(ValueError, match=r"image: no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"cannot load an input of type ndarray"):
        load_image(noise(8, 8))
    truncated = encode(rgb(64, 64))[:-200]
    with pytest.raises(ValueError, match=r"image: size 64x64 \(h x w\): cannot decode"):
        load_image(truncated)


def test_paths_bytes_and_pil_agree(tmp_path):
    image = Image.fromarray(noise(50, 37, channels=4, seed=4), "RGBA")
    data = encode(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    ours = NativeVLImageProcessor(**SMALL)
    expected = reference(image, **SMALL)  # alpha composited on white, also for files
    for source in (data, bytearray(data), str(path), path, Image.open(path)):
        assert_same(ours(source, return_tensors="np"), expected)
    same_object = Image.open(path)  # one lazily decoded object twice in one call
    twice = ours([same_object, same_object], return_tensors="np")
    assert_same(twice, reference([image, image], **SMALL))


def test_thread_count_does_not_change_output():
    images = [rgb(h, w, seed=h) for h, w in [(90, 40), (33, 120), (200, 180), (17, 17)]]
    one = NativeVLImageProcessor(**SMALL, num_threads=1)(images, return_tensors="np")
    four = NativeVLImageProcessor(**SMALL, num_threads=4)(images, return_tensors="np")
    np.testing.assert_array_equal(one["pixel_values"], four["pixel_values"])
    np.testing.assert_array_equal(one["image_grid_thw"], four["image_grid_thw"])


def test_patch_counts_match_qwen2_vl():
    ours, ref = NativeVLImageProcessor(), Qwen2VLImageProcessorPil()
    for h, w in [(1, 1), (561, 278), (4000, 3000), (20, 3000), (333, 444)]:
        assert ours.get_number_of_image_patches(h, w) == ref.get_number_of_image_patches(h, w)
        assert ours.num_image_tokens(h, w) == ref.get_number_of_image_patches(h, w) // 4
    kwargs = {"min_pixels": 1000, "max_pixels": 20000}
    assert ours.get_number_of_image_patches(500, 400, kwargs) == ref.get_number_of_image_patches(500, 400, kwargs)


# ------------------------------------------------------------------------------------------------ fixed and crop
@pytest.mark.parametrize("height, width", [(100, 100), (378, 378), (480, 640), (1000, 250), (60, 900), (3000, 2000)])
def test_fixed_mode_same_budget_aspect_kept(height, width):
    processor = NativeVLImageProcessor(mode="fixed")
    out = processor(rgb(height, width), return_tensors="np")
    (_, gh, gw) = out["image_grid_thw"][0]
    tokens = gh * gw // 4
    assert (gh * 14, gw * 14) == smart_resize(height, width, 28, 378 * 378, 378 * 378)
    assert 0.7 * 182 <= tokens <= 1.25 * 182  # the paper's Fixed-378 budget, about 182 tokens
    assert tokens == processor.num_image_tokens(height, width)
    assert abs(np.log(gw / gh) - np.log(width / height)) < 0.25  # aspect kept up to rounding to 28 px
    square = NativeVLImageProcessor(mode="fixed", keep_aspect=False)(rgb(height, width), return_tensors="np")
    assert square["image_grid_thw"].tolist() == [[1, 28, 28]]  # sqrt(378*378) = 378 -> 392 (13.5 rounds to 14)


@pytest.mark.parametrize("height, width", [(300, 500), (336, 336), (700, 200), (120, 1000), (1000, 1000), (51, 77)])
def test_crop_mode_matches_llava_next_tiles(height, width):
    """Each view equals LLaVA-NeXT anyres (PIL backend) at base 336, patchified in Qwen2-VL's layout."""
    image = rgb(height, width, seed=height + width)
    ours = NativeVLImageProcessor(mode="crop")(image, return_tensors="np")
    llava = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    views = llava(image, return_tensors="np")["pixel_values"][0]  # (1 + tiles, 3, 336, 336): global view first
    patchify = Qwen2VLImageProcessorPil().patchify
    expected = np.concatenate([patchify(v, patch_size=14, merge_size=2, temporal_patch_size=2)[0] for v in views])
    assert ours["image_num_grids"].tolist() == [len(views)]
    assert ours["image_grid_thw"].tolist() == [[1, 24, 24]] * len(views)
    np.testing.assert_allclose(ours["pixel_values"], expected, rtol=0, atol=1e-5)


def test_crop_mode_tiles_and_tokens():
    processor = NativeVLImageProcessor(mode="crop")
    images = [rgb(300, 500), rgb(336, 336), rgb(700, 200)]
    out = processor(images, return_tensors="pt")
    tiles = out["image_num_grids"].tolist()
    assert tiles == [1 + 2, 1 + 2, 1 + 3]  # canvases 336x672, 336x672 (first of the tied ones), 1008x336
    assert out["image_grid_thw"].shape == (sum(tiles), 3)
    assert out["pixel_values"].shape[0] == sum(tiles) * 24 * 24
    assert [processor.num_image_tokens(im.height, im.width) for im in images] == [144 * n for n in tiles]
    assert processor.get_image_grids(700, 200) == [(1, 24, 24)] * 4
    # a 384 base is cut at 384 and each tile resized to the nearest multiple of 28: 392
    bigger = NativeVLImageProcessor(mode="crop", crop_base_size=384)(rgb(384, 768), return_tensors="np")
    assert bigger["image_grid_thw"].tolist() == [[1, 28, 28]] * 3
    native = NativeVLImageProcessor()(images, return_tensors="np")
    assert native["image_num_grids"].tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------------------------------- videos
def reference_video(frames: list[Image.Image], min_pixels: int, max_pixels: int) -> tuple[np.ndarray, list[int]]:
    """Hand-written reference for transformers' Qwen2VLVideoProcessor layout.

    That processor imports torchvision, which these machines do not have, so it cannot run here. This follows its
    documented steps: every frame resized to the smart_resize size of the first frame (PIL bicubic here, like the
    image processor; torchvision's antialiased resize would differ by resampling), rescale + normalise, the last
    frame repeated to a multiple of temporal_patch_size, then its `patchify` view/permute, copied verbatim.
    """
    height, width = smart_resize(frames[0].height, frames[0].width, 28, min_pixels, max_pixels)
    arrays = []
    for frame in frames:
        array = np.asarray(frame.convert("RGB").resize((width, height), Image.BICUBIC))
        array = ((array.astype(np.float64) / 255).astype(np.float32) - MEAN) / STD
        arrays.append(array.transpose(2, 0, 1))
    videos = torch.from_numpy(np.stack(arrays))[None]  # (B, T, C, H, W)
    batch_size, num_frames, channel, resized_height, resized_width = videos.shape
    patch_size, merge_size, temporal_patch_size = 14, 2, 2
    if pad := -num_frames % temporal_patch_size:
        repeats = videos[:, -1:].expand(-1, pad, -1, -1, -1)
        videos = torch.cat((videos, repeats), dim=1)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = videos.view(
        batch_size,
        grid_t,
        temporal_patch_size,
        channel,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
    )
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(grid_t * grid_h * grid_w, channel * temporal_patch_size * patch_size * patch_size)
    return flat.numpy(), [grid_t, grid_h, grid_w]


@pytest.mark.parametrize("num_frames", [1, 3, 4])
def test_video_matches_documented_qwen2_vl_layout(num_frames):
    limits = dict(video_min_pixels=28 * 28 * 8, video_max_pixels=28 * 28 * 32)
    frames = [rgb(90, 130, seed=f) for f in range(num_frames)]
    other = [rgb(60, 61, seed=10 + f) for f in range(2)]
    out = NativeVLImageProcessor(**limits)(videos=[frames, other], return_tensors="np")
    expected_a, grid_a = reference_video(frames, limits["video_min_pixels"], limits["video_max_pixels"])
    expected_b, grid_b = reference_video(other, limits["video_min_pixels"], limits["video_max_pixels"])
    assert out["video_grid_thw"].tolist() == [grid_a, grid_b]
    assert grid_a[0] == -(-num_frames // 2)
    np.testing.assert_allclose(out["pixel_values_videos"], np.concatenate([expected_a, expected_b]), rtol=0, atol=1e-5)
    assert "pixel_values" not in out


def test_video_inputs_and_counts():
    processor = NativeVLImageProcessor(video_min_pixels=28 * 28 * 8, video_max_pixels=28 * 28 * 32)
    array = np.stack([noise(64, 48, seed=s) for s in range(5)])  # (T, H, W, C)
    from_array = processor(videos=array, return_tensors="np")
    from_list = processor(videos=[[Image.fromarray(f) for f in array]], return_tensors="np")
    from_tensor = processor(videos=[torch.from_numpy(array).permute(0, 3, 1, 2)], return_tensors="np")
    one_thread = processor(videos=array, return_tensors="np", num_threads=1)
    for other in (from_list, from_tensor, one_thread):
        np.testing.assert_array_equal(from_array["pixel_values_videos"], other["pixel_values_videos"])
    (t, h, w) = from_array["video_grid_thw"][0]
    assert t == 3 and from_array["pixel_values_videos"].shape == (t * h * w, 1176)
    assert processor.get_num_of_video_patches(5, 64, 48) == t * h * w
    assert processor.num_video_tokens(5, 64, 48) == t * h * w // 4
    # frames of other sizes follow the first frame's size
    mixed = processor(videos=[[rgb(64, 48), rgb(100, 30)]], return_tensors="np")
    assert mixed["video_grid_thw"].tolist() == [[1, h, w]]
    # a one-frame video at the image limits is laid out exactly like the image
    image = rgb(70, 99)
    same = NativeVLImageProcessor(**SMALL, video_min_pixels=SMALL["min_pixels"], video_max_pixels=SMALL["max_pixels"])
    both = same(images=image, videos=[[image]], return_tensors="np")
    np.testing.assert_array_equal(both["pixel_values"], both["pixel_values_videos"])


def test_transformers_video_processor_grids_if_torchvision():
    pytest.importorskip("torchvision")  # not installed on our machines: this only runs where it is
    from transformers import Qwen2VLVideoProcessor

    frames = np.stack([noise(90, 130, seed=f) for f in range(3)])
    ref = Qwen2VLVideoProcessor()(videos=[frames], return_tensors="np")
    ours = NativeVLImageProcessor()(videos=[frames], return_tensors="np")
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])


# ------------------------------------------------------------------------------------------------- bad inputs
def _truncated_jpeg() -> bytes:
    data = encode(rgb(64, 80), "JPEG", quality=95)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"definitely not an image", r"image 1: cannot identify an image in 23 bytes"),
        (_truncated_jpeg(), r"image 1: size 64x80 .*truncated"),
        (Image.new("RGB", (0, 5)), r"image 1: size 5x0 .*no pixels"),
        (np.zeros((0, 5, 3), np.uint8), r"image 1: size 0x5 .*no pixels"),
        (rgb(1, 201), r"image 1: size 1x201 .*aspect ratio 201"),
        (np.full((4, 6, 3), 2.0), r"image 1: size 4x6 .*float image values must be in \[0, 1\]"),
        ("/no/such/image.png", r"image 1: no such file"),
    ],
)
def test_bad_input_names_index_and_size(bad, message, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    processor = NativeVLImageProcessor(**SMALL)
    good = [rgb(30, 40, seed=1), rgb(50, 20, seed=2)]
    before = processor(good, return_tensors="np")
    with pytest.raises(ValueError, match=message):
        processor([good[0], bad, good[1]], return_tensors="np")
    after = processor(good, return_tensors="np")  # nothing left behind by the failed call
    np.testing.assert_array_equal(before["pixel_values"], after["pixel_values"])


def test_aspect_limit_is_configurable():
    with pytest.raises(ValueError, match=r"image 0: size 10x110 .*max_aspect_ratio=10"):
        NativeVLImageProcessor(max_aspect_ratio=10)(rgb(10, 110))
    with pytest.raises(ValueError, match=r"video 0 frame 0: size 1x300"):
        NativeVLImageProcessor()(videos=[[rgb(1, 300)]])
    with pytest.raises(ValueError, match=r"aspect ratio"):
        NativeVLImageProcessor(mode="crop")(rgb(1, 300))


def test_bad_video_frame_names_video_and_frame():
    frames = [rgb(40, 40), rgb(40, 40), b"not a frame"]
    with pytest.raises(ValueError, match=r"video 1 frame 2: cannot identify an image"):
        NativeVLImageProcessor()(videos=[[rgb(40, 40)], frames])
    with pytest.raises(ValueError, match=r"video 0: has no frames"):
        NativeVLImageProcessor()(videos=[[]])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [40, 50])  # 1600 px: PIL warns; 2500 px: PIL raises (limit 1000)
def test_decompression_bomb_is_an_error(side, monkeypatch, tmp_path):
    data = encode(rgb(side, side))
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    processor = NativeVLImageProcessor()
    for source in (data, str(path)):
        with pytest.raises(ValueError, match=r"image 1: .*(decompression bomb|MAX_IMAGE_PIXELS)"):
            processor([rgb(20, 20), source])


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="mode"):
        NativeVLImageProcessor(mode="tiles")
    with pytest.raises(ValueError, match="crop_base_size"):
        NativeVLImageProcessor(crop_grid_pinpoints=[[336, 500]])
    with pytest.raises(ValueError, match="min_pixels"):
        NativeVLImageProcessor(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="unknown"):
        NativeVLImageProcessor()(rgb(30, 30), not_an_option=1)
    with pytest.raises(ValueError, match="images=, videos="):
        NativeVLImageProcessor()()


# --------------------------------------------------------------------------------------- config and remote code
def test_save_and_load_round_trip(tmp_path):
    processor = NativeVLImageProcessor(mode="crop", crop_base_size=384, max_pixels=28 * 28 * 2048)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["mode"] == "crop" and saved["crop_grid_pinpoints"][0] == [384, 768]
    assert saved["resample"] == 3 and saved["max_pixels"] == 28 * 28 * 2048
    loaded = NativeVLImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    overridden = NativeVLImageProcessor.from_pretrained(tmp_path, mode="native")
    assert overridden.mode == "native"


SIBLINGS = ("image_processing_nativevl.py", "image_io_nativevl.py", "resize_nativevl.py")


@pytest.mark.parametrize("name", SIBLINGS)
def test_remote_code_imports_only_allowed_modules(name):
    source = (Path(module.__file__).parent / name).read_text()
    allowed = set(sys.stdlib_module_names) | {"numpy", "torch", "PIL", "transformers"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level in (0, 1), "no parent-relative imports in remote code"
            roots = {(node.module or "").split(".")[0]} if node.level == 0 else set()
            if node.level == 1:
                assert f"{node.module}.py" in SIBLINGS, f"{name}: sibling {node.module} is not copied with the file"
        else:
            continue
        assert roots <= allowed, roots


def test_loads_flat_without_nativevl(tmp_path):
    """Copied with its sibling files into a model folder, the file imports and runs in a fresh process where nativevl
    is blocked (the folder imported as a package, as transformers imports it under ``transformers_modules``)."""
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "__init__.py").touch()
    for name in SIBLINGS:
        shutil.copy(Path(module.__file__).parent / name, tmp_path / "flat" / name)
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'nativevl':\n"
        "            raise ImportError('nativevl is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import numpy as np\n"
        "from flat.image_processing_nativevl import NativeVLImageProcessor\n"
        "out = NativeVLImageProcessor()(np.zeros((980, 980, 3), np.uint8), return_tensors='pt')\n"
        "print(tuple(out['pixel_values'].shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(4900, 1176)"


# ----------------------------------------------------------------------------------------------- property test
@settings(deadline=None, max_examples=25)
@given(
    height=st.integers(1, 600),
    width=st.integers(1, 600),
    mode=st.sampled_from(["native", "fixed", "crop"]),
    keep_aspect=st.booleans(),
)
def test_rows_grids_and_tokens_agree(height, width, mode, keep_aspect):
    assume(max(height, width) / min(height, width) <= 200)
    processor = NativeVLImageProcessor(mode=mode, keep_aspect=keep_aspect, max_pixels=28 * 28 * 256)
    out = processor([rgb(height, width), rgb(28, 56)], return_tensors="np")
    grids = out["image_grid_thw"]
    assert out["pixel_values"].shape == (int(np.prod(grids, axis=1).sum()), 1176)
    assert out["image_num_grids"].sum() == len(grids)
    first = grids[: out["image_num_grids"][0]]
    assert (grids[:, 1:] % 2 == 0).all() and (grids[:, 0] == 1).all()
    assert int(np.prod(first, axis=1).sum()) // 4 == processor.num_image_tokens(height, width)
    assert int(np.prod(first, axis=1).sum()) == processor.get_number_of_image_patches(height, width)
    assert np.isfinite(out["pixel_values"]).all()
